"""TypiClust, ProbCover and Cluster-Margin against literal implementations of their papers' definitions on small
point sets: a given clustering (or one k-means / average linkage cannot miss), a given radius."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from fmask.query import cluster_margin_select, probcover_select, typiclust_select
from fmask.query.strategies.cluster_margin import average_linkage_clusters, condensed_distances, round_robin
from fmask.query.strategies.probcover import balls, normalized, purity_radius
from fmask.query.strategies.typiclust import typiclust_pick


def blobs(sizes: list[int], dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Well-separated Gaussian blobs (centres ~20 apart, unit spread) in float64, and each point's blob."""
    generator = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.randn(len(sizes), dim, generator=generator, dtype=torch.float64)
    points = torch.cat([c + torch.randn(s, dim, generator=generator, dtype=torch.float64)
                        for c, s in zip(centres, sizes)])
    return points, np.repeat(np.arange(len(sizes)), sizes)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum().sqrt())


# ---------------------------------------------------------------- TypiClust


def typicality_reference(points: torch.Tensor) -> list[float]:
    """1 / mean distance to the min(20, m − 1) nearest other points of the cluster."""
    m = len(points)
    if m == 1:
        return [1.0]
    k = min(20, m - 1)
    out = []
    for i in range(m):
        nearest = sorted(distance(points[i], points[j]) for j in range(m) if j != i)[:k]
        out.append(1.0 / (sum(nearest) / k))
    return out


def typiclust_reference(features: torch.Tensor, labeled: list[int], batch: int, cluster_of) -> list[int]:
    """From the largest cluster without labeled points (picks count as labeled; otherwise the fewest labeled, then
    the largest, then the lowest index), its most typical unpicked point."""
    cluster_of = [int(c) for c in cluster_of]
    taken = set(labeled)
    picks = []
    for _ in range(batch):
        members = {c: [i for i, ci in enumerate(cluster_of) if ci == c] for c in sorted(set(cluster_of))}
        open_clusters = [c for c, m in members.items() if any(i not in taken for i in m)]
        cluster = min(open_clusters, key=lambda c: (sum(i in taken for i in members[c]), -len(members[c]), c))
        typical = typicality_reference(features[members[cluster]])
        best = max((t, -i) for i, t in zip(members[cluster], typical) if i not in taken)
        picks.append(-best[1])
        taken.add(-best[1])
    return picks


def test_typiclust_picks_the_most_typical_point_of_the_largest_uncovered_clusters() -> None:
    features, blob = blobs([10, 30, 14, 24, 18, 12])
    labeled = np.zeros(len(features), dtype=bool)
    labeled[[3, 12]] = True  # blobs 0 and 1 hold labels; 2 + 4 = 6 clusters are the six blobs
    picks = typiclust_select(features, labeled, 4, seed=0)
    assert picks == typiclust_reference(features, [3, 12], 4, blob)
    assert [int(blob[p]) for p in picks] == [3, 4, 2, 5]  # largest first, never a blob with a label


def test_typiclust_cold_start_and_a_given_clustering_with_more_picks_than_uncovered_clusters() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(45, 3, generator=generator, dtype=torch.float64)
    cluster_of = torch.randint(0, 5, (45,), generator=generator).numpy()
    for labeled_ids in ([], [0, 1, 2, 7]):
        labeled = np.zeros(45, dtype=bool)
        labeled[labeled_ids] = True
        picks, scores = typiclust_pick(features, labeled, 12, cluster_of)
        assert picks == typiclust_reference(features, labeled_ids, 12, cluster_of)
        assert len(set(picks)) == 12 and not set(picks) & set(labeled_ids)
    cold = typiclust_select(features, np.zeros(45, dtype=bool), 6, seed=3)
    assert len(set(cold)) == 6 and cold == typiclust_select(features, np.zeros(45, dtype=bool), 6, seed=3)


# ---------------------------------------------------------------- ProbCover


def balls_reference(features: torch.Tensor, radius: float) -> list[set[int]]:
    unit = features / features.norm(dim=1, keepdim=True)
    return [{j for j in range(len(unit)) if distance(unit[i], unit[j]) <= radius} for i in range(len(unit))]


def probcover_reference(features: torch.Tensor, labeled: list[int], batch: int, radius: float) -> list[int]:
    """Greedy max coverage: the unpicked, unlabeled point whose ball holds the most uncovered points (ties: the
    larger ball, then the lowest index)."""
    balls = balls_reference(features, radius)
    covered = set().union(*(balls[i] for i in labeled)) if labeled else set()
    picks: list[int] = []
    for _ in range(batch):
        candidates = [i for i in range(len(balls)) if i not in labeled and i not in picks]
        best = max(candidates, key=lambda i: (len(balls[i] - covered), len(balls[i]), -i))
        picks.append(best)
        covered |= balls[best]
    return picks


def pair_distances(features: torch.Tensor) -> np.ndarray:
    return pdist(normalized(features).numpy())


