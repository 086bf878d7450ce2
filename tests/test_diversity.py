"""k-center greedy and BADGE: pure functions against brute-force references, strategies against the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmask.core.errors import FmaskError
from fmask.pool.tensor import TensorPool
from fmask.query.base import QueryContext
from fmask.query.registry import get_strategy, list_strategies
from fmask.query.strategies.badge import (
    badge_select,
    gradient_embedding_residuals,
    gradient_embedding_sq_distances,
    gradient_embedding_sq_norms,
    sample_proportional,
)
from fmask.query.strategies.kcenter import kcenter_greedy, nearest_center_sq_distances
from fmask.train.models import build_model


# ---------------------------------------------------------------- brute-force references


def farthest_first_reference(
    features: torch.Tensor, centers: torch.Tensor, batch: int, first: int | None = None
) -> list[int]:
    """Textbook farthest-first with explicit differences; ``first`` replaces the draw when there are no centers."""
    chosen: list[int] = []
    all_centers = [c for c in centers.double()]
    for _ in range(batch):
        if not all_centers:
            pick = first
        else:
            best, pick = -1.0, None
            for i, x in enumerate(features.double()):
                if i in chosen:
                    continue
                d = min(float(((x - c) ** 2).sum()) for c in all_centers)
                if d > best:  # strict: the lowest index keeps a tie
                    best, pick = d, i
        chosen.append(pick)
        all_centers.append(features[pick].double())
    return chosen


def explicit_gradient_embeddings(probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The N x (C·E) matrix BADGE materializes: rows (p − e_ŷ) ⊗ h."""
    residuals = probs.double().clone()
    residuals[torch.arange(len(probs)), probs.argmax(dim=1)] -= 1.0
    return (residuals[:, :, None] * features.double()[:, None, :]).reshape(len(probs), -1)


def kmeanspp_reference(embeddings: torch.Tensor, batch: int, generator: torch.Generator) -> list[int]:
    """k-means++ on explicit embeddings: largest norm first, then D²-weighted draws (same sampler)."""
    norms = (embeddings**2).sum(dim=1)
    chosen = [int(torch.argmax(norms))]
    for _ in range(batch - 1):
        weights = torch.tensor(
            [min(float(((e - embeddings[c]) ** 2).sum()) for c in chosen) for e in embeddings], dtype=torch.float64
        )
        weights[chosen] = 0.0
        if weights.sum() > 0:
            chosen.append(sample_proportional(weights, generator))
        else:
            chosen.append(next(i for i in range(len(embeddings)) if i not in chosen))
    return chosen


def random_probs(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)


def random_features(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- k-center


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_kcenter_matches_farthest_first_with_labeled_centers(chunk_size: int) -> None:
    features, centers = random_features(40, 5, 0), random_features(9, 5, 1)
    positions, distances = kcenter_greedy(features, centers, 12, chunk_size=chunk_size)
    assert positions == farthest_first_reference(features, centers, 12)
    # Each reported distance is the distance to the nearest center at pick time.
    for step, (pos, dist) in enumerate(zip(positions, distances)):
        earlier = torch.cat([centers, features[positions[:step]]])
        assert dist == pytest.approx(float(torch.cdist(features[pos : pos + 1], earlier).min()), abs=1e-9)


@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_kcenter_without_centers_starts_from_a_seeded_draw(chunk_size: int) -> None:
    features = random_features(30, 4, 2)
    empty = torch.empty(0, 4, dtype=torch.float64)
    positions, distances = kcenter_greedy(
        features, empty, 8, generator=torch.Generator().manual_seed(5), chunk_size=chunk_size
    )
    assert positions == farthest_first_reference(features, empty, 8, first=positions[0])
    assert distances[0] == 0.0
    again, _ = kcenter_greedy(features, empty, 8, generator=torch.Generator().manual_seed(5), chunk_size=chunk_size)
    assert again == positions
    firsts = {kcenter_greedy(features, empty, 1, generator=torch.Generator().manual_seed(s))[0][0] for s in range(8)}
    assert len(firsts) > 1  # the start really depends on the seed


def test_kcenter_ties_go_to_the_lowest_index() -> None:
    # Integer coordinates keep every distance exact, so the ties below are exact.
    features = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [3.0, 0.0]])
    positions, distances = kcenter_greedy(features, torch.zeros(1, 2), 4, chunk_size=2)
    assert positions == [0, 1, 2, 3]
    assert distances == [3.0, 3.0, 3.0, 0.0]


