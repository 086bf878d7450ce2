"""The incremental Fisher-greedy engine against a dense oracle that evaluates the literal formulas each step."""

import math

import pytest
import torch

from fmask.core.errors import FmaskError
from fmask.query.fisher_greedy import (
    estimate_memory,
    fisher_greedy,
    fisher_greedy_detailed,
    plan_fisher_greedy,
)


def dense_oracle(pool, batch, labeled=None, lamb=1.0, fisher=None, backward_steps=False):
    """Literal eq. (12) with M inverted from scratch every step; pruning by the literal tr(F (M - V^T V)^-1)."""
    pool = pool.double()
    n, r, d = pool.shape
    labeled = None if labeled is None else labeled.double()
    num_labeled = 0 if labeled is None else len(labeled)
    everything = pool if labeled is None else torch.cat([pool, labeled])
    if fisher is None:
        fisher = torch.einsum("nrd,nre->de", everything, everything) / len(everything)
    fisher = fisher.double()
    v = pool * math.sqrt(batch / (num_labeled + batch))
    m = lamb * torch.eye(d, dtype=torch.float64)
    if labeled is not None:
        m = m + num_labeled / (num_labeled + batch) * torch.einsum("nrd,nre->de", labeled, labeled) / num_labeled
    eye = torch.eye(r, dtype=torch.float64)
    chosen = []
    for _ in range(min(2 * batch, n) if backward_steps else batch):
        a = torch.linalg.inv(m)
        best, best_score = None, -math.inf
        for x in range(n):
            if x in chosen:
                continue
            vx = v[x]
            score = torch.trace(vx @ a @ fisher @ a @ vx.T @ torch.linalg.inv(eye + vx @ a @ vx.T)).item()
            if score > best_score:
                best, best_score = x, score
        chosen.append(best)
        m = m + v[best].T @ v[best]
    while len(chosen) > batch:
        best, best_objective = None, math.inf
        for x in sorted(chosen):
            objective = torch.trace(fisher @ torch.linalg.inv(m - v[x].T @ v[x])).item()
            if objective < best_objective:
                best, best_objective = x, objective
        chosen.remove(best)
        m = m - v[best].T @ v[best]
    return chosen


