"""Time fmask's exact Fisher diagonal + masked gradient embeddings against a per-(sample, class)
autograd loop and against the floor of r plain batched backward passes, on the same model and inputs.

    python -m benchmarks.fisher --model cnn545k --n 200 --images ../shared/datasets/cifar10/train
    python -m benchmarks.fisher --model resnet18 --n 200 --images ../shared/datasets/cifar10/train

Models: any of fmask's (cnn, resnet18, torchvision:NAME), or cnn545k: the classic 545,098-parameter
CIFAR CNN (conv 3→32, pool, conv 32→64, pool, dense 4096→128, head), the small CNN of the Fisher step's
speed targets. All three parts run in one process under the same allocator setting (see
fmask.core.cpu_allocator; FMASK_MALLOC_TUNING=0 turns it off for all three).

(a) loop:  for every sample, one forward and r `torch.autograd.grad` calls over all parameters;
           pass 1 accumulates the Fisher diagonal, pass 2 gathers the masked entries (the mask needs
           the whole Fisher first, as in the authors' code).
(b) fmask: `fisher_diagonal` + `top_k_mask` + `masked_embeddings`.
(c) floor: per batch, one forward and r backward passes of `log_softmax(model(x))[:, c].sum()`.
Both ratios, (a)/(b) and (b)/(c), are printed. (a) and (b) must agree (exactly, in float64, on the first
--check-samples inputs; float32 agreement is reported) or the script exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmask.core.cpu_allocator import tune_cpu_allocator
from fmask.fisher.grads import fisher_diagonal, masked_embeddings, plan_fisher_pass
from fmask.fisher.mask import MaskColumns, mask_size, top_k_mask
from fmask.train.models import build_model


class Cnn545k(nn.Module):
    """Two 3×3 conv + ReLU + 2×2 max-pool blocks (32, 64 channels), a 4096→128 dense layer, the head."""

    def __init__(self, in_channels: int, num_classes: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (size // 4) ** 2, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def make_model(args: argparse.Namespace) -> nn.Module:
    if args.model == "cnn545k":
        return Cnn545k(args.channels, args.classes, args.size)
    return build_model(args.model, in_channels=args.channels, num_classes=args.classes)


def load_inputs(args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    if args.images is None:
        return torch.randn(args.n, args.channels, args.size, args.size, generator=generator)
    from torchvision.io import ImageReadMode, read_image

    files = sorted(Path(args.images).glob("*/*.jpg"))
    if len(files) < args.n:
        sys.exit(f"{args.images} has {len(files)} images, fewer than --n {args.n}")
    picks = torch.randperm(len(files), generator=generator)[: args.n].tolist()
    images = torch.stack([read_image(str(files[i]), ImageReadMode.RGB) for i in picks]).float() / 255
    return (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn, device: torch.device):
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    return clock() - start, result


def loop_fisher(model, x, params, names) -> dict[str, torch.Tensor]:
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    for i in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        for y in range(log_p.shape[0]):
            grads = torch.autograd.grad(log_p[y], params, retain_graph=y < log_p.shape[0] - 1)
            weight = log_p[y].detach().exp()
            for n, g in zip(names, grads):
                fisher[n] += weight * g.double().square()
    return {n: (f / x.shape[0]).cpu() for n, f in fisher.items()}


def loop_embeddings(model, x, params, columns: MaskColumns, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    idx = [i.to(x.device) for i in columns.indices]
    rows = []
    for i in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        per_class = []
        for y in range(log_p.shape[0]):
            grads = torch.autograd.grad(log_p[y], params, retain_graph=y < log_p.shape[0] - 1)
            scale = log_p[y].detach().exp().sqrt()
            per_class.append(torch.cat([g.reshape(-1)[j] for g, j in zip(grads, idx)]) * scale)
        rows.append(torch.stack(per_class))
    return torch.stack(rows).to("cpu", dtype)


def floor(model, x, batch_size: int) -> None:
    for start in range(0, x.shape[0], batch_size):
        log_p = torch.log_softmax(model(x[start : start + batch_size]), dim=-1)
        r = log_p.shape[1]
        for c in range(r):
            model.zero_grad(set_to_none=True)
            log_p[:, c].sum().backward(retain_graph=c < r - 1)
    model.zero_grad(set_to_none=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn545k", help="cnn545k | cnn | resnet18 | torchvision:NAME")
    parser.add_argument("--n", type=int, default=200, help="number of samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--images", default=None, help="folder of <class>/*.jpg images instead of random inputs")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per batch for (b) and (c) (default: fmask's plan, 64 on a CPU)")
    parser.add_argument("--sparsity", type=float, default=0.002)
    parser.add_argument("--no-head", action="store_true", help="plain global top-k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="time (b) and (c) this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a shared machine")
    parser.add_argument("--check-samples", type=int, default=4, help="samples for the exact float64 check")
    parser.add_argument("--skip-loop", action="store_true", help="skip (a); no agreement check")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    allocator = "tuned" if device.type == "cpu" and tune_cpu_allocator() else "default"
    model = make_model(args).to(device).eval()
    x = load_inputs(args, generator).to(device)
    args.batch_size = plan_fisher_pass(model, tuple(x.shape[1:]), device=device, batch_size=args.batch_size).batch_size
    names, params = zip(*model.named_parameters())
    n_params = sum(p.numel() for p in params)
    k = mask_size(args.sparsity, n_params)
    print(f"model {args.model}: {n_params:,} parameters, k={k}; {args.n} inputs {tuple(x.shape[1:])}; "
          f"{args.classes} classes; batch {args.batch_size}; device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {allocator} malloc")

    # Warm-up on a few samples so that lazy initialisation is not timed.
    floor(model, x[:2], args.batch_size)
    fisher_diagonal(model, x[:2], batch_size=args.batch_size)

    # The machine may be shared: alternate (c) and (b) and keep each part's fastest of --repeat runs.
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        parts = {"floor": timed(lambda: floor(model, x, args.batch_size), device)}
        parts["fisher"] = timed(lambda: fisher_diagonal(model, x, batch_size=args.batch_size), device)
        fisher = parts["fisher"][1]
        parts["mask"] = timed(
            lambda: MaskColumns.from_masks(top_k_mask(fisher, k, head=not args.no_head, order=names), names), device
        )
        columns = parts["mask"][1]
        parts["embed"] = timed(lambda: masked_embeddings(model, x, columns, batch_size=args.batch_size), device)
        embeddings = parts["embed"][1]
        for key, (seconds, _) in parts.items():
            best[key] = min(best.get(key, float("inf")), seconds)
    t_floor, t_fisher, t_mask, t_embed = best["floor"], best["fisher"], best["mask"], best["embed"]
    t_fmask = t_fisher + t_mask + t_embed
    print(f"(c) floor, r batched backward passes: {t_floor:8.2f} s")
    print(f"(b) fmask: Fisher {t_fisher:.2f} s + mask {t_mask:.2f} s + embeddings {t_embed:.2f} s = {t_fmask:8.2f} s"
          f"   V {tuple(embeddings.shape)}")
    print(f"    fmask / floor = {t_fmask / t_floor:.2f}x   (Fisher pass alone {t_fisher / t_floor:.2f}x,"
          f" embedding pass alone {t_embed / t_floor:.2f}x)")
    if args.skip_loop:
        return 0

    t_loop_fisher, loop_fis = timed(lambda: loop_fisher(model, x, params, names), device)
    t_loop_embed, loop_emb = timed(lambda: loop_embeddings(model, x, params, columns), device)
    t_loop = t_loop_fisher + t_loop_embed
    print(f"(a) loop: Fisher {t_loop_fisher:.2f} s + embeddings {t_loop_embed:.2f} s = {t_loop:8.2f} s")
    print(f"    loop / fmask = {t_loop / t_fmask:.2f}x faster")
    fisher_err = max(relative_error(fisher[n], loop_fis[n]) for n in names)
    scale = loop_emb.abs().max().clamp_min(1e-30)
    per_sample = ((embeddings - loop_emb).abs().amax(dim=(1, 2)) / scale).tolist()
    close = sum(err <= 1e-4 for err in per_sample)
    loop_mask = top_k_mask(loop_fis, k, head=not args.no_head, order=names)
    fmask_mask = dict(zip(columns.names, columns.indices))
    same = sum(int(torch.isin(torch.nonzero(loop_mask[n].reshape(-1)).flatten(), fmask_mask[n]).sum()) for n in names)
    print(f"float32 agreement: Fisher max rel. error {fisher_err:.2e} (per parameter, max-normalised); embeddings "
          f"within 1e-4 for {close}/{len(per_sample)} samples (worst {max(per_sample):.2e}); masks share {same}/{k}")

    # The exact check, in float64: float32 results may differ where a batch-size-dependent rounding flips a
    # ReLU (the gradient jumps there), so equality is asserted on the first --check-samples in float64.
    model64, x64 = model.double(), x[: args.check_samples].double()
    names64, params64 = zip(*model64.named_parameters())
    fisher64 = fisher_diagonal(model64, x64, batch_size=args.batch_size)
    reference64 = loop_fisher(model64, x64, params64, names64)
    columns64 = MaskColumns.from_masks(top_k_mask(fisher64, k, head=not args.no_head, order=names64), names64)
    embed64 = masked_embeddings(model64, x64, columns64, batch_size=args.batch_size, dtype=torch.float64)
    reference_embed64 = loop_embeddings(model64, x64, params64, columns64, dtype=torch.float64)
    fisher64_err = max(relative_error(fisher64[n], reference64[n]) for n in names64)
    embed64_err = relative_error(embed64, reference_embed64)
    print(f"float64 agreement on {x64.shape[0]} samples: Fisher {fisher64_err:.2e}, embeddings {embed64_err:.2e}")
    if fisher64_err > 1e-8 or embed64_err > 1e-8 or fisher_err > 1e-2:
        print("DISAGREEMENT between (a) and (b)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