def test_kcenter_float32_inputs_and_nearest_center_distances() -> None:
    features, centers = random_features(25, 6, 3).float(), random_features(11, 6, 4).float()
    blockwise = nearest_center_sq_distances(features, centers, chunk_size=4)
    explicit = torch.cdist(features.double(), centers.double()).pow(2).min(dim=1).values
    assert torch.allclose(blockwise, explicit, atol=1e-9)
    positions, _ = kcenter_greedy(features, centers, 10, chunk_size=4)
    assert positions == farthest_first_reference(features, centers, 10)


def test_kcenter_rejects_bad_arguments() -> None:
    features = random_features(5, 2, 0)
    with pytest.raises(ValueError, match="batch"):
        kcenter_greedy(features, features[:1], 6)
    with pytest.raises(ValueError, match="generator"):
        kcenter_greedy(features, torch.empty(0, 2), 2)
    assert kcenter_greedy(features, features[:1], 0) == ([], [])


def test_kcenter_reports_progress() -> None:
    calls: list[tuple[str, int, int]] = []
    kcenter_greedy(random_features(10, 3, 0), random_features(2, 3, 1), 4, progress=lambda *a: calls.append(a))
    assert [(done, total) for _, done, total in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]


# ---------------------------------------------------------------- BADGE


def test_gradient_embedding_is_the_head_weight_gradient_of_the_predicted_label_loss() -> None:
    torch.manual_seed(0)
    features = random_features(6, 5, 1)
    head = torch.nn.Linear(5, 4, dtype=torch.float64)
    explicit = explicit_gradient_embeddings(torch.softmax(head(features), dim=1).detach(), features)
    for i in range(6):
        head.zero_grad()
        logits = head(features[i : i + 1])
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        assert torch.allclose(head.weight.grad.reshape(-1), explicit[i], atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_factorized_distances_equal_explicit_ones(chunk_size: int) -> None:
    probs, features = random_probs(30, 4, 0), random_features(30, 6, 1)
    explicit = explicit_gradient_embeddings(probs, features)
    residuals = gradient_embedding_residuals(probs)
    norms = gradient_embedding_sq_norms(residuals, features, chunk_size=chunk_size)
    assert torch.allclose(norms, (explicit**2).sum(dim=1), atol=1e-12)
    distances = gradient_embedding_sq_distances(residuals, features, range(30), chunk_size=chunk_size)
    assert torch.allclose(distances, torch.cdist(explicit, explicit).pow(2), atol=1e-10)
    some = gradient_embedding_sq_distances(residuals, features, [7, 2], sq_norms=norms, chunk_size=chunk_size)
    assert torch.allclose(some, torch.cdist(explicit, explicit[[7, 2]]).pow(2), atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_badge_equals_explicit_kmeanspp_under_the_same_seed(seed: int, chunk_size: int) -> None:
    probs, features = random_probs(45, 3, 10 + seed), random_features(45, 5, 20 + seed).float()
    positions, distances = badge_select(
        probs.float(), features, 10, generator=torch.Generator().manual_seed(seed), chunk_size=chunk_size
    )
    explicit = explicit_gradient_embeddings(probs.float(), features)
    assert positions == kmeanspp_reference(explicit, 10, torch.Generator().manual_seed(seed))
    assert positions[0] == int(torch.argmax((explicit**2).sum(dim=1)))
    assert distances[0] == pytest.approx(float(explicit[positions[0]].norm()), rel=1e-9)
    assert len(set(positions)) == 10


def test_badge_is_reproducible_and_depends_on_the_seed() -> None:
    probs, features = random_probs(60, 5, 3), random_features(60, 8, 4)
    runs = {
        seed: badge_select(probs, features, 12, generator=torch.Generator().manual_seed(seed))[0] for seed in (0, 1)
    }
    again = badge_select(probs, features, 12, generator=torch.Generator().manual_seed(0))[0]
    assert again == runs[0]
    assert runs[0] != runs[1]


def test_badge_falls_back_to_the_lowest_remaining_index_when_all_weights_vanish() -> None:
    probs = torch.tensor([[0.7, 0.3]] * 5)
    features = torch.ones(5, 3)
    positions, distances = badge_select(probs, features, 4, generator=torch.Generator().manual_seed(0))
    assert positions == [0, 1, 2, 3]
    assert distances[1:] == [0.0, 0.0, 0.0]


def test_sample_proportional_respects_the_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    draws = [sample_proportional(weights, generator) for _ in range(4000)]
    assert set(draws) == {1, 3}
    assert draws.count(3) / len(draws) == pytest.approx(0.75, abs=0.03)
    assert sample_proportional(torch.tensor([0.0, 0.0, 2.0]), generator) == 2


def test_badge_rejects_an_oversized_batch() -> None:
    with pytest.raises(ValueError, match="batch"):
        badge_select(random_probs(4, 2, 0), random_features(4, 3, 0), 5, generator=torch.Generator())


# ---------------------------------------------------------------- strategies on a QueryContext


def tiny_pool(n: int) -> TensorPool:
    """A fixed random 1x8x8 image per position."""
    return TensorPool(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(123)))


def make_context(labeled: list[int], seed: int = 0, n: int = 40, **options) -> QueryContext:
    torch.manual_seed(0)  # the same model weights for every context
    model = build_model("cnn", in_channels=1, num_classes=3).eval()
    pool = tiny_pool(n)
    unlabeled = [i for i in pool.ids if i not in set(labeled)]
    return QueryContext(
        model=model, pool=pool, labeled_ids=labeled, unlabeled_ids=unlabeled, seed=seed, batch_size=16,
        options=options,
    )


def test_both_strategies_are_registered() -> None:
    assert {"kcenter", "badge"} <= set(list_strategies())


@pytest.mark.parametrize("name", ["kcenter", "badge"])
@pytest.mark.parametrize("labeled", [[], [1, 5, 17, 30]])
def test_strategy_contract(name: str, labeled: list[int]) -> None:
    ctx = make_context(labeled, seed=3)
    selection = get_strategy(name).select(ctx, 7)
    assert len(selection.ids) == 7 and len(set(selection.ids)) == 7
    assert set(selection.ids) <= set(ctx.unlabeled_ids)
    assert not set(selection.ids) & set(labeled)
    assert len(selection.scores) == 7
    assert get_strategy(name).select(make_context(labeled, seed=3), 7).ids == selection.ids


def test_kcenter_strategy_uses_labeled_embeddings_as_centers() -> None:
    labeled = [0, 2, 4, 6, 8]
    ctx = make_context(labeled, chunk_size=5)
    selection = get_strategy("kcenter").select(ctx, 6)
    candidates, centers = ctx.features(ctx.unlabeled_ids), ctx.features(labeled)
    expected = farthest_first_reference(candidates, centers, 6)
    assert selection.ids == [ctx.unlabeled_ids[i] for i in expected]


def test_badge_strategy_uses_the_model_probabilities_and_features() -> None:
    ctx = make_context([3, 9], seed=11)
    selection = get_strategy("badge").select(ctx, 6)
    explicit = explicit_gradient_embeddings(ctx.probs(), ctx.features(ctx.unlabeled_ids))
    expected = kmeanspp_reference(explicit, 6, torch.Generator().manual_seed(11))
    assert selection.ids == [ctx.unlabeled_ids[i] for i in expected]


@pytest.mark.parametrize("name", ["kcenter", "badge"])
def test_strategies_refuse_an_unfillable_batch_and_a_bad_chunk_size(name: str) -> None:
    with pytest.raises(FmaskError, match="exceeds the 10 unlabeled"):
        get_strategy(name).select(make_context(list(range(30)), n=40), 11)
    with pytest.raises(FmaskError, match="chunk_size"):
        get_strategy(name).select(make_context([], chunk_size=0), 2)
