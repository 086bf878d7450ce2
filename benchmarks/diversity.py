"""Time and peak memory of fmask's k-center greedy and BADGE against implementations that materialize.

    .venv/bin/python benchmarks/diversity.py                      # N=20000, E=512, C=10, CPU
    .venv/bin/python benchmarks/diversity.py --device cuda --n 100000

Baselines (the straightforward way, as most AL toolkits do it):
  k-center  the full N x (N + L) candidate-to-everything distance matrix, then farthest-first on its columns;
  BADGE     the explicit N x (C·E) gradient embeddings, then fmask's own seeded k-means++ (largest norm first,
            D²-weighted draws; fmask.query.clustering.kmeans_plus_plus) on distances from those embeddings, so the
            two sides differ in how distances are computed alone.
Both sides work in float64 from the same float32 inputs, and the selections are asserted identical.

Each side runs in a fresh subprocess so its peak memory is its own: on CPU the peak resident set size
(VmHWM, restarted once the inputs exist) minus the resident size at that point; on CUDA torch.cuda.max_memory_allocated
minus the memory held by the inputs. Times cover the selection only (inputs already on the device).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.sides import PeakMemory, run_side_process, side_parser
from fmask.query.clustering import kmeans_plus_plus
from fmask.query.strategies.badge import badge_select
from fmask.query.strategies.kcenter import kcenter_greedy

SIDES = ("kcenter-chunked", "kcenter-full-matrix", "badge-factorized", "badge-explicit")


# ---------------------------------------------------------------- baselines that materialize


def kcenter_full_matrix(candidates: torch.Tensor, labeled: torch.Tensor, batch: int) -> list[int]:
    """Farthest-first from the labeled set over a full N x (N + L) squared-distance matrix."""
    n = candidates.shape[0]
    x = candidates.double()
    everything = torch.cat([x, labeled.double()])
    x_sq = (x * x).sum(dim=1)
    all_sq = (everything * everything).sum(dim=1)
    distances = x @ everything.T
    distances.mul_(-2.0).add_(x_sq[:, None]).add_(all_sq[None, :]).clamp_(min=0.0)
    nearest = distances[:, n:].min(dim=1).values
    chosen: list[int] = []
    for _ in range(batch):
        pick = int(torch.argmax(nearest).item())
        chosen.append(pick)
        torch.minimum(nearest, distances[:, pick], out=nearest)
        nearest[pick] = float("-inf")
    return chosen


def badge_explicit(probs: torch.Tensor, features: torch.Tensor, batch: int, generator: torch.Generator) -> list[int]:
    """BADGE's k-means++ on the materialized N x (C·E) gradient embeddings."""
    n = features.shape[0]
    residuals = probs.double().clone()
    residuals[torch.arange(n, device=probs.device), residuals.argmax(dim=1)] -= 1.0
    embeddings = (residuals[:, :, None] * features.double()[:, None, :]).reshape(n, -1)
    sq_norms = torch.einsum("ij,ij->i", embeddings, embeddings)

    def to(center: int) -> torch.Tensor:  # distances from the materialized embeddings
        return (sq_norms + sq_norms[center] - 2.0 * (embeddings @ embeddings[center])).clamp_(min=0.0)

    return kmeans_plus_plus(sq_norms, to, batch, generator=generator)[0]  # fmask's seeding: only distances differ


# ---------------------------------------------------------------- one side, in its own process


def make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded float32 inputs shaped like a real query: ReLU embeddings, softmax probabilities."""
    generator = torch.Generator().manual_seed(args.seed)
    candidates = torch.randn(args.n, args.e, generator=generator).clamp_(min=0.0)
    labeled = torch.randn(args.labeled, args.e, generator=generator).clamp_(min=0.0)
    probs = torch.softmax(3.0 * torch.randn(args.n, args.c, generator=generator), dim=1)
    return candidates.to(device), labeled.to(device), probs.to(device)


def run_side(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    candidates, labeled, probs = make_inputs(args, device)
    # Warm up kernels and allocator on a small slice so the timing covers the algorithm only.
    small = slice(0, min(args.n, 64))
    kcenter_greedy(candidates[small], labeled[:8], 4, chunk_size=args.chunk_size)
    badge_select(probs[small], candidates[small], 4, generator=torch.Generator().manual_seed(0))
    kcenter_full_matrix(candidates[small], labeled[:8], 4)
    badge_explicit(probs[small], candidates[small], 4, torch.Generator().manual_seed(0))
    memory = PeakMemory(device)

    start = time.perf_counter()
    if args.side == "kcenter-chunked":
        chosen = kcenter_greedy(candidates, labeled, args.batch, chunk_size=args.chunk_size, device=device)[0]
    elif args.side == "kcenter-full-matrix":
        chosen = kcenter_full_matrix(candidates, labeled, args.batch)
    elif args.side == "badge-factorized":
        generator = torch.Generator().manual_seed(args.seed)
        chosen = badge_select(probs, candidates, args.batch, generator=generator, chunk_size=args.chunk_size)[0]
    else:
        chosen = badge_explicit(probs, candidates, args.batch, torch.Generator().manual_seed(args.seed))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"side": args.side, "seconds": seconds, "peak_extra_bytes": memory.extra_bytes(), "chosen": chosen}


# ---------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    parser = side_parser(__doc__.split("\n\n")[0], sides=SIDES, n=20_000, e_help="penultimate embedding width",
                         labeled_help="labeled samples (k-center's initial centers)", batch=100)
    parser.add_argument("--chunk-size", type=int, default=4096, help="fmask's rows per distance block")
    args = parser.parse_args()
    if args.labeled < 1:
        parser.error("--labeled must be at least 1: the k-center baseline starts from labeled centers")
    return args


def main() -> None:
    args = parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    results = {side: run_side_process("benchmarks.diversity", side, args) for side in SIDES}

    for ours, theirs in (("kcenter-chunked", "kcenter-full-matrix"), ("badge-factorized", "badge-explicit")):
        assert results[ours]["chosen"] == results[theirs]["chosen"], f"{ours} and {theirs} selected differently"
        assert len(set(results[ours]["chosen"])) == args.batch

    print(
        f"N={args.n} E={args.e} C={args.c} labeled={args.labeled} batch={args.batch} device={args.device} "
        f"chunk={args.chunk_size} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"{'side':<22}{'time (s)':>10}{'peak extra (MiB)':>18}")
    for side in SIDES:
        r = results[side]
        print(f"{side:<22}{r['seconds']:>10.2f}{r['peak_extra_bytes'] / 2**20:>18.1f}")
    for name, ours, theirs in (
        ("k-center", "kcenter-chunked", "kcenter-full-matrix"),
        ("BADGE", "badge-factorized", "badge-explicit"),
    ):
        a, b = results[ours], results[theirs]
        print(
            f"{name}: identical selections; baseline/fmask time ratio {b['seconds'] / a['seconds']:.1f}x, "
            f"peak-memory ratio {b['peak_extra_bytes'] / max(a['peak_extra_bytes'], 1):.1f}x"
        )


if __name__ == "__main__":
    main()
