"""Pretrained backbones: one AL round with a frozen backbone (``--finetune head``) against one with full
fine-tuning, and the one-off feature pass, side by side in one run.

    .venv/bin/python -m benchmarks.pretrained --threads 1            # ResNet-18 at 64x64, 2,000 + 10,000 images, CPU

A pool of ``--labeled`` + ``--unlabeled`` shared CIFAR-10 images (equal per class, ``--labeled`` of them labeled)
is built once; the benchmark saves torchvision's ResNet-18 weights (seeded initialisation: nothing is downloaded,
and the time per image does not depend on the values) and every step uses them with ``--input-size`` (the 32x32
images are resized on the device). Timed, in this process (library calls, no interpreter start-up):
  features  the one-off pass: the backbone over every pool and test image, cached beside the pool;
  head      a round with the features cached: `fmask train --finetune head` (a linear head, the recipe's 30
            epochs, evaluated on the test split) + `fmask query --strategy badge --batch B` on the cached features;
            run ``--head-repeats`` times, median reported;
  full      a round of full fine-tuning: `fmask train` (``--epochs`` epochs, AdamW, cosine, backbone at 0.1 x lr,
            test evaluation) + the same query, which runs the network over the unlabeled pool.
Printed: seconds per step and the full/head ratio of a round. Accuracies are printed for completeness only: the
weights are an untrained initialisation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

from fmask.pool.pool import build_pool, load_pool
from fmask.query.step import run_query
from fmask.train.features import pool_features
from fmask.train.pretrained import Backbone
from fmask.train.recipe import make_train_config
from fmask.train.trainer import TrainConfig, train

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
MODEL = "torchvision:resnet18"


def timed(step):
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/fmask-bench-pretrained", help="pool, weights and checkpoints")
    parser.add_argument("--labeled", type=int, default=2000)
    parser.add_argument("--unlabeled", type=int, default=10000)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="full fine-tuning epochs")
    parser.add_argument("--batch", type=int, default=500, help="query batch")
    parser.add_argument("--strategy", default="badge")
    parser.add_argument("--head-repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not SHARED_CIFAR10.is_dir():
        sys.exit(f"{SHARED_CIFAR10} is absent; this benchmark reads the shared CIFAR-10 images")
    work = Path(args.work)
    total = args.labeled + args.unlabeled
    if total % 10 or args.labeled > total:
        sys.exit("--labeled + --unlabeled must be a multiple of 10 (equal classes)")
    pool_dir = work / "pool"
    build_pool(dataset=f"folder:{SHARED_CIFAR10}", out=pool_dir, class_counts=[total // 10] * 10,
               initial=args.labeled, seed=0, test_per_class=args.test_per_class)
    pool = load_pool(pool_dir)
    weights = work / "resnet18.safetensors"
    if not weights.is_file():
        torch.manual_seed(0)
        save_file(torchvision.models.resnet18().state_dict(), str(weights))
    device = torch.device(args.device)
    print(f"pool {pool_dir}: {len(pool.ids)} images ({args.labeled} labeled), {len(pool.test_labels)} test, "
          f"{MODEL} at {args.input_size}x{args.input_size}, device {device}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cores", flush=True)

    backbone = Backbone.resolve(MODEL, weights, channels=3, input_size=args.input_size)
    for cache in pool_dir.glob("features-*.safetensors"):
        cache.unlink()  # the one-off pass is measured from scratch
    feature_s, features = timed(lambda: pool_features(pool, backbone, device=device))
    print(f"features: {feature_s:.1f} s for {len(features.train) + len(features.test)} images "
          f"({features.train.shape[1]} wide)", flush=True)

    def round_(finetune: str, **given) -> tuple[float, float, dict]:
        out = work / f"{finetune}.pt"
        config = make_train_config(TrainConfig, model=MODEL, weights=str(weights), finetune=finetune,
                                   input_size=args.input_size, **given)
        train_s, trained = timed(lambda: train(pool_dir=pool_dir, labeled=None, out=out, config=config,
                                               device=args.device, force=True))
        query_s, _ = timed(lambda: run_query(ckpt=out, out=work / f"{finetune}-query.json", strategy=args.strategy,
                                             batch=args.batch, device=args.device, force=True))
        return train_s, query_s, trained.metrics

    head_rounds = []
    for repeat in range(args.head_repeats):
        head_rounds.append(round_("head"))
        train_s, query_s, metrics = head_rounds[-1]
        print(f"head round {repeat + 1}: train {train_s:.2f} s + query {query_s:.2f} s, test acc "
              f"{metrics['accuracy']:.3f}", flush=True)
    full_train_s, full_query_s, full_metrics = round_("full", max_epochs=args.epochs)
    print(f"full round: train {full_train_s:.1f} s + query {full_query_s:.1f} s, test acc "
          f"{full_metrics['accuracy']:.3f}", flush=True)

    head_train = statistics.median(r[0] for r in head_rounds)
    head_query = statistics.median(r[1] for r in head_rounds)
    head_round = statistics.median(r[0] + r[1] for r in head_rounds)
    full_round = full_train_s + full_query_s
    print()
    print(f"| step | head (frozen, cached features) | full ({args.epochs} epochs) | full / head |")
    print("|---|---|---|---|")
    print(f"| train | {head_train:.2f} s | {full_train_s:.1f} s | {full_train_s / head_train:.0f}x |")
    print(f"| query ({args.strategy}, batch {args.batch}) | {head_query:.2f} s | {full_query_s:.1f} s | "
          f"{full_query_s / head_query:.0f}x |")
    print(f"| round | {head_round:.2f} s | {full_round:.1f} s | {full_round / head_round:.0f}x |")
    print(f"| one-off feature pass | {feature_s:.1f} s | — | — |")


if __name__ == "__main__":
    main()
