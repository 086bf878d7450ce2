"""The Fisher-greedy engine with its per-candidate state sharded over a torch.distributed process group.

Each rank holds a contiguous block of the candidates (their embeddings and their r x r matrices G_x, H_x) and
optionally a block of the labeled set. Replicated on every rank: A = M^-1 (D x D), the dense pool Fisher F, the
guard's probe and the rows of the picks. Per greedy step:

* every rank scores its own candidates; the best (score, global position) is agreed with two small gathers that
  reproduce the single-process rule exactly (the best score, then the lowest global position within a few ulps
  of it);
* the winner's V_x is broadcast from its owner; every rank then does the same rank-r Woodbury step on A and on
  its own G, H (the arithmetic of :mod:`fmask.query.fisher_greedy`, reused, not re-implemented);
* the float guard's drift test runs on the owner (which holds G_x, H_x) and its verdict is broadcast.

F and the labeled part of M are sums over every rank's embeddings, so they are all-reduced: they equal the
single-process values up to the order of additions, and the selection is the same unless two candidates are
within rounding of each other (where either engine's choice is arbitrary anyway). F is always kept dense here
(applying it as V^T(V .) would need every rank's embeddings at every step).

Positions are global: into the concatenation of the ranks' candidate blocks in rank order, which is the order of
the full pool when the blocks come from :func:`fmask.core.distributed.shard`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fmask.core import distributed
from fmask.core.errors import FmaskError
from fmask.core.progress import ProgressFn
from fmask.query.fisher_greedy import (_PROBE_SEED, FisherGreedyPlan, FisherGreedyResult, _Embeddings, _Engine,
                                       _FisherOperator, _normalize_device, _symmetrize, _validate,
                                       fisher_greedy_detailed, plan_fisher_greedy)


class _ShardedEngine(_Engine):
    """_Engine over this rank's block of candidates; every method that needs other ranks is overridden."""

    def __init__(self, pool: torch.Tensor, labeled: Optional[torch.Tensor], batch: int, lamb: float,
                 fisher: Optional[torch.Tensor], plan: FisherGreedyPlan, dtype: torch.dtype, device: torch.device,
                 guard_tol: float, progress: Optional[ProgressFn], *, counts: list[int], total_labeled: int) -> None:
        # The parent's setup, with the global counts where it uses the local ones.
        self.plan, self.dtype, self.device = plan, dtype, device
        self.batch, self.lamb, self.guard_tol = batch, float(lamb), guard_tol
        self.progress = progress
        self.pool = _Embeddings(pool, dtype, device, plan.resident)
        has_labeled = labeled is not None and labeled.shape[0] > 0
        self.labeled = _Embeddings(labeled, dtype, device, plan.resident) if has_labeled else None
        self.n, self.r, self.d = pool.shape
        # Rank i holds global positions [ends[i] - counts[i], ends[i]).
        self.owners_end = torch.tensor(counts).cumsum(0)
        self.offset, self.total_candidates = sum(counts[: distributed.rank()]), sum(counts)
        self.num_labeled = total_labeled
        self.scale = math.sqrt(batch / (total_labeled + batch))
        self.labeled_weight = 1.0 / (total_labeled + batch)
        self.eye_r = torch.eye(self.r, dtype=dtype, device=device)
        self.current: list[int] = []
        self.refreshes = self.rebuilds = 0
        self.picked_rows: dict[int, torch.Tensor] = {}  # global position -> V_x (r, D), replicated
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

    # -- sums over every rank ------------------------------------------------------------------------------------

    def _fisher_operator(self, fisher: Optional[torch.Tensor]) -> _FisherOperator:
        chunk = self.plan.chunk_size
        if fisher is not None:
            return _FisherOperator(self._parts(), fisher.to(device=self.device, dtype=self.dtype), chunk)
        dense = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        local_total = self.n + (self.labeled.n if self.labeled is not None else 0)
        done = 0
        for part in self._parts():
            for start, stop, block in part.chunks(chunk):
                flat = block.reshape(-1, self.d)
                dense.addmm_(flat.T, flat)
                done += stop - start
                self._report("fisher-greedy: pool Fisher", done, local_total)
        distributed.all_reduce_sum(dense)
        dense /= self.total_candidates + self.num_labeled
        return _FisherOperator(self._parts(), dense, chunk)

    def _labeled_product(self, x: Optional[torch.Tensor]) -> torch.Tensor:
        """sum over every rank's labeled rows of V_l^T V_l (x is None) or V_l^T (V_l x)."""
        out = torch.zeros((self.d, self.d) if x is None else tuple(x.shape), dtype=self.dtype, device=self.device)
        if self.labeled is not None:
            for _, _, block in self.labeled.chunks(self.plan.chunk_size):
                flat = block.reshape(-1, self.d)
                if x is None:
                    out.addmm_(flat.T, flat)
                else:
                    out.add_(flat.T @ (flat @ x))
        return distributed.all_reduce_sum(out)

    def _picked(self, positions: list[int]) -> torch.Tensor:
        return torch.stack([self.picked_rows[p] for p in positions])

    def _initial_inverse(self) -> torch.Tensor:
        if self.num_labeled == 0:
            self.a_is_scaled_identity = True
            return torch.eye(self.d, dtype=self.dtype, device=self.device) / self.lamb
        return self._invert_m()

    def _build_m(self) -> torch.Tensor:
        m = torch.eye(self.d, dtype=self.dtype, device=self.device) * self.lamb
        if self.num_labeled:
            m.add_(self._labeled_product(None), alpha=self.labeled_weight)
        for start in range(0, len(self.current), self.plan.chunk_size):
            flat = self._picked(self.current[start : start + self.plan.chunk_size]).reshape(-1, self.d)
            m.addmm_(flat.T, flat, alpha=self.scale**2)
        return m

    def _apply_m(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lamb * x
        if self.num_labeled:
            out = out + self.labeled_weight * self._labeled_product(x)
        for start in range(0, len(self.current), self.plan.chunk_size):
            flat = self._picked(self.current[start : start + self.plan.chunk_size]).reshape(-1, self.d)
            out = out + self.scale**2 * (flat.T @ (flat @ x))
        return out

    # -- the winner's data, from its owner -----------------------------------------------------------------------

    def _owner(self, position: int) -> int:
        return int(self.owners_end.gt(position).nonzero()[0])

    def _owns(self, position: int) -> bool:
        return self.offset <= position < self.offset + self.n

    def _row(self, position: int) -> torch.Tensor:
        if position not in self.picked_rows:
            local = self.pool.rows([position - self.offset])[0] if self._owns(position) else None
            self.picked_rows[position] = distributed.broadcast_tensor(
                local, self._owner(position), shape=(self.r, self.d), dtype=self.dtype, device=self.device)
        return self.picked_rows[position]

    def _candidate_terms(self, position: int):
        # The parent's arithmetic; only where the row comes from differs.
        v = self.scale * self._row(position)
        u = v @ self.A
        fu = self.fisher.apply_rows(u)
        return v, u, fu, _symmetrize(v @ u.T), _symmetrize(u @ fu.T)

    def _drifted(self, position: int, g_exact: torch.Tensor, h_exact: torch.Tensor) -> bool:
        verdict = None
        if self._owns(position):
            drifted = super()._drifted(position - self.offset, g_exact, h_exact)  # G, H are indexed locally
            verdict = torch.tensor([1.0 if drifted else 0.0], dtype=torch.float64)
        return bool(distributed.broadcast_tensor(verdict, self._owner(position), shape=(1,), dtype=torch.float64,
                                                 device=torch.device("cpu"))[0] > 0)

    # -- agreeing on the best ------------------------------------------------------------------------------------

    def _agree_on_best(self, values: torch.Tensor, scores: torch.Tensor, nonfinite: bool,
                       positions: list[int]) -> Optional[tuple[int, float]]:
        """The single-process _first_best over every rank's ``values`` (aligned with global ``positions``,
        ascending): the largest value, the lowest position within the tie tolerance; ``scores`` are reported."""
        local_best = float(values.max()) if len(values) else -math.inf
        stats = distributed.all_gather_concat(torch.tensor([[local_best, 1.0 if nonfinite else 0.0]],
                                                           dtype=torch.float64))
        if bool((stats[:, 1] > 0).any()):
            return None
        best = torch.tensor(float(stats[:, 0].max()), dtype=self.dtype)
        tolerance = 32 * torch.finfo(self.dtype).eps * best.abs()
        threshold = (best - tolerance).to(values.device)
        mine = [math.inf, 0.0]
        if len(values):
            qualifying = torch.nonzero(values >= threshold)
            if len(qualifying):
                index = int(qualifying[0])
                mine = [float(positions[index]), float(scores[index])]
        offers = distributed.all_gather_concat(torch.tensor([mine], dtype=torch.float64))
        winner = int(torch.argmin(offers[:, 0]))
        return int(offers[winner, 0]), float(offers[winner, 1])

    def _choose_add(self, chosen: torch.Tensor):
        local_positions = list(range(self.offset, self.offset + self.n))

        def choose() -> Optional[tuple[int, float]]:
            gains = self._forward_gains() if self.n else torch.empty(0, dtype=self.dtype, device=self.device)
            nonfinite = not bool(torch.isfinite(gains[~chosen]).all())
            values = torch.where(chosen, torch.full_like(gains, -math.inf), gains)
            return self._agree_on_best(values, gains, nonfinite, local_positions)

        return choose

    def _choose_removal(self):
        def choose() -> Optional[tuple[int, float]]:
            mine = sorted(p for p in self.current if self._owns(p))
            costs = (self._removal_costs([p - self.offset for p in mine]) if mine
                     else torch.empty(0, dtype=self.dtype, device=self.device))
            nonfinite = not bool(torch.isfinite(costs).all())
            return self._agree_on_best(-costs, costs, nonfinite, mine)

        return choose

    def run(self, forward_count: int) -> FisherGreedyResult:
        chosen = torch.zeros(self.n, dtype=torch.bool, device=self.device)
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
        return FisherGreedyResult(positions=order, gains=[gains[p] for p in order], refreshes=self.refreshes,
                                  rebuilds=self.rebuilds, plan=self.plan)


def fisher_greedy_distributed(
    pool_shard: torch.Tensor,
    batch: int,
    labeled_shard: Optional[torch.Tensor] = None,
    lamb: float = 1.0,
    fisher: Optional[torch.Tensor] = None,
    *,
    backward_steps: bool = False,
    dtype: Optional[torch.dtype] = None,
    chunk_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    memory_limit: Optional[int] = None,
    guard_tol: Optional[float] = None,
    shrink_hint: str = "a smaller --sparsity (fewer masked parameters)",
    progress: Optional[ProgressFn] = None,
) -> FisherGreedyResult:
    """:func:`fmask.query.fisher_greedy.fisher_greedy_detailed` with each rank passing only its block of the
    candidates (``pool_shard`` (n_rank, r, D)) and of the labeled set; collective. Positions in the result are
    global (into the rank-ordered concatenation of the blocks) and the same on every rank. Not distributed: the
    single-process engine itself."""
    if not distributed.is_distributed():
        return fisher_greedy_detailed(pool_shard, batch, labeled_shard, lamb, fisher, backward_steps=backward_steps,
                                      dtype=dtype, chunk_size=chunk_size, device=device, memory_limit=memory_limit,
                                      guard_tol=guard_tol, shrink_hint=shrink_hint, progress=progress)
    if labeled_shard is not None and labeled_shard.dim() == 3 and labeled_shard.shape[0] == 0:
        labeled_shard = None
    # Every rank's shapes first, so a mismatch is refused by every rank alike (none is left in a collective).
    shapes = distributed.all_gather_objects((
        tuple(pool_shard.shape), None if labeled_shard is None else tuple(labeled_shard.shape)))
    if len({shape[1:] for shape, _ in shapes}) != 1:
        raise FmaskError(f"the ranks' candidate embeddings differ in shape: {[shape for shape, _ in shapes]}")
    counts = [shape[0] for shape, _ in shapes]
    total_candidates = sum(counts)
    total_labeled = sum(labeled[0] for _, labeled in shapes if labeled is not None)
    _validate(pool_shard, 0, labeled_shard, lamb, fisher)
    if not 0 <= batch <= total_candidates:
        raise FmaskError(f"cannot select {batch} of {total_candidates} candidates; ask for between 0 and "
                         f"{total_candidates}")
    _, r, d = pool_shard.shape
    device = _normalize_device(pool_shard.device if device is None else device)
    if dtype is None:
        dtype = torch.float64 if pool_shard.dtype == torch.float64 else torch.float32
    if batch == 0:
        return FisherGreedyResult([], [])
    forward_count = min(2 * batch, total_candidates) if backward_steps else batch
    steps = forward_count + (forward_count - batch)
    local_labeled = 0 if labeled_shard is None else labeled_shard.shape[0]
    inputs_on_device = pool_shard.device == device and pool_shard.dtype == dtype and (
        labeled_shard is None or (labeled_shard.device == device and labeled_shard.dtype == dtype))
    plan = plan_fisher_greedy(
        pool_shard.shape[0], r, d, local_labeled, steps=steps, dtype=dtype, device=device, chunk_size=chunk_size,
        memory_limit=memory_limit, fisher_given=fisher is not None,
        fisher_on_device=fisher is not None and fisher.device == device and fisher.dtype == dtype,
        inputs_on_device=inputs_on_device, fisher_mode="dense", shrink_hint=shrink_hint,
    )
    if guard_tol is None:
        guard_tol = 10.0 * math.sqrt(torch.finfo(dtype).eps)
    with torch.no_grad():
        engine = _ShardedEngine(pool_shard, labeled_shard, batch, lamb, fisher, plan, dtype, device, guard_tol,
                                progress, counts=counts, total_labeled=total_labeled)
        return engine.run(forward_count)
