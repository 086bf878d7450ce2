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
parameters no sample moves) and is negligible otherwise. Ties go to the lowest position (scores within a few ulps count as tied).
With ``backward_steps`` the engine picks 2 x batch forward, then greedily drops the pick whose removal raises
tr(F M^-1) least until ``batch`` remain (BAIT's oversample-then-prune).

In float32 a guard watches for drift: each pick's incrementally kept G, H are compared with their exact values
(free: the update needs them anyway), and A is checked against M on a fixed probe vector (y = M z is tracked
exactly); past the tolerance the engine recomputes G, H (or rebuilds A from M) and rescores that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from fmask.core.device import format_bytes, usable_memory_bytes
from fmask.core.errors import FmaskError
from fmask.core.progress import ProgressFn

FisherMode = Literal["auto", "dense", "factored"]
M0 = Literal["identity", "fisher"]
M0_FISHER_RIDGE = 1e-6  # relative to F's mean diagonal; see the module docstring

_MAX_CHUNK_ROWS = 8192  # rows of chunk x r per matmul: past this, bigger chunks no longer speed anything up
_PROBE_SEED = 20240503  # fixed so the guard (and so the selection) is reproducible


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
    shrink_hint: str = "a smaller --sparsity (fewer masked parameters)",
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


def fisher_greedy(
    pool: torch.Tensor,
    batch: int,
    labeled: Optional[torch.Tensor] = None,
    lamb: float = 1.0,
    fisher: Optional[torch.Tensor] = None,
    *,
    backward_steps: bool = False,
    dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    memory_limit: Optional[int] = None,
    guard_tol: Optional[float] = None,
    fisher_mode: FisherMode = "auto",
    shrink_hint: str = "a smaller --sparsity (fewer masked parameters)",
    m0: M0 = "identity",
    progress: Optional[ProgressFn] = None,
) -> list[int]:
    """Greedily pick ``batch`` distinct positions of ``pool`` (N, r, D) by the BAIT objective; see the module doc.

    ``labeled`` (L, r, D) enters M_0; ``fisher`` (D, D, symmetric) defaults to the unscaled mean V^T V over pool
    and labeled.
    ``dtype`` defaults to float64 for a float64 pool, else float32. ``device`` defaults to the pool's.
    ``memory_limit`` (bytes) defaults to :func:`default_memory_limit`. ``guard_tol`` is the relative drift the
    float guard allows (default 10 * sqrt(eps); 0 recomputes everything every step, inf never checks).
    ``m0``: "identity" starts from lamb I (the authors' code), "fisher" from lamb F (the paper's eq. 2).
    Returns positions into ``pool`` in selection order.
    """
    return fisher_greedy_detailed(
        pool, batch, labeled, lamb, fisher, backward_steps=backward_steps, dtype=dtype, chunk_size=chunk_size,
        device=device, memory_limit=memory_limit, guard_tol=guard_tol, fisher_mode=fisher_mode,
        shrink_hint=shrink_hint, m0=m0, progress=progress,
    ).positions


def fisher_greedy_detailed(
    pool: torch.Tensor,
    batch: int,
    labeled: Optional[torch.Tensor] = None,
    lamb: float = 1.0,
    fisher: Optional[torch.Tensor] = None,
    *,
    backward_steps: bool = False,
    dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    memory_limit: Optional[int] = None,
    guard_tol: Optional[float] = None,
    fisher_mode: FisherMode = "auto",
    shrink_hint: str = "a smaller --sparsity (fewer masked parameters)",
    m0: M0 = "identity",
    progress: Optional[ProgressFn] = None,
) -> FisherGreedyResult:
    """:func:`fisher_greedy`, also returning each pick's gain, the guard's counters and the memory plan."""
    _validate(pool, batch, labeled, lamb, fisher)
    if m0 not in ("identity", "fisher"):
        raise FmaskError(f"unknown --m0 {m0!r}; use identity or fisher")
    if m0 == "fisher":
        if fisher_mode == "factored":
            raise FmaskError("m0=fisher starts from lamb F and needs F dense; drop fisher_mode='factored'")
        fisher_mode = "dense"
    n, r, d = pool.shape
    if labeled is not None and labeled.shape[0] == 0:
        labeled = None
    num_labeled = 0 if labeled is None else labeled.shape[0]
    device = _normalize_device(pool.device if device is None else device)
    if dtype is None:
        dtype = torch.float64 if pool.dtype == torch.float64 else torch.float32
    if batch == 0:
        return FisherGreedyResult([], [])
    forward_count = min(2 * batch, n) if backward_steps else batch
    steps = forward_count + (forward_count - batch)
    inputs_on_device = pool.device == device and pool.dtype == dtype and (
        labeled is None or (labeled.device == device and labeled.dtype == dtype)
    )
    plan = plan_fisher_greedy(
        n, r, d, num_labeled, steps=steps, dtype=dtype, device=device, chunk_size=chunk_size,
        memory_limit=memory_limit, fisher_given=fisher is not None,
        fisher_on_device=fisher is not None and fisher.device == device and fisher.dtype == dtype,
        inputs_on_device=inputs_on_device, fisher_mode=fisher_mode, shrink_hint=shrink_hint,
    )
    if guard_tol is None:
        guard_tol = 10.0 * math.sqrt(torch.finfo(dtype).eps)
    with torch.no_grad():  # embeddings may arrive with autograd history; none of this needs it
        engine = _Engine(pool, labeled, batch, lamb, fisher, plan, dtype, device, guard_tol, progress, m0)
        return engine.run(forward_count)


def _normalize_device(device: torch.device | str) -> torch.device:
    """"cuda" and "cuda:0" name the same device; compare tensors' devices against the indexed form."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _validate(
    pool: torch.Tensor, batch: int, labeled: Optional[torch.Tensor], lamb: float, fisher: Optional[torch.Tensor]
) -> None:
    if pool.dim() != 3 or not pool.is_floating_point():
        raise FmaskError(f"candidate embeddings must be a float tensor (N, r, D); got {tuple(pool.shape)} "
                         f"{pool.dtype}")
    n, r, d = pool.shape
    if r < 1 or d < 1:
        raise FmaskError(f"candidate embeddings {tuple(pool.shape)} are empty; every candidate needs r, D >= 1")
    if not 0 <= batch <= n:
        raise FmaskError(f"cannot select {batch} of {n} candidates; ask for between 0 and {n}")
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


class _Engine:
    def __init__(
        self,
        pool: torch.Tensor,
        labeled: Optional[torch.Tensor],
        batch: int,
        lamb: float,
        fisher: Optional[torch.Tensor],
        plan: FisherGreedyPlan,
        dtype: torch.dtype,
        device: torch.device,
        guard_tol: float,
        progress: Optional[ProgressFn],
        m0: M0 = "identity",
    ) -> None:
        self.plan, self.dtype, self.device = plan, dtype, device
        self.m0 = m0
        self.batch, self.lamb, self.guard_tol = batch, float(lamb), guard_tol
        self.progress = progress
        self.pool = _Embeddings(pool, dtype, device, plan.resident)
        self.labeled = None if labeled is None else _Embeddings(labeled, dtype, device, plan.resident)
        self.n, self.r, self.d = pool.shape
        self.num_labeled = 0 if labeled is None else labeled.shape[0]
        # The authors' weighting: candidates scaled by sqrt(K / (L + K)), the labeled Fisher by L / (L + K).
        self.scale = math.sqrt(batch / (self.num_labeled + batch))
        self.labeled_weight = 1.0 / (self.num_labeled + batch)  # (L / (L + K)) * mean = sum / (L + K)
        self.eye_r = torch.eye(self.r, dtype=dtype, device=device)
        self.current: list[int] = []  # positions whose V^T V is in M right now
        self.refreshes = self.rebuilds = 0
        self.fisher = self._fisher_operator(fisher)
        self.ridge = M0_FISHER_RIDGE * float(self.fisher.dense.diagonal().sum()) / self.d if m0 == "fisher" else 0.0
        self.a_is_scaled_identity = False
        self.A = self._initial_inverse()
        generator = torch.Generator().manual_seed(_PROBE_SEED)
        self.z = torch.randn(self.d, 1, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        self.y = self._apply_m(self.z)
        self.a_floor = self._inverse_residual()
        self.G = torch.empty(self.n, self.r, self.r, dtype=dtype, device=device)
        self.H = torch.empty_like(self.G)
        self._recompute_state(task="fisher-greedy: initial scores")
        if not (torch.isfinite(self.G).all() and torch.isfinite(self.H).all()):
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
        dense = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        total = self.n + self.num_labeled
        done = 0
        for part in self._parts():
            for start, stop, block in part.chunks(chunk):
                flat = block.reshape(-1, self.d)
                dense.addmm_(flat.T, flat)
                done += stop - start
                self._report("fisher-greedy: pool Fisher", done, total)
        dense /= total  # symmetric up to rounding; every G, H built from it is symmetrized
        return _FisherOperator(self._parts(), dense, chunk)

    def _initial_inverse(self) -> torch.Tensor:
        if self.labeled is None and self.m0 == "identity":
            self.a_is_scaled_identity = True  # lets the first pass skip V A: A is I / lamb
            return torch.eye(self.d, dtype=self.dtype, device=self.device) / self.lamb
        return self._invert_m()

    def _build_m(self) -> torch.Tensor:
        """M = lamb I (or lamb F) + sum_l V_l^T V_l / (L + K) + scale^2 sum_{j current} V_j^T V_j, densely."""
        if self.m0 == "fisher":
            m = self.fisher.dense * self.lamb  # a new tensor: F itself is left alone
            m.diagonal().add_(self.lamb * self.ridge)
        else:
            m = torch.eye(self.d, dtype=self.dtype, device=self.device) * self.lamb
        if self.labeled is not None:
            for _, _, block in self.labeled.chunks(self.plan.chunk_size):
                flat = block.reshape(-1, self.d)
                m.addmm_(flat.T, flat, alpha=self.labeled_weight)
        for start in range(0, len(self.current), self.plan.chunk_size):
            flat = self.pool.rows(self.current[start : start + self.plan.chunk_size]).reshape(-1, self.d)
            m.addmm_(flat.T, flat, alpha=self.scale**2)
        return m  # the Cholesky factorization reads only its lower triangle

    def _invert_m(self) -> torch.Tensor:
        factor, info = torch.linalg.cholesky_ex(self._build_m())
        if int(info) != 0:
            hint = "use --m0 identity (F is singular on these parameters)" if self.m0 == "fisher" else "raise --lamb"
            raise FmaskError(f"the Fisher matrix M is not positive definite in {self.dtype}; {hint} or use --float64")
        return torch.cholesky_inverse(factor)

    def _apply_m(self, x: torch.Tensor) -> torch.Tensor:
        """M @ x without forming M (for the probe that checks A)."""
        out = self.lamb * (self.fisher.dense @ x + self.ridge * x if self.m0 == "fisher" else x)
        if self.labeled is not None:
            for _, _, block in self.labeled.chunks(self.plan.chunk_size):
                flat = block.reshape(-1, self.d)
                out = out + self.labeled_weight * (flat.T @ (flat @ x))
        for start in range(0, len(self.current), self.plan.chunk_size):
            flat = self.pool.rows(self.current[start : start + self.plan.chunk_size]).reshape(-1, self.d)
            out = out + self.scale**2 * (flat.T @ (flat @ x))
        return out

    def _inverse_residual(self) -> float:
        return float(torch.linalg.vector_norm(self.A @ self.y - self.z) / torch.linalg.vector_norm(self.z))

    def _recompute_state(self, task: Optional[str] = None) -> None:
        """G_x and H_x of every candidate, from the current A."""
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
        if self.progress is not None:
            self.progress(task, done, total)

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
        """tr(H_x (I + G_x)^-1): how much adding x lowers tr(F M^-1)."""
        solved, info = torch.linalg.solve_ex(self.eye_r + self.G, self.H)
        gains = solved.diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.where(info == 0, gains, torch.full_like(gains, float("nan")))

    def _removal_costs(self, positions: list[int]) -> torch.Tensor:
        """tr(H_x (I - G_x)^-1) for x in ``positions``: how much removing x raises tr(F M^-1)."""
        solved, info = torch.linalg.solve_ex(self.eye_r - self.G[positions], self.H[positions])
        costs = solved.diagonal(dim1=-2, dim2=-1).sum(-1)
        return torch.where(info == 0, costs, torch.full_like(costs, float("nan")))

    def _candidate_terms(self, position: int):
        """The exact terms of one candidate from the current A, kept as rows (r, D) because the wide products are
        the faster GEMMs: v, u = v A (= U^T, A symmetric), u F, G = v A v^T and H = v A F A v^T."""
        v = self.scale * self.pool.rows([position])[0]
        u = v @ self.A
        fu = self.fisher.apply_rows(u)
        return v, u, fu, _symmetrize(v @ u.T), _symmetrize(u @ fu.T)

    def _drifted(self, position: int, g_exact: torch.Tensor, h_exact: torch.Tensor) -> bool:
        gap = max(_relative_gap(self.G[position], g_exact), _relative_gap(self.H[position], h_exact))
        return not gap <= self.guard_tol  # a NaN gap counts as drift

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

    def _choose_add(self, chosen: torch.Tensor):
        def choose() -> Optional[tuple[int, float]]:
            gains = self._forward_gains()
            if not torch.isfinite(gains[~chosen]).all():
                return None
            position = _first_best(torch.where(chosen, torch.full_like(gains, -math.inf), gains), self.dtype)
            return position, float(gains[position])

        return choose

    def _choose_removal(self):
        def choose() -> Optional[tuple[int, float]]:
            ordered = sorted(self.current)  # ties go to the lowest position
            costs = self._removal_costs(ordered)
            if not torch.isfinite(costs).all():
                return None
            index = _first_best(-costs, self.dtype)
            return ordered[index], float(costs[index])

        return choose

    def run(self, forward_count: int) -> FisherGreedyResult:
        chosen = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        order: list[int] = []
        gains: dict[int, float] = {}
        choose_add = self._choose_add(chosen)
        for step in range(forward_count):
            position, gain = self._step(+1, choose_add)
            chosen[position] = True
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


def _first_best(values: torch.Tensor, dtype: torch.dtype) -> int:
    """Index of the largest value; values within a few ulps of it count as tied and the lowest index wins."""
    best = values.max()
    tolerance = 32 * torch.finfo(dtype).eps * best.abs()
    return int(torch.nonzero(values >= best - tolerance)[0])
