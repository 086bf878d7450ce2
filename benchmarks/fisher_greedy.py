"""Fisher-greedy selection: the dense rescoring of the authors' (BAIT's) code vs fmask's incremental engine.

Both sides run on the same random instance in the same process; the script asserts they pick the same positions
and prints both times and the ratio. ``--skip-dense`` times only the incremental engine (for the paper's scale,
N=5750, r=10, D~22k, batch=500, where the dense side would take hours). ``--m0 fisher`` starts both sides from the
paper's eq. (2), M_0 = lamb (F + rho I) + the labeled Fisher (the engine whitens by it; the dense side inverts it).

    .venv/bin/python -m benchmarks.fisher_greedy                # N=1000 r=10 D=2000 batch=100, CPU, float32
    .venv/bin/python -m benchmarks.fisher_greedy --n 5750 --d 22000 --batch 500 --skip-dense
    .venv/bin/python -m benchmarks.fisher_greedy --m0 fisher --dtype float64 --labeled 100
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from fmask.query.fisher_greedy import M0_FISHER_RIDGE, fisher_greedy_detailed

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dense_rescoring_greedy(
    pool: torch.Tensor, batch: int, labeled: torch.Tensor | None, lamb: float, chunk: int = 256,
    m0: str = "identity",
) -> list[int]:
    """The baseline: every step rescores every candidate from the dense D x D matrices, O(N r D^2) per pick.

    Same conventions as the engine (scaled candidates, M_0 with the labeled Fisher, F the unscaled mean over pool
    and labeled); A = M^-1 follows each pick by the Woodbury identity, as in the authors' code.
    """
    n, r, d = pool.shape
    num_labeled = 0 if labeled is None else len(labeled)
    everything = [pool] + ([labeled] if labeled is not None else [])
    fisher = torch.zeros(d, d, dtype=pool.dtype, device=pool.device)
    for part in everything:
        for start in range(0, len(part), chunk):
            flat = part[start : start + chunk].reshape(-1, d)
            fisher.addmm_(flat.T, flat)
    fisher /= n + num_labeled
    if m0 == "fisher":  # the paper's eq. (2), with the engine's ridge
        m = lamb * (fisher + M0_FISHER_RIDGE * torch.trace(fisher) / d * torch.eye(d, dtype=pool.dtype,
                                                                                      device=pool.device))
    else:
        m = lamb * torch.eye(d, dtype=pool.dtype, device=pool.device)
    if labeled is not None:
        flat = labeled.reshape(-1, d)
        m.addmm_(flat.T, flat, alpha=1.0 / (num_labeled + batch))
    a = torch.linalg.inv(m)
    scale = math.sqrt(batch / (num_labeled + batch))
    eye = torch.eye(r, dtype=pool.dtype, device=pool.device)
    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=pool.device)
    for _ in range(batch):
        gains = torch.empty(n, dtype=pool.dtype, device=pool.device)
        for start in range(0, n, chunk):
            v = scale * pool[start : start + chunk]
            p = (v.reshape(-1, d) @ a).view(v.shape)  # V A
            g = torch.bmm(p, v.transpose(1, 2))  # V A V^T
            h = torch.bmm((p.reshape(-1, d) @ fisher).view(v.shape), p.transpose(1, 2))  # V A F A V^T
            gains[start : start + chunk] = torch.linalg.solve(eye + g, h).diagonal(dim1=-2, dim2=-1).sum(-1)
        gains[taken] = -math.inf
        best = int(torch.argmax(gains))  # first maximum: ties go to the lowest position
        chosen.append(best)
        taken[best] = True
        vb = scale * pool[best]
        u = a @ vb.T
        a -= u @ torch.linalg.solve(eye + vb @ u, u.T)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="candidates N")
    parser.add_argument("--r", type=int, default=10, help="rows per candidate (classes)")
    parser.add_argument("--d", type=int, default=2000, help="embedding dimension D")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--labeled", type=int, default=0, help="labeled samples L")
    parser.add_argument("--lamb", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--m0", choices=["identity", "fisher"], default="identity",
                        help="M_0: lamb I (the authors' code) or lamb F (the paper's eq. 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dense", action="store_true", help="time only the incremental engine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared, oversubscribed machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    # Rows of unit-ish norm with a spread of per-sample magnitudes, like gradient embeddings.
    magnitude = torch.exp(0.5 * torch.randn(args.n + args.labeled, 1, 1, generator=g))
    data = torch.randn(args.n + args.labeled, args.r, args.d, generator=g)
    data = data.mul_(magnitude / math.sqrt(args.d)).to(device=device, dtype=dtype)  # in place: no 2nd copy
    pool, labeled = data[: args.n], (data[args.n :] if args.labeled else None)
    print(f"instance: N={args.n} r={args.r} D={args.d} batch={args.batch} L={args.labeled} lamb={args.lamb} "
          f"m0={args.m0} device={device} dtype={args.dtype} threads={torch.get_num_threads()}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    phase_end: dict[str, float] = {}  # when each phase of the engine last reported progress

    def progress(task: str, done: int, total: int) -> None:
        sync()  # a phase ends when its GPU work has, not when its last kernel was queued
        phase_end[task] = time.perf_counter()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fisher_greedy_detailed(pool, args.batch, labeled, lamb=args.lamb, m0=args.m0, progress=progress)
    sync()
    incremental_s = time.perf_counter() - start
    plan = result.plan
    print(f"incremental: {incremental_s:.2f} s  (F {'dense' if plan.dense_fisher else 'factored'}, "
          f"chunk {plan.chunk_size}, guard refreshes {result.refreshes}, rebuilds {result.rebuilds}, "
          f"planned peak {plan.bytes_needed / 2**30:.2f} GiB)")
    previous = start
    for task, end in sorted(phase_end.items(), key=lambda item: item[1]):
        print(f"  {task}: {end - previous:.2f} s")
        previous = end
    if device.type == "cpu":
        print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    elif device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.skip_dense:
        return

    sync()
    start = time.perf_counter()
    dense = dense_rescoring_greedy(pool, args.batch, labeled, args.lamb, m0=args.m0)
    sync()
    dense_s = time.perf_counter() - start
    print(f"dense rescoring: {dense_s:.2f} s")
    same = dense == result.positions
    first_gap = next((i for i, (a, b) in enumerate(zip(dense, result.positions)) if a != b), None)
    print(f"same positions: {same}" + ("" if same else f" (first difference at step {first_gap})"))
    print(f"speedup: {dense_s / incremental_s:.1f}x")
    assert same, "the incremental engine and the dense rescoring disagree"


if __name__ == "__main__":
    main()
