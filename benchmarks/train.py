"""Training speed: fmask's trainer against the authors' kind of loop, side by side in one run.

    .venv/bin/python benchmarks/train.py                                   # cnn, 5,000 CIFAR-10 images, CPU
    .venv/bin/python benchmarks/train.py --model resnet18 --device cuda --epochs 100 --target-accuracy 0.99

Both sides train the same model from the same initial weights on the same images and labels, with the same
protocol (Adam, batch size, gradients clamped to ±0.1, random crop with padding + horizontal flip):
  plain  a torch DataLoader over PIL images with torchvision transforms (RandomCrop(32, padding=4),
         RandomHorizontalFlip, ToTensor, Normalize), ``--workers`` worker processes, fp32, as the authors' code;
  fmask  fmask.train.trainer.TrainLoop: the uint8 images resident on the device, one gather per batch for
         index + crop + flip, normalisation in the same step, ``--precision`` autocast, channels-last.
The images come from a pool that fmask builds from the shared CIFAR-10 folder (decoded once; neither side pays
for JPEG decoding). The sides alternate epoch by epoch, so load from other processes on a shared machine falls
on both alike. Both run ``--epochs`` epochs; the time to ``--target-accuracy`` training accuracy counts setup and
the epochs until the first one at the target (where the paper's protocol would stop). Both are evaluated on the
pool's test split in fp32 after each of the last ``--eval-last`` epochs, outside the clock. Printed: images per
second, epochs and seconds to the target, test accuracy, and the fmask/plain ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from fmask.core.device import resolve_device
from fmask.pool.pool import build_pool, load_pool
from fmask.train.models import build_model
from fmask.train.trainer import TrainConfig, TrainLoop, evaluate, validate_config

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


class PilImages(torch.utils.data.Dataset):
    """Like torchvision.datasets.CIFAR10: HWC uint8 arrays, a PIL image and the transforms per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.data = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.labels[i]


class PlainLoop:
    """The DataLoader + torchvision loop, fp32, one epoch per call (same protocol as fmask's TrainLoop)."""

    def __init__(self, model, images, labels, *, normalization, pad, config: TrainConfig, device, workers):
        size = images.shape[-1]
        transform = T.Compose([T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(normalization["mean"], normalization["std"])])
        self.loader = torch.utils.data.DataLoader(
            PilImages(images, labels, transform), batch_size=config.batch_size, shuffle=True, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed))
        self.model, self.config, self.device = model.to(device), config, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def run_epoch(self) -> float:
        self.model.train()
        correct, seen = 0, 0
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.config.grad_clamp)
            self.optimizer.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        self.model.eval()
        return correct / max(seen, 1)


@dataclass
class Side:
    name: str
    loop: object
    setup_s: float
    epoch_s: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)

    def seconds_to(self, target: float) -> tuple[int, float] | None:
        """(epochs, seconds incl. setup) until the first epoch at ``target`` training accuracy, or None."""
        for epoch, accuracy in enumerate(self.accuracy, start=1):
            if accuracy >= target:
                return epoch, self.setup_s + sum(self.epoch_s[:epoch])
        return None


