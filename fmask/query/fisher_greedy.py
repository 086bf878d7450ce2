"""Fisher-greedy batch selection: the BAIT objective (Ash et al. 2021) that FisherMask's eq. (12) uses.

Every candidate x has an embedding V_x (r x D): one row per class y, sqrt(p_y(x)) * grad log p_y(x) restricted to
D parameters. With M the Fisher of what is labeled or already picked and F the pool Fisher, the greedy step is

    x* = argmax_x tr( V_x M^-1 F M^-1 V_x^T (I + V_x M^-1 V_x^T)^-1 ),   then   M <- M + V_x*^T V_x*,

i.e. the pick that lowers tr(F M^-1) the most. Rescoring every candidate from dense D x D matrices costs
O(N r D^2) per pick. This engine keeps, per candidate, the r x r matrices G_x = V_x A V_x^T and
H_x = V_x A F A V_x^T (A = M^-1) and moves them, and A, by the rank-r Woodbury step of each pick: O(N D r^2 + D^2 r)
per pick, exactly the same choices up to rounding.

Conventions follow the authors' (BAIT's) code: candidates are scaled by sqrt(batch / (L + batch)),
M_0 = lamb * I + (L / (L + batch)) * mean_l(V_l^T V_l), and when no ``fisher`` is given F is the mean of V^T V over
pool and labeled embeddings *unscaled*. ``m0="fisher"`` starts instead from the paper's eq. (2),
M_0 = lamb * (F + rho I) + (L / (L + batch)) * mean_l(V_l^T V_l), F then kept dense; the ridge
rho = M0_FISHER_RIDGE * tr(F) / D makes M_0 invertible when F is rank-deficient (fewer embedding rows than D, or
parameters no sample moves) and is negligible otherwise. That start is ill-conditioned (cond ~ 1 / rho), which
made the Woodbury updates drift and the guard rebuild A every few picks; so the problem is whitened once instead:
with lamb (F + rho I) = C C^T (Cholesky, float64), V' = V C^-T and F' = C^-1 F C^-T turn M into C M' C^T with
M' = I + (the same labeled and picked terms in V'), and every score tr(V M^-1 F M^-1 V^T (I + V M^-1 V^T)^-1)
into the same expression in V', M', F'. The greedy then runs the well-conditioned lamb = 1 identity start on the
whitened rows: the same picks and gains, exactly in exact arithmetic. Ties go to the lowest position (scores within a few ulps count as tied).
With ``backward_steps`` the engine picks 2 x batch forward, then greedily drops the pick whose removal raises
tr(F M^-1) least until ``batch`` remain (BAIT's oversample-then-prune).

In float32 a guard watches for drift: each pick's incrementally kept G, H are compared with their exact values
(free: the update needs them anyway), and A is checked against M on a fixed probe vector (y = M z is tracked
exactly); past the tolerance the engine recomputes G, H (or rebuilds A from M) and rescores that step.

This is the engine behind the ``fishermask`` and ``bait`` strategies (their shared ``select`` is
:func:`select_by_fisher_greedy`); they differ only in the embeddings they hand it. One code path serves one process
and a torch.distributed process group: each rank holds a contiguous block of the candidates (embeddings, G_x, H_x)
and of the labeled set; A, F, the probe and the picks' rows are replicated. F and the labeled part of M are sums
over the ranks (all-reduced: equal to one process's up to the order of additions), each step agrees on the best
(score, lowest global position) with two small all-gathers, the winner's V_x is broadcast from its owner and every
rank applies the same Woodbury step. In one process every exchange is the identity (fmask.core.distributed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Optional

import torch

from fmask.core import distributed
from fmask.core.device import format_bytes, usable_memory_bytes
from fmask.core.errors import FmaskError
from fmask.core.progress import ProgressFn
from fmask.query.base import GreedyOptions, QueryContext, Selection, greedy_options

FisherMode = Literal["auto", "dense", "factored"]
M0 = Literal["identity", "fisher"]
M0_FISHER_RIDGE = 1e-6  # relative to F's mean diagonal; see the module docstring

_MAX_CHUNK_ROWS = 8192  # rows of chunk x r per matmul: past this, bigger chunks no longer speed anything up
_PROBE_SEED = 20240503  # fixed so the guard (and so the selection) is reproducible
DEFAULT_SHRINK_HINT = "a smaller --sparsity (fewer masked parameters)"  # what lowers D, for fishermask


# ----------------------------------------------------------------------------------------------------------------
# Memory planning


@dataclass(frozen=True)
class FisherGreedyPlan:
    """How the engine will run: chosen before any work so a configuration that cannot fit fails early."""

    dense_fisher: bool  # F kept as a dense D x D matrix; otherwise applied as V^T (V X) / n
    chunk_size: int  # candidates per chunk in every pass over the pool
    resident: bool  # embeddings copied once to the device in the compute dtype (else converted per chunk)
    bytes_needed: int  # estimated peak of the engine's own allocations on the device
    memory_limit: int


def default_memory_limit(device: torch.device | str) -> int:
    """The --memory-limit in force, else a share of what the device has free: 80% of free GPU memory, 60% of
    available RAM on CPU (fmask.core.device.usable_memory_bytes)."""
    return usable_memory_bytes(device)


def estimate_memory(
    num_candidates: int,
    rank: int,
    dim: int,
    num_labeled: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    dense_fisher: bool = True,
    fisher_copy: bool = True,
    chunk_size: int = 1,
    resident_copy: bool = False,
) -> int:
    """Peak bytes the engine allocates on its device for these shapes (inputs already held are not counted).

    ``fisher_copy``: the dense F is built or copied (False when a given ``fisher`` is already on the device in
    ``dtype``). ``resident_copy``: pool and labeled embeddings are copied to the device in ``dtype``; without it
    each chunk is converted on the fly.
    """
    e = torch.empty(0, dtype=dtype).element_size()
    n, r, d = num_candidates, rank, dim
    # D x D: A = M^-1, or while (re)building it (A freed first): λI and M, then M and its Cholesky factor L,
    # then L, the inverse and the working copy of L that cholesky_inverse makes on CUDA (cuSOLVER): 3 at most.
    square = 3 * d * d * e
    if dense_fisher and fisher_copy:
        square += d * d * e
    state = 5 * n * r * r * e + 16 * n  # G, H and the batched solve's workspace; masks and gains
    vectors = 12 * d * r * e + 4 * d * e  # U, F U, A F U, their Cholesky-scaled forms, the probe pair
    resident = (n + num_labeled) * r * d * e if resident_copy else 0
    # Per candidate in a chunk: V A and (V A) F (or V A V_all^T blocks of the same size), plus the converted chunk.
    per_item = 2 * r * d * e + 4 * r * r * e + (0 if resident_copy else r * d * e)
    return square + state + vectors + resident + chunk_size * per_item


def _cost_flops(n: int, num_labeled: int, r: int, d: int, steps: int, *, dense: bool) -> float:
    """Rough multiply-add count of the parts that differ between a dense F and F applied as V^T (V .)."""
    total = n + num_labeled
    if dense:  # build F, (V A) F for the first scores, F U per step
        return total * r * d * d + n * r * d * d + steps * d * d * r
    return n * r * total * r * d + steps * 2.0 * total * r * r * d


def plan_fisher_greedy(
    num_candidates: int,
    rank: int,
    dim: int,
    num_labeled: int = 0,
    *,
    steps: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_size: Optional[int] = None,
    memory_limit: Optional[int] = None,
    fisher_given: bool = False,
    fisher_on_device: bool = False,
    inputs_on_device: bool = False,
    fisher_mode: FisherMode = "auto",
    shrink_hint: str = DEFAULT_SHRINK_HINT,
) -> FisherGreedyPlan:
    """Pick F's form, the chunk size and residency so the run fits ``memory_limit``; raise FmaskError if none does.

    ``inputs_on_device``: the embeddings already sit on ``device`` in ``dtype`` (no copy is needed to keep them
    resident). ``shrink_hint`` names what lowers D for the caller (it ends up in the error message).
    """
    if memory_limit is None:
        memory_limit = default_memory_limit(device)
    if chunk_size is not None and chunk_size < 1:
        raise FmaskError(f"--chunk-size must be at least 1 (got {chunk_size})")
    n, r, d = num_candidates, rank, dim

    if fisher_given or fisher_mode == "dense":
        modes = [True]
    elif fisher_mode == "factored":
        modes = [False]
    else:
        dense_cost = _cost_flops(n, num_labeled, r, d, steps, dense=True)
        factored_cost = _cost_flops(n, num_labeled, r, d, steps, dense=False)
        modes = [True, False] if dense_cost <= factored_cost else [False, True]

    def need(dense: bool, chunk: int, resident: bool) -> int:
        return estimate_memory(
            n, r, d, num_labeled, dtype=dtype, dense_fisher=dense,
            fisher_copy=not (fisher_given and fisher_on_device), chunk_size=chunk,
            resident_copy=resident and not inputs_on_device,
        )

    cap = max(1, min(n, _MAX_CHUNK_ROWS // max(r, 1)))
    for dense in modes:
        # Residency first: it saves a conversion per chunk per pick; then streaming, which needs less memory.
        for resident in ([True, False] if not inputs_on_device else [True]):
            if chunk_size is not None:
                if need(dense, chunk_size, resident) <= memory_limit:
                    return FisherGreedyPlan(dense, chunk_size, resident, need(dense, chunk_size, resident),
                                            memory_limit)
                continue
            base = need(dense, 0, resident)
            per_item = need(dense, 1, resident) - base
            fit = (memory_limit - base) // per_item if memory_limit > base else 0
            if fit >= 1:
                chunk = int(min(cap, fit))
                return FisherGreedyPlan(dense, chunk, resident, need(dense, chunk, resident), memory_limit)

    limit = format_bytes(memory_limit)
    smallest = min(need(dense, 1, False) for dense in modes)
    if chunk_size is not None and smallest <= memory_limit:
        best = max(
            (memory_limit - need(dense, 0, False)) // (need(dense, 1, False) - need(dense, 0, False))
            for dense in modes
        )
        raise FmaskError(
            f"--chunk-size {chunk_size} needs about {format_bytes(min(need(m, chunk_size, False) for m in modes))} "
            f"for the Fisher-greedy step, over the {limit} memory limit; use --chunk-size {best} or less"
        )
    wider = " or drop --float64," if dtype == torch.float64 else ","
    raise FmaskError(
        f"Fisher-greedy selection with D={d} needs about {format_bytes(smallest)} on {torch.device(device)} "
        f"(D x D matrices; even at --chunk-size 1), over the {limit} memory limit: use {shrink_hint}"
        f"{wider} raise --memory-limit, or run on a device with more memory"
    )


# ----------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class FisherGreedyResult:
    positions: list[int]  # into ``pool``, in selection order (after pruning, in the order they were picked)
    gains: list[float]  # how much each pick lowered tr(F M^-1) when it was added
    refreshes: int = 0  # times the guard recomputed every candidate's G, H from A
    rebuilds: int = 0  # times the guard rebuilt A = M^-1 from M
    plan: Optional[FisherGreedyPlan] = None


@dataclass(frozen=True)
class FisherGreedyOptions:
    """How :func:`fisher_greedy` runs; every field has a default, so callers name only what they change.

    ``lamb``: the ridge of M_0. ``fisher`` (D, D, symmetric): F; default the unscaled mean V^T V over pool and
    labeled. ``backward_steps``: pick 2 x batch, then prune. ``dtype``: default float64 for a float64 pool, else
    float32. ``chunk_size``: candidates per chunk (default: planned). ``device``: default the pool's.
    ``memory_limit`` (bytes): default :func:`default_memory_limit`. ``guard_tol``: the relative drift the float
    guard allows (default 10 * sqrt(eps); 0 recomputes everything every step, inf never checks). ``fisher_mode``:
    F dense, factored (V^T (V .)) or whichever is cheaper (auto; always dense under a process group).
    ``shrink_hint``: what lowers D for the caller, named in the out-of-memory message. ``m0``: "identity" starts
    from lamb I (the authors' code), "fisher" from lamb F (the paper's eq. 2). ``progress``: (task, done, total).
    """

    lamb: float = 1.0
    fisher: Optional[torch.Tensor] = None
    backward_steps: bool = False
    dtype: Optional[torch.dtype] = None
    chunk_size: Optional[int] = None
    device: Optional[torch.device | str] = None
    memory_limit: Optional[int] = None
    guard_tol: Optional[float] = None
    fisher_mode: FisherMode = "auto"
    shrink_hint: str = DEFAULT_SHRINK_HINT
    m0: M0 = "identity"
    progress: Optional[ProgressFn] = None


def fisher_greedy(pool: torch.Tensor, batch: int, labeled: Optional[torch.Tensor] = None,
                  options: Optional[FisherGreedyOptions] = None, **fields: Any) -> list[int]:
    """Greedily pick ``batch`` distinct positions of ``pool`` (N, r, D) by the BAIT objective; see the module doc.

    ``labeled`` (L, r, D) enters M_0. ``options`` (or its fields as keywords, e.g. ``lamb=0.5``): see
    :class:`FisherGreedyOptions`. Returns positions into ``pool`` in selection order.

    Under a torch.distributed process group the call is collective: every rank passes its own block of the
    candidates and of the labeled set (fmask.core.distributed.shard), and every rank gets the same positions,
    global ones (into the rank-ordered concatenation of the blocks, i.e. the full pool's order). In one process
    the block is the whole pool.
    """
    return fisher_greedy_detailed(pool, batch, labeled, options, **fields).positions


def fisher_greedy_detailed(pool: torch.Tensor, batch: int, labeled: Optional[torch.Tensor] = None,
                           options: Optional[FisherGreedyOptions] = None, **fields: Any) -> FisherGreedyResult:
    """:func:`fisher_greedy`, also returning each pick's gain, the guard's counters and the memory plan."""
    opts = replace(options or FisherGreedyOptions(), **fields)  # an unknown field is a TypeError
    if labeled is not None and labeled.dim() == 3 and labeled.shape[0] == 0:
        labeled = None
    # Every rank's block shapes first (just this one in one process), so a bad call is refused by every rank
    # alike and none is left waiting in a collective.
    shapes = distributed.all_gather_objects((tuple(pool.shape), None if labeled is None else tuple(labeled.shape)))
    if len({shape[1:] for shape, _ in shapes}) != 1:
        raise FmaskError(f"the ranks' candidate embeddings differ in shape: {[shape for shape, _ in shapes]}")
    blocks = _Blocks(counts=[shape[0] for shape, _ in shapes],
                     num_labeled=sum(shape[0] for _, shape in shapes if shape is not None))
    _validate(pool, batch, blocks.total, labeled, opts.lamb, opts.fisher)
    _, r, d = pool.shape
    device = _normalize_device(pool.device if opts.device is None else opts.device)
    dtype = opts.dtype or (torch.float64 if pool.dtype == torch.float64 else torch.float32)
    inputs_on_device = pool.device == device and pool.dtype == dtype and (
        labeled is None or (labeled.device == device and labeled.dtype == dtype)
    )
    _fisher_mode(opts)  # an unknown m0 is refused even for an empty batch
    if batch == 0:
        return FisherGreedyResult([], [])
    try:
        plan, refusal = plan_selection(pool.shape[0], r, d, 0 if labeled is None else labeled.shape[0], batch=batch,
                                       total_candidates=blocks.total, options=opts, device=device, dtype=dtype,
                                       inputs_on_device=inputs_on_device), None
    except FmaskError as exc:
        plan, refusal = None, str(exc)
    # A rank whose memory cannot hold its part refuses on every rank (none is left waiting in a collective).
    refusals = [line for line in distributed.all_gather_objects(refusal) if line]
    if refusals:
        raise FmaskError(refusals[0])
    guard_tol = 10.0 * math.sqrt(torch.finfo(dtype).eps) if opts.guard_tol is None else opts.guard_tol
    with torch.no_grad():  # embeddings may arrive with autograd history; none of this needs it
        lamb, fisher = opts.lamb, opts.fisher
        if opts.m0 == "fisher":
            pool, labeled, fisher = _whiten_by_fisher_start(pool, labeled, blocks, opts, plan, dtype, device)
            lamb = 1.0
        engine = _Engine(pool, labeled, blocks, batch, lamb, fisher, plan, dtype, device, guard_tol, opts.progress)
        return engine.run(_forward_count(batch, blocks.total, opts.backward_steps))


def _whiten_by_fisher_start(pool: torch.Tensor, labeled: Optional[torch.Tensor], blocks: _Blocks,
                            opts: FisherGreedyOptions, plan: FisherGreedyPlan, dtype: torch.dtype,
                            device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(V', labeled V', F') of the whitened problem (module docstring): rows V C^-T, F' = C^-1 F C^-T with
    C C^T = lamb (F + rho I). Factor and solves in float64, results in ``dtype``: on ``device`` where the plan keeps
    the embeddings resident (they stand in for the engine's resident copy), else beside the inputs.

    F is the given one, else the unscaled mean V^T V over every rank's pool and labeled rows (summed over the ranks,
    so C is the same on each)."""
    d, chunk, work = pool.shape[2], plan.chunk_size, torch.float64
    parts = [pool] + ([labeled] if labeled is not None else [])
    total = sum(part.shape[0] for part in parts)
    if opts.fisher is not None:
        fisher = opts.fisher.to(device=device, dtype=work)
    else:
        fisher = _mean_outer_product([_Embeddings(part, work, device, resident=False) for part in parts], chunk,
                                     blocks.total + blocks.num_labeled, opts.progress)
    # Two D x D float64 steps with no natural progress (a Cholesky, two triangular solves): a line before and after.
    _report(opts.progress, "fisher-greedy: factoring lamb F", 0, 1)
    start_matrix = fisher * opts.lamb
    start_matrix.diagonal().add_(opts.lamb * M0_FISHER_RIDGE * float(fisher.diagonal().sum()) / d)
    factor, info = torch.linalg.cholesky_ex(start_matrix)
    if int(info) != 0:
        raise FmaskError("M_0 = lamb F is not positive definite on these parameters; use --m0 identity")
    del start_matrix
    whitened_fisher = torch.linalg.solve_triangular(
        factor, torch.linalg.solve_triangular(factor, fisher, upper=False).mT, upper=False)
    whitened_fisher = _symmetrize(whitened_fisher).to(dtype)
    del fisher
    _report(opts.progress, "fisher-greedy: factoring lamb F", 1, 1)
    target = device if plan.resident else pool.device
    done = 0

    def whiten(rows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        out = torch.empty(rows.shape, dtype=dtype, device=target)
        for start in range(0, rows.shape[0], chunk):
            block = rows[start : start + chunk].to(device=device, dtype=work)
            # X C^T = V, i.e. X = V C^-T, one row of V at a time in the flattened (rows, D) block.
            solved = torch.linalg.solve_triangular(factor.mT, block.reshape(-1, d), upper=True, left=False)
            out[start : start + chunk] = solved.view(block.shape).to(device=target, dtype=dtype)
            done += block.shape[0]
            _report(opts.progress, "fisher-greedy: whitening by lamb F", done, total)
        return out

    return whiten(pool), None if labeled is None else whiten(labeled), whitened_fisher


def _mean_outer_product(parts: list[_Embeddings], chunk: int, count: int,
                        progress: Optional[ProgressFn]) -> torch.Tensor:
    """F = sum of V^T V over every rank's rows of ``parts``, divided by ``count`` (D x D, in the parts' dtype)."""
    d = parts[0].tensor.shape[-1]
    dense = torch.zeros(d, d, dtype=parts[0].dtype, device=parts[0].device)
    local_total, done = sum(part.n for part in parts), 0
    for part in parts:
        for start, stop, block in part.chunks(chunk):
            flat = block.reshape(-1, d)
            dense.addmm_(flat.T, flat)
            done += stop - start
            _report(progress, "fisher-greedy: pool Fisher", done, local_total)
    distributed.all_reduce_sum(dense)
    return dense.div_(count)


def _report(progress: Optional[ProgressFn], task: str, done: int, total: int) -> None:
    if progress is not None:
        progress(task, done, total)


# The strategies' select: what bait and fishermask share.
Embed = Callable[[list[int], list[int], GreedyOptions], tuple[torch.Tensor, Optional[torch.Tensor]]]


def select_by_fisher_greedy(ctx: QueryContext, batch: int, embed: Embed, *, m0: M0 = "identity",
                            dtype: Optional[torch.dtype] = None, shrink_hint: str = DEFAULT_SHRINK_HINT) -> Selection:
    """Pick ``batch`` of ``ctx.unlabeled_ids`` with the engine, its options read from ``ctx.options`` (lamb,
    float64, backward_steps, chunk_size, memory_limit; ``dtype`` overrides float64).

    ``embed(candidates, labeled, options)`` gives this rank's embeddings (all of them in one process): its block of
    the candidates (n, r, D) and of the labeled samples (l, r, D, or None), blocks as fmask.core.distributed.shard
    cuts them. The strategies differ in ``embed`` alone.
    """
    options = greedy_options(ctx.options)
    if dtype is not None:
        options = options._replace(dtype=dtype)
    candidates, labeled = list(ctx.unlabeled_ids), list(ctx.labeled_ids)
    pool, labeled_rows = embed(candidates, labeled, options)
    result = fisher_greedy_detailed(
        pool, batch, labeled_rows, lamb=options.lamb, backward_steps=options.backward_steps, dtype=options.dtype,
        chunk_size=options.chunk_size, device=ctx.device, memory_limit=options.memory_limit, m0=m0,
        shrink_hint=shrink_hint, progress=ctx.progress,
    )
    return Selection(ids=[candidates[p] for p in result.positions], scores=result.gains)


def _forward_count(batch: int, total_candidates: int, backward_steps: bool) -> int:
    """Picks made forward: ``batch``, or 2 x batch (at most every candidate) to prune back with backward steps."""
    return min(2 * batch, total_candidates) if backward_steps else batch


def plan_selection(num_candidates: int, rank: int, dim: int, num_labeled: int, *, batch: int, total_candidates: int,
                   options: FisherGreedyOptions, device: torch.device | str, dtype: torch.dtype,
                   inputs_on_device: bool) -> FisherGreedyPlan:
    """The memory plan the engine makes for this rank's part of a selection (``num_candidates`` and
    ``num_labeled`` rows of rank x dim; ``total_candidates`` over every rank), so a caller can fail before building
    any embedding."""
    forward_count = _forward_count(batch, total_candidates, options.backward_steps)
    fisher, device = options.fisher, _normalize_device(device)
    return plan_fisher_greedy(
        num_candidates, rank, dim, num_labeled, steps=2 * forward_count - batch, dtype=dtype, device=device,
        chunk_size=options.chunk_size, memory_limit=options.memory_limit, fisher_given=fisher is not None,
        fisher_on_device=fisher is not None and fisher.device == device and fisher.dtype == dtype,
        inputs_on_device=inputs_on_device, fisher_mode=_fisher_mode(options), shrink_hint=options.shrink_hint,
    )


def _fisher_mode(options: FisherGreedyOptions) -> FisherMode:
    """F's form as asked, dense where m0=fisher or a process group needs it; refuses what cannot run."""
    if options.m0 not in ("identity", "fisher"):
        raise FmaskError(f"unknown --m0 {options.m0!r}; use identity or fisher")
    if options.m0 == "fisher":
        if options.fisher_mode == "factored":
            raise FmaskError("m0=fisher starts from lamb F and needs F dense; drop fisher_mode='factored'")
        return "dense"
    if distributed.is_distributed():
        return "dense"  # applying F as V^T (V .) would need every rank's embeddings at every step
    return options.fisher_mode


def _normalize_device(device: torch.device | str) -> torch.device:
    """"cuda" and "cuda:0" name the same device; compare tensors' devices against the indexed form."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _validate(pool: torch.Tensor, batch: int, total: int, labeled: Optional[torch.Tensor], lamb: float,
              fisher: Optional[torch.Tensor]) -> None:
    """``total``: the candidates of every rank (``pool``'s in one process)."""
    if pool.dim() != 3 or not pool.is_floating_point():
        raise FmaskError(f"candidate embeddings must be a float tensor (N, r, D); got {tuple(pool.shape)} "
                         f"{pool.dtype}")
    _, r, d = pool.shape
    if r < 1 or d < 1:
        raise FmaskError(f"candidate embeddings {tuple(pool.shape)} are empty; every candidate needs r, D >= 1")
    if not 0 <= batch <= total:
        raise FmaskError(f"cannot select {batch} of {total} candidates; ask for between 0 and {total}")
    if labeled is not None and (labeled.dim() != 3 or tuple(labeled.shape[1:]) != (r, d)):
        raise FmaskError(f"labeled embeddings {tuple(labeled.shape)} do not match the candidates' (L, {r}, {d})")
    if fisher is not None and tuple(fisher.shape) != (d, d):
        raise FmaskError(f"fisher {tuple(fisher.shape)} must be ({d}, {d}) to match the embeddings")
    if not (lamb > 0 and math.isfinite(lamb)):
        raise FmaskError(f"lamb must be a positive number (got {lamb}); set --lamb, e.g. 1.0")


class _Embeddings:
    """Chunked access to an (n, r, D) tensor in the compute dtype on the compute device."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, resident: bool) -> None:
        self.tensor = tensor.to(device=device, dtype=dtype) if resident else tensor
        self.dtype, self.device = dtype, device
        self.n = tensor.shape[0]

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop].to(device=self.device, dtype=self.dtype)

    def rows(self, index: list[int]) -> torch.Tensor:
        return self.tensor[index].to(device=self.device, dtype=self.dtype)

    def chunks(self, size: int):
        for start in range(0, self.n, size):
            stop = min(start + size, self.n)
            yield start, stop, self.block(start, stop)


class _FisherOperator:
    """F as a dense D x D matrix or as (1/n) sum_j V_j^T V_j applied without forming it."""

    def __init__(self, parts: list[_Embeddings], dense: Optional[torch.Tensor], chunk: int) -> None:
        self.parts, self.dense, self.chunk = parts, dense, chunk
        self.count = sum(p.n for p in parts)

    def apply_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x @ F for x (k, D), i.e. (F x^T)^T: F is symmetric, and the wide product is the faster GEMM."""
        if self.dense is not None:
            return x @ self.dense
        out = torch.zeros_like(x)
        for part in self.parts:
            for _, _, block in part.chunks(self.chunk):
                flat = block.reshape(-1, block.shape[-1])
                out.addmm_(x @ flat.T, flat)
        return out / self.count

    def sandwich(self, p: torch.Tensor) -> torch.Tensor:
        """P_x F P_x^T for every item of p (c, r, D), as (c, r, r)."""
        c, r, d = p.shape
        flat = p.reshape(c * r, d)
        if self.dense is not None:
            return torch.bmm((flat @ self.dense).view(c, r, d), p.transpose(1, 2))
        out = torch.zeros(c, r, r, dtype=p.dtype, device=p.device)
        inner = max(1, d // max(r, 1))  # keeps each (c r) x (inner r) block about the size of p
        for part in self.parts:
            for _, _, block in part.chunks(inner):
                k = (flat @ block.reshape(-1, d).T).view(c, r, -1)
                out.add_(torch.bmm(k, k.transpose(1, 2)))
        return out / self.count


def _symmetrize(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


def _relative_gap(approx: torch.Tensor, exact: torch.Tensor) -> float:
    scale = float(torch.linalg.matrix_norm(exact))
    gap = float(torch.linalg.matrix_norm(approx - exact))
    return gap / scale if scale > 0 else gap


@dataclass(frozen=True)
class _Blocks:
    """How the candidates are split over the ranks: rank i holds global positions [sum(counts[:i]),
    sum(counts[:i+1])). One process: a single block of them all."""

    counts: list[int]
    num_labeled: int  # over every rank

    @property
    def total(self) -> int:
        return sum(self.counts)


class _Engine:
    """The greedy state over this rank's block of candidates (every candidate in one process).

    Each rank keeps its candidates' embeddings and r x r matrices G_x, H_x; replicated on every rank are
    A = M^-1, F, the guard's probe and the rows of the picks. Sums over every rank's embeddings (F, the labeled
    part of M) go through the communicator, and each step agrees on the best (score, lowest global position) and
    broadcasts the winner's row from its owner; in one process every exchange is the identity, so the arithmetic is
    exactly the single-process one.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        labeled: Optional[torch.Tensor],
        blocks: _Blocks,
        batch: int,
        lamb: float,
        fisher: Optional[torch.Tensor],
        plan: FisherGreedyPlan,
        dtype: torch.dtype,
        device: torch.device,
        guard_tol: float,
        progress: Optional[ProgressFn],
    ) -> None:
        self.plan, self.dtype, self.device = plan, dtype, device
        self.batch, self.lamb, self.guard_tol = batch, float(lamb), guard_tol
        self.progress = progress
        self.pool = _Embeddings(pool, dtype, device, plan.resident)
        self.labeled = None if labeled is None else _Embeddings(labeled, dtype, device, plan.resident)
        self.n, self.r, self.d = pool.shape
        self.owners_end = torch.tensor(blocks.counts).cumsum(0)
        self.offset = sum(blocks.counts[: distributed.rank()])  # this rank's first global position
        self.total_candidates, self.num_labeled = blocks.total, blocks.num_labeled
        # The authors' weighting: candidates scaled by sqrt(K / (L + K)), the labeled Fisher by L / (L + K).
        self.scale = math.sqrt(batch / (self.num_labeled + batch))
        self.labeled_weight = 1.0 / (self.num_labeled + batch)  # (L / (L + K)) * mean = sum / (L + K)
        self.eye_r = torch.eye(self.r, dtype=dtype, device=device)
        self.current: list[int] = []  # global positions whose V^T V is in M right now
        self.shared: dict[int, Optional[torch.Tensor]] = {}  # picks' rows received from other ranks (None: ours)
        self.refreshes = self.rebuilds = 0
        self.fisher = self._fisher_operator(fisher)
        self.a_is_scaled_identity = False
        self.A = self._initial_inverse()
        generator = torch.Generator().manual_seed(_PROBE_SEED)
        self.z = torch.randn(self.d, 1, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        self.y = self._apply_m(self.z)
        self.a_floor = self._inverse_residual()
        self.G = torch.empty(self.n, self.r, self.r, dtype=dtype, device=device)
        self.H = torch.empty_like(self.G)
        self._recompute_state(task="fisher-greedy: initial scores")
        bad = torch.tensor([0.0 if bool(torch.isfinite(self.G).all() and torch.isfinite(self.H).all()) else 1.0])
        if float(distributed.all_reduce_sum(bad)) > 0:
            raise FmaskError("the embeddings contain NaN or inf values; check the model checkpoint and its inputs")

    # -- setup ---------------------------------------------------------------------------------------------------

    def _parts(self) -> list[_Embeddings]:
        return [self.pool] + ([self.labeled] if self.labeled is not None else [])

    def _fisher_operator(self, fisher: Optional[torch.Tensor]) -> _FisherOperator:
        chunk = self.plan.chunk_size
        if fisher is not None:
            return _FisherOperator(self._parts(), fisher.to(device=self.device, dtype=self.dtype), chunk)
        if not self.plan.dense_fisher:
            return _FisherOperator(self._parts(), None, chunk)
        dense = _mean_outer_product(self._parts(), chunk, self.total_candidates + self.num_labeled, self.progress)
        return _FisherOperator(self._parts(), dense, chunk)  # symmetric up to rounding; G, H are symmetrized

    def _initial_inverse(self) -> torch.Tensor:
        if self.num_labeled == 0:
            self.a_is_scaled_identity = True  # lets the first pass skip V A: A is I / lamb
            return torch.eye(self.d, dtype=self.dtype, device=self.device) / self.lamb
        return self._invert_m()

    def _picked_chunks(self):
        """The current picks' rows, ``chunk_size`` picks at a time, flattened to (rows, D)."""
        for start in range(0, len(self.current), self.plan.chunk_size):
            yield torch.stack([self._row(p) for p in self.current[start : start + self.plan.chunk_size]]
                              ).reshape(-1, self.d)

    def _build_m(self) -> torch.Tensor:
        """M = lamb I + sum_l V_l^T V_l / (L + K) + scale^2 sum_{j current} V_j^T V_j, densely.

        The first two terms are summed over the ranks (rank 0 brings the lamb term, each rank its labeled rows)."""
        if not distributed.is_main():
            m = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        else:
            m = torch.eye(self.d, dtype=self.dtype, device=self.device) * self.lamb
        if self.labeled is not None:
            for _, _, block in self.labeled.chunks(self.plan.chunk_size):
                flat = block.reshape(-1, self.d)
                m.addmm_(flat.T, flat, alpha=self.labeled_weight)
        distributed.all_reduce_sum(m)
        for flat in self._picked_chunks():
            m.addmm_(flat.T, flat, alpha=self.scale**2)
        return m  # the Cholesky factorization reads only its lower triangle

    def _invert_m(self) -> torch.Tensor:
        factor, info = torch.linalg.cholesky_ex(self._build_m())
        if int(info) != 0:
            raise FmaskError(f"the Fisher matrix M is not positive definite in {self.dtype}; raise --lamb or use "
                             "--float64")
        return torch.cholesky_inverse(factor)

    def _apply_m(self, x: torch.Tensor) -> torch.Tensor:
        """M @ x without forming M (for the probe that checks A); summed over the ranks like :meth:`_build_m`."""
        if not distributed.is_main():
            out = torch.zeros_like(x)
        else:
            out = self.lamb * x
        if self.labeled is not None:
            for _, _, block in self.labeled.chunks(self.plan.chunk_size):
                flat = block.reshape(-1, self.d)
                out = out + self.labeled_weight * (flat.T @ (flat @ x))
        distributed.all_reduce_sum(out)
        for flat in self._picked_chunks():
            out = out + self.scale**2 * (flat.T @ (flat @ x))
        return out

    def _inverse_residual(self) -> float:
        return float(torch.linalg.vector_norm(self.A @ self.y - self.z) / torch.linalg.vector_norm(self.z))

    def _recompute_state(self, task: Optional[str] = None) -> None:
        """G_x and H_x of every candidate of this rank, from the current A."""
        s2 = self.scale**2
        for start, stop, block in self.pool.chunks(self.plan.chunk_size):
            if self.a_is_scaled_identity:
                p = block / self.lamb
            else:
                p = (block.reshape(-1, self.d) @ self.A).view(block.shape)
            self.G[start:stop] = s2 * _symmetrize(torch.bmm(block, p.transpose(1, 2)))
            self.H[start:stop] = s2 * _symmetrize(self.fisher.sandwich(p))
            if task is not None:
                self._report(task, stop, self.n)

    def _report(self, task: str, done: int, total: int) -> None:
        _report(self.progress, task, done, total)

    # -- where a candidate lives -----------------------------------------------------------------------------------

    def _owner(self, position: int) -> int:
        return int(self.owners_end.gt(position).nonzero()[0])

    def _owns(self, position: int) -> bool:
        return self.offset <= position < self.offset + self.n

    def _row(self, position: int) -> torch.Tensor:
        """V_x (r, D) of a global position on every rank: its owner's row, broadcast the first time it is asked
        for (every rank asks for the same positions in the same order: the picks)."""
        if position in self.shared:
            received = self.shared[position]
            return received if received is not None else self.pool.rows([position - self.offset])[0]
        mine = self.pool.rows([position - self.offset])[0] if self._owns(position) else None
        row = distributed.broadcast_tensor(mine, self._owner(position), shape=(self.r, self.d), dtype=self.dtype,
                                           device=self.device)
        self.shared[position] = None if self._owns(position) else row  # the owner reads its own rows again
        return row

    # -- the guard -----------------------------------------------------------------------------------------------

    def _check_inverse(self) -> bool:
        """Rebuild A from M when it drifted past the tolerance on the probe; True when it did."""
        residual = self._inverse_residual()
        # A fresh inverse already misses by eps * cond(M) (the floor): only growth well past it is drift.
        if self.guard_tol > 0 and residual <= max(self.guard_tol, 10.0 * self.a_floor):
            return False
        self._rebuild_inverse()
        return True

    def _rebuild_inverse(self) -> None:
        """A = M^-1 from a freshly built M, the probe reset, and every G, H recomputed."""
        self.A = None  # free it before the rebuild's own D x D scratch
        self.A = self._invert_m()
        self.a_is_scaled_identity = False
        self.y = self._apply_m(self.z)
        self.a_floor = self._inverse_residual()
        self.rebuilds += 1
        self._refresh()

    def _refresh(self) -> None:
        self._recompute_state()
        self.refreshes += 1

    # -- steps ---------------------------------------------------------------------------------------------------

    def _forward_gains(self) -> torch.Tensor:
        """tr(H_x (I + G_x)^-1) for this rank's candidates: how much adding x lowers tr(F M^-1)."""
        if self.n == 0:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        solved, info = torch.linalg.solve_ex(self.eye_r + self.G, self.H)
        gains = solved.diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.where(info == 0, gains, torch.full_like(gains, float("nan")))

    def _removal_costs(self, positions: list[int]) -> torch.Tensor:
        """tr(H_x (I - G_x)^-1) for x in ``positions`` (global, this rank's): how much removing x raises tr(F M^-1)."""
        if not positions:
            return torch.empty(0, dtype=self.dtype, device=self.device)
        local = [p - self.offset for p in positions]
        solved, info = torch.linalg.solve_ex(self.eye_r - self.G[local], self.H[local])
        costs = solved.diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.where(info == 0, costs, torch.full_like(costs, float("nan")))

    def _candidate_terms(self, position: int):
        """The exact terms of one candidate from the current A, kept as rows (r, D) because the wide products are
        the faster GEMMs: v, u = v A (= U^T, A symmetric), u F, G = v A v^T and H = v A F A v^T."""
        v = self.scale * self._row(position)
        u = v @ self.A
        fu = self.fisher.apply_rows(u)
        return v, u, fu, _symmetrize(v @ u.T), _symmetrize(u @ fu.T)

    def _drifted(self, position: int, g_exact: torch.Tensor, h_exact: torch.Tensor) -> bool:
        """Whether the kept G_x, H_x left their exact values; decided by the owner (which holds them)."""
        verdict = None
        if self._owns(position):
            local = position - self.offset
            gap = max(_relative_gap(self.G[local], g_exact), _relative_gap(self.H[local], h_exact))
            verdict = torch.tensor([0.0 if gap <= self.guard_tol else 1.0], dtype=torch.float64)  # NaN: drift
        return bool(distributed.broadcast_tensor(verdict, self._owner(position), shape=(1,), dtype=torch.float64,
                                                 device=torch.device("cpu"))[0] > 0)

    def _commit(self, sign: int, position: int, terms) -> bool:
        """M <- M + sign v^T v: move A, every G_x, H_x and the probe by the rank-r Woodbury step.

        Returns False when sign (sign I + G) is not positive definite (numerically), leaving everything as is.
        """
        v, u, fu, g_s, h_s = terms
        # (sign I + G)^-1 = sign (L L^T)^-1 with L L^T = sign (sign I + G) = I + sign G, positive definite.
        factor, info = torch.linalg.cholesky_ex(self.eye_r + sign * g_s)
        if int(info) != 0:
            return False

        def solve(rhs: torch.Tensor) -> torch.Tensor:  # L^-1 rhs
            return torch.linalg.solve_triangular(factor, rhs, upper=False)

        # Rows again: u_t = L^-1 U^T = (U L^-T)^T, w_t = (A F U L^-T)^T.
        u_t = solve(u)
        w_t = solve(fu @ self.A)
        k_t = solve(solve(h_s).T)  # L^-1 H_s L^-T (H_s symmetric)
        # H' = H - sign (B C^T + C B^T) + B K B^T with B = V U_t, C = V W_t; folded as H - (B E^T + E B^T),
        # E = V (sign W_t - U_t K_t / 2), so one (2r x D) product per chunk serves both G and H.
        rows = self.scale * torch.cat([u_t, sign * w_t - 0.5 * (k_t @ u_t)])
        for start, stop, block in self.pool.chunks(self.plan.chunk_size):
            both = rows @ block.reshape(-1, self.d).T  # (2r, chunk r): column x r + i is row i of candidate x
            b = both[: self.r].view(self.r, stop - start, self.r).permute(1, 2, 0)  # (chunk, i, j) = V_x U_t
            e = both[self.r :].view(self.r, stop - start, self.r).permute(1, 2, 0)
            self.G[start:stop].baddbmm_(b, b.transpose(1, 2), alpha=-sign)
            cross = torch.bmm(b, e.transpose(1, 2))
            self.H[start:stop].sub_(cross + cross.transpose(1, 2))
        self.A.addmm_(u_t.T, u_t, alpha=-sign)  # A' = A - sign U_t U_t^T, symmetric by construction
        self.a_is_scaled_identity = False
        self.y.add_(sign * (v.T @ (v @ self.z)))
        if sign > 0:
            self.current.append(position)
        else:
            self.current.remove(position)
        return True

    def _step(self, sign: int, choose) -> tuple[int, float]:
        """One guarded greedy step: choose a position from the current scores, verify it, commit it.

        Drift in the kept G, H recomputes them and chooses again; a failed commit or non-finite scores rebuild A
        from M first. After one full rebuild a second failure means the problem itself is too ill-conditioned.
        Every rank takes the same branches: they all see the same choice, verdict and (replicated) A.
        """
        guard_on = self.guard_tol != math.inf
        refreshed = guard_on and self._check_inverse()
        rebuilt = False
        while True:
            picked = choose()
            if picked is not None:
                position, score = picked
                terms = self._candidate_terms(position)
                if guard_on and not refreshed and self._drifted(position, terms[3], terms[4]):
                    self._refresh()
                    refreshed = True
                    continue
                if self._commit(sign, position, terms):
                    return position, score
            if rebuilt:
                raise FmaskError(
                    f"Fisher-greedy selection is numerically unstable in {self.dtype}; raise --lamb or use --float64"
                )
            self._rebuild_inverse()
            refreshed = rebuilt = True

    def _agree_on_best(self, values: torch.Tensor, scores: torch.Tensor, nonfinite: bool,
                       positions: list[int]) -> Optional[tuple[int, float]]:
        """(position, score) of the largest of every rank's ``values`` (aligned with this rank's global
        ``positions``, ascending); values within a few ulps of the best count as tied and the lowest position wins.
        None when some rank has a non-finite score. Two small all-gathers (none in one process)."""
        local_best = float(values.max()) if len(values) else -math.inf
        stats = distributed.all_gather_concat(torch.tensor([[local_best, 1.0 if nonfinite else 0.0]],
                                                           dtype=torch.float64))
        if bool((stats[:, 1] > 0).any()):
            return None
        best = torch.tensor(float(stats[:, 0].max()), dtype=self.dtype)
        threshold = (best - 32 * torch.finfo(self.dtype).eps * best.abs()).to(values.device)
        offer = [math.inf, 0.0]
        qualifying = torch.nonzero(values >= threshold) if len(values) else []
        if len(qualifying):
            index = int(qualifying[0])
            offer = [float(positions[index]), float(scores[index])]
        offers = distributed.all_gather_concat(torch.tensor([offer], dtype=torch.float64))
        winner = int(torch.argmin(offers[:, 0]))
        return int(offers[winner, 0]), float(offers[winner, 1])

    def _choose_add(self, chosen: torch.Tensor):
        mine = list(range(self.offset, self.offset + self.n))

        def choose() -> Optional[tuple[int, float]]:
            gains = self._forward_gains()
            nonfinite = not bool(torch.isfinite(gains[~chosen]).all())
            values = torch.where(chosen, torch.full_like(gains, -math.inf), gains)
            return self._agree_on_best(values, gains, nonfinite, mine)

        return choose

    def _choose_removal(self):
        def choose() -> Optional[tuple[int, float]]:
            mine = sorted(p for p in self.current if self._owns(p))  # ties go to the lowest position
            costs = self._removal_costs(mine)
            return self._agree_on_best(-costs, costs, not bool(torch.isfinite(costs).all()), mine)

        return choose

    def run(self, forward_count: int) -> FisherGreedyResult:
        chosen = torch.zeros(self.n, dtype=torch.bool, device=self.device)  # this rank's picked candidates
        order: list[int] = []
        gains: dict[int, float] = {}
        choose_add = self._choose_add(chosen)
        for step in range(forward_count):
            position, gain = self._step(+1, choose_add)
            if self._owns(position):
                chosen[position - self.offset] = True
            order.append(position)
            gains[position] = gain
            self._report("fisher-greedy: forward selection", step + 1, forward_count)
        prune_total = forward_count - self.batch
        for step in range(prune_total):
            position, _cost = self._step(-1, self._choose_removal())
            order.remove(position)
            self._report("fisher-greedy: backward pruning", step + 1, prune_total)
        return FisherGreedyResult(
            positions=order, gains=[gains[p] for p in order], refreshes=self.refreshes, rebuilds=self.rebuilds,
            plan=self.plan,
        )
