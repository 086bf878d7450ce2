"""Time and peak memory of the selection step of BALD, BatchBALD, TypiClust, ProbCover and Cluster-Margin, beside
k-center, BADGE and margin, on one synthetic pool.

    .venv/bin/python -m benchmarks.strategies                    # N=50,000 C=10 E=512 batch 1,000, CPU, 1 thread
    .venv/bin/python -m benchmarks.strategies --only batchbald,bald --n 20000
    .venv/bin/python -m benchmarks.strategies --device cuda

The pool: N candidates and L labeled samples whose E-dimensional ReLU features come from a 16-dimensional latent
mixture (C classes × 5 sub-clusters) mapped up by a fixed random matrix, so neighbourhoods behave like a trained
network's embeddings rather than high-dimensional noise; class probabilities come from a random linear head, and
BALD/BatchBALD's (N, S, C) log-probabilities from S dropout passes (p = 0.3) through that head. BatchBALD picks
``--bald-batch`` (default 100) with S = ``--passes`` (default 20) and 1,000 label configurations; the others pick
``--batch``. Every strategy runs in a fresh subprocess with the inputs already built, so its peak memory is its
own: on CPU the peak resident set size during the selection (VmHWM, reset through /proc/self/clear_refs once the
inputs exist) minus the resident size at that point; on
CUDA torch.cuda.max_memory_allocated minus the memory the inputs hold. Times cover the selection alone (the
MC-dropout passes are their own row), after a warm-up on 256 candidates, as wall-clock and as the process's CPU
time (on a shared machine the CPU time of one thread is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from benchmarks.sides import PeakMemory, run_side_process, side_parser
from fmask.query import (badge_select, bald_scores, batchbald_select, cluster_margin_select, kcenter_greedy,
                         probcover_select, typiclust_select)
from fmask.query.clustering import kmeans_labels
from fmask.query.mc_dropout import mc_dropout_log_probs
from fmask.query.uncertainty import margin_scores
from fmask.query.strategies.probcover import normalized, purity_radius

SIDES = ("margin", "bald", "mc-dropout-passes", "batchbald", "kcenter", "badge", "typiclust", "probcover",
         "cluster-margin")


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded features (N + L, E) (candidates first), probabilities (N, C) and the head that gave them."""
    generator = torch.Generator().manual_seed(args.seed)
    total, latent_dim, sub = args.n + args.labeled, 16, 5
    centres = 4.0 * torch.randn(args.c, latent_dim, generator=generator)
    offsets = 1.5 * torch.randn(args.c, sub, latent_dim, generator=generator)
    classes = torch.randint(args.c, (total,), generator=generator)
    subs = torch.randint(sub, (total,), generator=generator)
    latent = centres[classes] + offsets[classes, subs] + torch.randn(total, latent_dim, generator=generator)
    lift = torch.randn(latent_dim, args.e, generator=generator) / latent_dim ** 0.5
    features = (latent @ lift + 0.1 * torch.randn(total, args.e, generator=generator)).clamp_(min=0.0)
    head = torch.nn.Linear(args.e, args.c)
    with torch.no_grad():
        head.weight.copy_(0.03 * torch.randn(args.c, args.e, generator=generator))  # logits of a few units
        head.bias.zero_()
        probs = torch.softmax(head(features[:args.n]), dim=1)
    return {"features": features.to(device), "probs": probs.to(device), "head": head.to(device)}


def run_side(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args, device)
    features, probs, head = inputs["features"], inputs["probs"], inputs["head"]
    candidates, labeled_features = features[:args.n], features[args.n:]

    def passes(rows: torch.Tensor) -> torch.Tensor:
        return mc_dropout_log_probs(rows, head, 0.3, args.passes,
                                    generator=torch.Generator(device=device).manual_seed(args.seed))

    log_probs = passes(candidates) if args.side in ("bald", "batchbald") else None

    def select(n: int, batch: int) -> list[int]:
        """The side's selection over the first ``n`` candidates (and the labeled samples)."""
        if args.side in ("typiclust", "probcover"):  # these read the whole pool, labeled samples included
            pool_rows = torch.cat([candidates[:n], labeled_features])
            pool_labeled = np.concatenate([np.zeros(n, dtype=bool), np.ones(args.labeled, dtype=bool)])
        if args.side == "margin":
            return torch.topk(margin_scores(probs[:n]), batch).indices.tolist()
        if args.side == "bald":
            return torch.topk(bald_scores(log_probs[:n]), batch).indices.tolist()
        if args.side == "mc-dropout-passes":
            passes(candidates[:n])
            return []
        if args.side == "batchbald":
            return batchbald_select(log_probs[:n], batch, num_samples=1000, seed=args.seed)
        if args.side == "kcenter":
            return kcenter_greedy(candidates[:n], labeled_features, batch, device=device)[0]
        if args.side == "badge":
            return badge_select(probs[:n], candidates[:n], batch, generator=torch.Generator().manual_seed(0))[0]
        if args.side == "typiclust":
            return typiclust_select(pool_rows, pool_labeled, batch, seed=args.seed)
        if args.side == "probcover":
            points = normalized(pool_rows)
            radius = purity_radius(points, kmeans_labels(points, args.c, seed=args.seed), seed=args.seed)
            picked = probcover_select(pool_rows, pool_labeled, batch, radius=radius)
            side_notes["radius"] = radius
            return picked
        margins = -margin_scores(probs[:n])
        return cluster_margin_select(candidates[:n], margins, batch, seed=args.seed)

    side_notes: dict = {}
    batch = args.bald_batch if args.side == "batchbald" else args.batch
    select(256, min(8, batch))  # warm-up: kernels, allocator, imports
    memory = PeakMemory(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    chosen = select(args.n, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if args.side != "mc-dropout-passes":
        assert len(set(chosen)) == batch and all(0 <= p < args.n for p in chosen), args.side
    return {"side": args.side, "batch": batch if args.side != "mc-dropout-passes" else 0, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "peak_extra_bytes": memory.extra_bytes(), **side_notes}


def parse_args() -> argparse.Namespace:
    parser = side_parser(__doc__.split("\n\n")[0], sides=SIDES, n=50_000, e_help="feature width",
                         labeled_help="labeled samples", batch=1_000)
    parser.add_argument("--bald-batch", type=int, default=100, help="BatchBALD's batch")
    parser.add_argument("--passes", type=int, default=20, help="MC dropout passes S")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument("--only", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    sides = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        raise SystemExit(f"unknown --only entries {unknown}; choose from {', '.join(SIDES)}")
    print(f"N={args.n:,} E={args.e} C={args.c} labeled={args.labeled:,} batch={args.batch:,} "
          f"(BatchBALD {args.bald_batch}, S={args.passes}) device={args.device} threads={args.threads} "
          f"torch={torch.__version__}", flush=True)
    print(f"{'strategy':<20}{'batch':>7}{'wall (s)':>10}{'CPU (s)':>10}{'peak extra (MiB)':>18}", flush=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for side in sides:
        result = run_side_process("benchmarks.strategies", side, args, leave_out=("only",), env=environment)
        note = f"   radius {result['radius']:.3f}" if "radius" in result else ""
        print(f"{side:<20}{result['batch']:>7}{result['seconds']:>10.2f}{result['cpu_seconds']:>10.2f}"
              f"{result['peak_extra_bytes'] / 2**20:>18.1f}{note}", flush=True)


if __name__ == "__main__":
    main()