@pytest.mark.parametrize("radius", [0.45, 0.9])
@pytest.mark.parametrize("labeled_ids", [[], [4, 9, 30]])
def test_probcover_equals_greedy_max_coverage_of_the_balls(radius: float, labeled_ids: list[int]) -> None:
    features = torch.randn(60, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert np.abs(pair_distances(features) - radius).min() > 1e-6  # no pair on the boundary
    labeled = np.zeros(60, dtype=bool)
    labeled[labeled_ids] = True
    batch = 25  # beyond full coverage at the larger radius: the rest go by ball size
    assert probcover_select(features, labeled, batch, radius=radius) == probcover_reference(
        features, labeled_ids, batch, radius)


def test_balls_hold_every_point_within_the_radius() -> None:
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    points = normalized(features)
    members = balls(points, torch.arange(50), 0.7, (points * points).sum(dim=1))
    assert [set(torch.nonzero(row).flatten().tolist()) for row in members] == balls_reference(features, 0.7)


def purity_reference(features: torch.Tensor, pseudo_labels: np.ndarray, radius: float) -> float:
    """Share of balls whose points all carry the centre's pseudo-label."""
    balls = balls_reference(features, radius)
    return sum(all(pseudo_labels[j] == pseudo_labels[i] for j in ball) for i, ball in enumerate(balls)) / len(balls)


def test_purity_radius_is_the_largest_radius_with_95_percent_pure_balls() -> None:
    features, blob = blobs([20, 25, 30, 25], dim=3, seed=4)
    features = features + 8.0 * torch.randn(100, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    radius = purity_radius(features, blob)
    assert purity_reference(features, blob, radius) >= 0.95
    assert purity_reference(features, blob, radius + 1e-9) < 0.95
    sampled = purity_radius(features, blob, sample=60, seed=1)  # estimated from 60 centres
    assert 0.5 * radius < sampled < 2.0 * radius


# ---------------------------------------------------------------- Cluster-Margin


def cluster_margin_reference(margins: list[float], cluster_of, batch: int, oversample: int) -> list[int]:
    """The oversample × batch lowest margins, grouped by the given clusters; round-robin over the groups, smallest
    first (ties: the group whose lowest margin comes first), lowest margin first within each group."""
    pool = sorted(range(len(margins)), key=lambda i: (margins[i], i))[:oversample * batch]
    groups = {int(c): [i for i in pool if cluster_of[i] == c] for c in set(int(cluster_of[i]) for i in pool)}
    order = sorted(groups.values(), key=lambda g: (len(g), pool.index(g[0])))
    picks: list[int] = []
    turn = 0
    while len(picks) < batch:
        for group in order:
            if turn < len(group) and len(picks) < batch:
                picks.append(group[turn])
        turn += 1
    return picks


@pytest.mark.parametrize("cap", [20_000, 40])
def test_cluster_margin_is_a_round_robin_over_the_clusters(cap: int) -> None:
    features, blob = blobs([40, 25, 30, 20, 35], seed=6)
    margins = torch.rand(150, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    picks = cluster_margin_select(features, margins, 12, clusters=5, oversample=4, cap=cap, seed=0)
    assert picks == cluster_margin_reference(margins.tolist(), blob, 12, 4)


def test_round_robin_over_a_given_clustering() -> None:
    generator = torch.Generator().manual_seed(8)
    margins = torch.rand(80, generator=generator, dtype=torch.float64).tolist()
    cluster_of = torch.randint(0, 7, (80,), generator=generator).numpy()
    pool = np.array(sorted(range(80), key=lambda i: (margins[i], i))[:60])
    for batch in (5, 15, 60):
        assert round_robin(pool, cluster_of[pool], batch) == cluster_margin_reference(margins, cluster_of, batch, 60 // batch)


def test_average_linkage_matches_scipy_on_the_full_distance_list() -> None:
    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert np.allclose(condensed_distances(points), pdist(points.numpy()), atol=1e-10)
    ours = average_linkage_clusters(points, 6)
    theirs = fcluster(linkage(pdist(points.numpy()), method="average"), t=6, criterion="maxclust")
    assert np.array_equal(ours[:, None] == ours[None, :], theirs[:, None] == theirs[None, :])  # same partition


@pytest.mark.parametrize("mini_batch", [False, True])
def test_kmeans_finds_well_separated_blobs_in_both_modes(mini_batch: bool, monkeypatch) -> None:
    from fmask.query import clustering

    if mini_batch:  # the large-pool path, on a small pool
        monkeypatch.setattr(clustering, "FULL_KMEANS_WORK", 0)
    features, blob = blobs([30, 40, 25, 35], seed=10)
    labels = clustering.kmeans_labels(features, 4, seed=0)
    assert np.array_equal(labels[:, None] == labels[None, :], blob[:, None] == blob[None, :])
    assert np.array_equal(labels, clustering.kmeans_labels(features, 4, seed=0))