def make_pool(args) -> Path:
    if args.pool:
        return Path(args.pool)
    if not SHARED_CIFAR10.is_dir():
        sys.exit(f"no --pool given and {SHARED_CIFAR10} is absent; build a pool with `fmask build-pool` and pass it")
    out = Path(args.work) / f"cifar10-{args.per_class}x10"
    build_pool(dataset=f"folder:{SHARED_CIFAR10}", out=out, class_counts=[args.per_class] * 10,
               initial=10 * args.per_class, seed=0, test_per_class=args.test_per_class)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=None, help="a built pool (default: build one from the shared CIFAR-10)")
    parser.add_argument("--work", default="/tmp/fmask-bench-train", help="where the default pool is built")
    parser.add_argument("--per-class", type=int, default=500, help="train images per class of the default pool")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="fmask side: auto | fp32 | bf16 | fp16")
    parser.add_argument("--no-channels-last", action="store_true", help="fmask side: keep NCHW")
    parser.add_argument("--compile", action="store_true", help="fmask side: torch.compile the model")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="plain side's DataLoader")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=10, help="epoch cap per side")
    parser.add_argument("--target-accuracy", type=float, default=0.45,
                        help="training accuracy that ends a side (the paper trains to 0.99; the small CNN on CPU "
                             "would need hundreds of epochs)")
    parser.add_argument("--eval-last", type=int, default=3,
                        help="evaluate on the test split after each of the last N epochs (single epochs are noisy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    args.eval_last = max(1, min(args.eval_last, args.epochs))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    pool = load_pool(make_pool(args))
    labeled = pool.ids
    images, labels = pool.images(labeled), pool.labels(labeled)
    config = validate_config(TrainConfig(model=args.model, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                         precision=args.precision, channels_last=not args.no_channels_last,
                                         compile=args.compile), device)
    norm, pad = pool.manifest["normalization"], int(pool.manifest["augment"]["crop_pad"])
    print(f"pool: {pool.dir} ({len(labeled)} train images {tuple(pool.image_shape)}, {len(pool.test_labels)} test); "
          f"model {args.model}; batch {args.batch_size}; device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()} cores'}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"fmask: precision {config.precision}, channels_last {config.channels_last}, compile {config.compile}; "
          f"plain: DataLoader num_workers {args.workers}, fp32")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def initial_model():
        torch.manual_seed(args.seed)  # the same initial weights for both sides
        return build_model(args.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes).to(device)

    sides = []
    for name in ("fmask", "plain"):
        model = initial_model()
        sync()
        start = time.perf_counter()
        if name == "fmask":
            loop = TrainLoop(model, images, labels, normalization=norm, augment=pool.manifest["augment"],
                             config=config, device=device)
        else:
            loop = PlainLoop(model, images, labels, normalization=norm, pad=pad, config=config, device=device,
                             workers=args.workers)
        sync()
        sides.append(Side(name, loop, time.perf_counter() - start))

    for epoch in range(1, args.epochs + 1):
        for side in (sides if epoch % 2 else sides[::-1]):  # alternate who goes first
            sync()
            start = time.perf_counter()
            side.accuracy.append(side.loop.run_epoch())
            sync()
            side.epoch_s.append(time.perf_counter() - start)
            line = (f"epoch {epoch:3d} {side.name:5s}: {side.epoch_s[-1]:7.2f} s, "
                    f"{len(labeled) / side.epoch_s[-1]:8.0f} img/s, train acc {side.accuracy[-1]:.3f}")
            if epoch > args.epochs - args.eval_last:  # outside the clock; fp32 for both
                side.test_accuracy.append(evaluate(side.loop.model, pool, device)["accuracy"])
                line += f", test acc {side.test_accuracy[-1]:.4f}"
            print(line, flush=True)

    target = f"{args.target_accuracy:.0%}"
    print()
    print(f"{'':6s} {'img/s (all)':>12s} {'img/s (median epoch)':>21s} {'epochs to ' + target:>14s} "
          f"{'seconds to ' + target:>15s} {'final train acc':>16s} "
          f"{'test acc (last ' + str(args.eval_last) + ')':>18s}")
    rows = {}
    for side in sides:
        total = side.setup_s + sum(side.epoch_s)
        rate = len(labeled) * len(side.epoch_s) / total
        median = len(labeled) / statistics.median(side.epoch_s)
        reached = side.seconds_to(args.target_accuracy)
        test = statistics.mean(side.test_accuracy)
        rows[side.name] = (rate, median, reached, test)
        print(f"{side.name:6s} {rate:12.0f} {median:21.0f} {reached[0] if reached else 'not reached':>14} "
              f"{f'{reached[1]:.1f}' if reached else '-':>15s} {side.accuracy[-1]:16.3f} "
              f"{test:11.4f} ± {statistics.pstdev(side.test_accuracy):.3f}")
    fm, plain = rows["fmask"], rows["plain"]
    print(f"\nthroughput ratio fmask/plain: {fm[0] / plain[0]:.2f}x (all epochs incl. setup), "
          f"{fm[1] / plain[1]:.2f}x (median epoch)")
    if fm[2] and plain[2]:
        print(f"time-to-{target}-train-accuracy ratio plain/fmask: {plain[2][1] / fm[2][1]:.2f}x")
    else:
        print(f"time-to-{target}: not reached by " + " and ".join(s.name for s in sides if not s.seconds_to(
            args.target_accuracy)) + "; raise --epochs")
    print(f"test accuracy (mean of the last {args.eval_last} epochs) fmask - plain: {fm[3] - plain[3]:+.4f}")


if __name__ == "__main__":
    main()