def instance(n, r, d, num_labeled=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(n, r, d, generator=g, dtype=dtype)
    labeled = torch.randn(num_labeled, r, d, generator=g, dtype=dtype) if num_labeled else None
    return pool, labeled


@pytest.mark.parametrize(
    "n, r, d, num_labeled, batch, lamb",
    [(25, 3, 8, 0, 6, 1.0), (30, 2, 20, 10, 5, 0.5), (18, 4, 5, 4, 7, 2.0), (40, 1, 12, 0, 10, 0.1)],
)
def test_matches_dense_oracle(n, r, d, num_labeled, batch, lamb):
    pool, labeled = instance(n, r, d, num_labeled, seed=n + d)
    result = fisher_greedy_detailed(pool, batch, labeled, lamb=lamb)
    assert result.positions == dense_oracle(pool, batch, labeled, lamb=lamb)
    assert len(set(result.positions)) == batch and all(0 <= p < n for p in result.positions)
    # The incremental updates alone got there: the drift guard never had to recompute anything.
    assert result.refreshes == 0 and result.rebuilds == 0


def test_matches_dense_oracle_with_given_fisher():
    pool, labeled = instance(24, 3, 10, 5, seed=3)
    g = torch.Generator().manual_seed(9)
    root = torch.randn(10, 10, generator=g, dtype=torch.float64)
    fisher = root @ root.T / 10 + 0.1 * torch.eye(10, dtype=torch.float64)
    result = fisher_greedy_detailed(pool, 6, labeled, fisher=fisher)
    got = result.positions
    assert got == dense_oracle(pool, 6, labeled, fisher=fisher)
    assert result.refreshes == 0 and result.rebuilds == 0
    assert got != fisher_greedy(pool, 6, labeled), "the given fisher should change this instance's choices"


@pytest.mark.parametrize("num_labeled", [0, 6])
def test_backward_steps_match_oracle_prune(num_labeled):
    pool, labeled = instance(20, 3, 9, num_labeled, seed=11 + num_labeled)
    result = fisher_greedy_detailed(pool, 5, labeled, lamb=0.3, backward_steps=True)
    got = result.positions
    assert got == dense_oracle(pool, 5, labeled, lamb=0.3, backward_steps=True)
    assert result.refreshes == 0 and result.rebuilds == 0
    assert len(set(got)) == 5
    assert got != fisher_greedy(pool, 5, labeled, lamb=0.3), "pruning should matter on this instance"


def test_backward_steps_when_twice_the_batch_exceeds_the_pool():
    pool, _ = instance(9, 2, 6, seed=5)
    got = fisher_greedy(pool, 6, backward_steps=True)
    assert got == dense_oracle(pool, 6, backward_steps=True)


@pytest.mark.parametrize("fisher_mode", ["dense", "factored"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_fisher_forms_and_chunking_agree(fisher_mode, chunk_size):
    pool, labeled = instance(23, 3, 11, 4, seed=21)
    expected = dense_oracle(pool, 6, labeled)
    result = fisher_greedy_detailed(pool, 6, labeled, chunk_size=chunk_size, fisher_mode=fisher_mode)
    assert result.positions == expected and result.refreshes == 0
    assert result.plan.dense_fisher == (fisher_mode == "dense")


def test_guard_recomputes_and_rebuilds_without_changing_the_result():
    pool, labeled = instance(22, 3, 10, 5, seed=8)
    result = fisher_greedy_detailed(pool, 6, labeled, guard_tol=0.0, backward_steps=True)
    assert result.refreshes >= 6 and result.rebuilds >= 1
    assert result.positions == dense_oracle(pool, 6, labeled, backward_steps=True)


def test_float32_agrees_with_float64_on_well_conditioned_instances():
    for seed in range(3):
        pool, labeled = instance(200, 4, 40, 30, seed=100 + seed, dtype=torch.float32)
        in32 = fisher_greedy_detailed(pool, 25, labeled, backward_steps=True)
        in64 = fisher_greedy(pool, 25, labeled, backward_steps=True, dtype=torch.float64)
        assert in32.positions == in64
        assert in32.rebuilds == 0 and in32.refreshes <= 1  # float32 drift stays small at this size
        assert in32.plan is not None and in32.plan.resident


def test_streamed_chunks_give_the_same_choices():
    pool, labeled = instance(30, 2, 8, 3, seed=2, dtype=torch.float32)
    n, r, d = pool.shape
    kwargs = dict(dtype=torch.float64, dense_fisher=True, chunk_size=4)
    limit = estimate_memory(n, r, d, 3, resident_copy=False, **kwargs)
    assert limit < estimate_memory(n, r, d, 3, resident_copy=True, **kwargs)
    result = fisher_greedy_detailed(pool, 5, labeled, dtype=torch.float64, chunk_size=4, memory_limit=limit,
                                    fisher_mode="dense")
    assert result.plan is not None and not result.plan.resident
    assert result.positions == dense_oracle(pool, 5, labeled)


def test_gains_are_the_drop_in_the_objective():
    pool, labeled = instance(15, 2, 6, 3, seed=4)
    result = fisher_greedy_detailed(pool, 4, labeled)
    batch, num_labeled = 4, 3
    everything = torch.cat([pool, labeled])
    fisher = torch.einsum("nrd,nre->de", everything, everything) / len(everything)
    v = pool * math.sqrt(batch / (num_labeled + batch))
    m = torch.eye(6, dtype=torch.float64) + torch.einsum("nrd,nre->de", labeled, labeled) / (num_labeled + batch)
    for position, gain in zip(result.positions, result.gains):
        before = torch.trace(fisher @ torch.linalg.inv(m))
        m = m + v[position].T @ v[position]
        assert gain == pytest.approx(float(before - torch.trace(fisher @ torch.linalg.inv(m))), rel=1e-9)


def test_ties_go_to_the_lowest_position():
    pool, _ = instance(6, 2, 5, seed=1)
    pool = torch.cat([pool[:3], pool[1:2], pool[3:]])  # position 3 duplicates position 1
    got = fisher_greedy(pool, 7)
    assert got.index(1) < got.index(3)
    assert fisher_greedy(torch.zeros(5, 2, 3, dtype=torch.float64), 3) == [0, 1, 2]


def test_progress_reports_every_step():
    pool, _ = instance(12, 2, 4, seed=6)
    seen = []
    fisher_greedy(pool, 3, backward_steps=True, progress=lambda task, done, total: seen.append((task, done, total)))
    forward = [(d, t) for task, d, t in seen if task == "fisher-greedy: forward selection"]
    prune = [(d, t) for task, d, t in seen if task == "fisher-greedy: backward pruning"]
    assert forward == [(i, 6) for i in range(1, 7)] and prune == [(i, 3) for i in range(1, 4)]


def test_memory_guard_names_the_fix():
    pool, _ = instance(10, 2, 30, seed=0, dtype=torch.float32)
    with pytest.raises(FmaskError, match="--sparsity"):
        fisher_greedy(pool, 3, memory_limit=2 * 30 * 30 * 4)  # not even A and its rebuild scratch fit
    just_enough = estimate_memory(10, 2, 30, dtype=torch.float32, chunk_size=2)
    with pytest.raises(FmaskError, match="--chunk-size 2 or less"):
        fisher_greedy(pool, 3, chunk_size=8, memory_limit=just_enough, fisher_mode="dense")
    plan = plan_fisher_greedy(10, 2, 30, steps=3, memory_limit=just_enough, fisher_mode="dense",
                              inputs_on_device=True)
    assert plan.chunk_size == 2 and plan.bytes_needed <= just_enough


def test_rejects_bad_input():
    pool, labeled = instance(5, 2, 3, 2, seed=0)
    with pytest.raises(FmaskError, match="cannot select 6 of 5"):
        fisher_greedy(pool, 6)
    with pytest.raises(FmaskError, match="do not match"):
        fisher_greedy(pool, 2, torch.zeros(2, 3, 3, dtype=torch.float64))
    with pytest.raises(FmaskError, match="must be \\(3, 3\\)"):
        fisher_greedy(pool, 2, fisher=torch.eye(4, dtype=torch.float64))
    with pytest.raises(FmaskError, match="lamb"):
        fisher_greedy(pool, 2, lamb=0.0)
    with pytest.raises(FmaskError, match="NaN"):
        fisher_greedy(torch.full((5, 2, 3), float("nan"), dtype=torch.float64), 2)
    assert fisher_greedy(pool, 0) == []


def dense_m0_fisher_oracle(pool, batch, labeled, lamb):
    """Literal greedy from the paper's eq. (2): M_0 = lamb (F + rho I) + L/(L+K) mean_l V_l^T V_l, F the mean V^T V
    over pool and labeled, rho = 1e-6 tr(F) / D; each step picks the candidate minimising tr(F (M + s² V_x^T V_x)^-1),
    inverting from scratch."""
    pool = pool.double()
    n, r, d = pool.shape
    everything = pool if labeled is None else torch.cat([pool, labeled.double()])
    fisher = torch.einsum("nrd,nre->de", everything, everything) / len(everything)
    num_labeled = 0 if labeled is None else len(labeled)
    m = lamb * (fisher + 1e-6 * torch.trace(fisher) / d * torch.eye(d, dtype=torch.float64))
    if labeled is not None:
        m = m + torch.einsum("nrd,nre->de", labeled.double(), labeled.double()) / (num_labeled + batch)
    scale2 = batch / (num_labeled + batch)
    chosen = []
    for _ in range(batch):
        objectives = [math.inf if x in chosen else
                      torch.trace(fisher @ torch.linalg.inv(m + scale2 * pool[x].T @ pool[x])).item()
                      for x in range(n)]
        best = min(range(n), key=lambda x: objectives[x])
        chosen.append(best)
        m = m + scale2 * pool[best].T @ pool[best]
    return chosen


@pytest.mark.parametrize("n, r, d, num_labeled, batch, lamb",
                         [(30, 3, 8, 0, 6, 1.0), (40, 2, 12, 6, 5, 0.5), (25, 4, 6, 3, 7, 2.0)])
def test_m0_fisher_matches_the_literal_formula(n, r, d, num_labeled, batch, lamb):
    pool, labeled = instance(n, r, d, num_labeled, seed=7 * n + d)
    expected = dense_m0_fisher_oracle(pool, batch, labeled, lamb)
    for dtype in (torch.float64, torch.float32):
        result = fisher_greedy_detailed(pool.to(dtype), batch, None if labeled is None else labeled.to(dtype),
                                        lamb=lamb, m0="fisher")
        assert result.positions == expected, dtype
    # The default start (lamb I) still follows its own literal formula.
    assert fisher_greedy(pool, batch, labeled, lamb=lamb) == dense_oracle(pool, batch, labeled, lamb=lamb)


def test_m0_fisher_differs_from_identity_and_refuses_a_factored_fisher():
    pool, labeled = instance(40, 3, 10, 4, seed=11)
    pool[:, :, :5] *= 10  # an anisotropic F, where lamb F and lamb I weigh directions differently
    identity = fisher_greedy(pool, 8, labeled, lamb=5.0)
    fisher = fisher_greedy(pool, 8, labeled, lamb=5.0, m0="fisher")
    assert identity != fisher and fisher == dense_m0_fisher_oracle(pool, 8, labeled, 5.0)
    with pytest.raises(FmaskError, match="dense"):
        fisher_greedy(pool, 4, labeled, m0="fisher", fisher_mode="factored")
    with pytest.raises(FmaskError, match="--m0"):
        fisher_greedy(pool, 4, labeled, m0="eye")


def test_m0_fisher_works_when_the_pool_fisher_is_rank_deficient():
    """Fewer embedding rows than D: F is singular, the ridge keeps M_0 invertible, and the literal formula holds."""
    pool, labeled = instance(6, 2, 20, 2, seed=5)
    expected = dense_m0_fisher_oracle(pool, 3, labeled, 1.0)
    assert fisher_greedy(pool, 3, labeled, m0="fisher") == expected


def test_m0_fisher_stays_exact_and_stable_on_an_ill_conditioned_fisher():
    """F's spectrum spread over six orders of magnitude: the float32 greedy still follows the literal formula, its
    gains are the literal drops of tr(F M^-1), and the whitened start needs no rebuild of A (the unwhitened one
    rebuilt it every few picks at D = 2,650 on a real mask)."""
    pool, labeled = instance(50, 3, 12, 4, seed=13)
    scales = torch.logspace(0, -3, 12, dtype=torch.float64)  # F's eigenvalues ~ scales^2: 1 down to 1e-6
    pool, labeled = pool * scales, labeled * scales
    batch, lamb = 10, 0.5
    expected = dense_m0_fisher_oracle(pool, batch, labeled, lamb)
    result = fisher_greedy_detailed(pool.float(), batch, labeled.float(), lamb=lamb, m0="fisher")
    assert result.positions == expected and result.rebuilds == 0
    # The literal drops of tr(F M^-1) along the oracle's picks.
    everything = torch.cat([pool, labeled])
    fisher = torch.einsum("nrd,nre->de", everything, everything) / len(everything)
    d, scale2 = pool.shape[2], batch / (len(labeled) + batch)
    m = lamb * (fisher + 1e-6 * torch.trace(fisher) / d * torch.eye(d, dtype=torch.float64))
    m = m + torch.einsum("nrd,nre->de", labeled, labeled) / (len(labeled) + batch)
    drops = []
    for x in expected:
        before = torch.trace(fisher @ torch.linalg.inv(m))
        m = m + scale2 * pool[x].T @ pool[x]
        drops.append(float(before - torch.trace(fisher @ torch.linalg.inv(m))))
    assert result.gains == pytest.approx(drops, rel=1e-3)
