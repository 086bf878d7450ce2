"""TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): typical points of uncovered clusters, for small budgets.

The features of the whole pool (labeled and unlabeled) are clustered by k-means into |L| + B clusters. Each of the
B picks takes the largest cluster holding no labeled sample (counting the picks of this batch as labeled) and, from
it, its most typical candidate: typicality(x) = 1 / (mean distance from x to its k = min(20, |cluster| − 1) nearest
neighbours inside the cluster). When every cluster holds a labeled sample (empty clusters can leave too few), the
cluster with the fewest labeled samples is used, largest first. Ties go to the lowest cluster index and the lowest
position. Needs no labels and no trained head: it works from a cold start, given features.

k-means is scikit-learn's (MiniBatchKMeans for large pools, fmask.query.clustering.kmeans_labels); typicality is
computed only inside the clusters that are picked from, with scikit-learn's nearest neighbours, so memory stays
O(N + largest cluster × block) and no N × N matrix exists.
"""

from __future__ import annotations

import numpy as np
import torch

from fmask.query.base import QueryContext
from fmask.query.clustering import as_numpy, kmeans_labels
from fmask.query.coverage import PoolFeatureStrategy
from fmask.query.registry import register_strategy

TYPICALITY_NEIGHBOURS = 20


def typicality(points: np.ndarray) -> np.ndarray:
    """1 / mean Euclidean distance to the min(20, m − 1) nearest other points, for each of the m ``points``
    (1.0 for a lone point; +inf where the neighbours coincide with the point)."""
    from sklearn.neighbors import NearestNeighbors

    if len(points) == 1:
        return np.ones(1)
    neighbours = min(TYPICALITY_NEIGHBOURS, len(points) - 1)
    distances, _ = NearestNeighbors(n_neighbors=neighbours).fit(points).kneighbors()  # excludes each point itself
    with np.errstate(divide="ignore"):
        return 1.0 / distances.mean(axis=1)


def typiclust_pick(features: torch.Tensor | np.ndarray, labeled: np.ndarray, batch: int,
                   cluster_of: np.ndarray) -> tuple[list[int], list[float]]:
    """TypiClust's picks for a given clustering ``cluster_of`` (N,) of ``features`` (N, E):
    (positions in pick order, the typicality of each pick)."""
    points = as_numpy(features)
    labeled = np.asarray(labeled, dtype=bool)
    cluster_of = np.asarray(cluster_of, dtype=np.int64)
    if batch < 0 or batch > int((~labeled).sum()):
        raise ValueError(f"batch must be between 0 and the {int((~labeled).sum())} unlabeled points, got {batch}")
    n_clusters = int(cluster_of.max()) + 1 if len(cluster_of) else 0
    sizes = np.bincount(cluster_of, minlength=n_clusters)
    labeled_count = np.bincount(cluster_of[labeled], minlength=n_clusters)  # the batch's picks count as labeled
    left = np.bincount(cluster_of[~labeled], minlength=n_clusters)  # candidates not yet picked
    by_cluster = np.argsort(cluster_of, kind="stable")
    members_of = np.split(by_cluster, np.cumsum(sizes)[:-1])  # ascending positions per cluster
    taken = labeled.copy()
    typicalities: dict[int, np.ndarray] = {}
    positions: list[int] = []
    scores: list[float] = []
    for _ in range(batch):
        # Fewest labeled first, then the largest, then the lowest index (np.lexsort: the last key is primary).
        order = np.lexsort((np.arange(n_clusters), -sizes, labeled_count))
        cluster = int(order[left[order] > 0][0])
        members = members_of[cluster]
        if cluster not in typicalities:
            typicalities[cluster] = typicality(points[members])
        candidate_scores = np.where(taken[members], -np.inf, typicalities[cluster])
        best = int(np.argmax(candidate_scores))  # the first maximum: the lowest position
        pick = int(members[best])
        positions.append(pick)
        scores.append(float(typicalities[cluster][best]))
        taken[pick] = True
        labeled_count[cluster] += 1
        left[cluster] -= 1
    return positions, scores


def typiclust_select(features: torch.Tensor | np.ndarray, labeled: torch.Tensor | np.ndarray, batch: int, *,
                     seed: int = 0) -> list[int]:
    """Positions of ``batch`` TypiClust picks among the unlabeled rows of ``features`` (N, E); ``labeled`` is a
    boolean mask (N,), all False for a cold start. k-means into |L| + batch clusters is seeded with ``seed``."""
    labeled = np.asarray(labeled.cpu() if isinstance(labeled, torch.Tensor) else labeled, dtype=bool)
    return _select(features, labeled, batch, seed)[0]


def _select(features: torch.Tensor | np.ndarray, labeled: np.ndarray, batch: int,
            seed: int) -> tuple[list[int], list[float]]:
    if batch == 0:
        return [], []
    cluster_of = kmeans_labels(features, int(labeled.sum()) + batch, seed=seed)
    return typiclust_pick(features, labeled, batch, cluster_of)


@register_strategy("typiclust")
class TypiClustStrategy(PoolFeatureStrategy):
    """Cold-start diversity: the most typical point of each of the largest clusters without labels."""

    def pick(self, ctx: QueryContext, features: torch.Tensor, labeled: np.ndarray, batch: int
             ) -> tuple[list[int], list[float]]:
        return _select(features, labeled, batch, ctx.seed)
