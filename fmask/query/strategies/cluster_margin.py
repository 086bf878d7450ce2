"""Cluster-Margin (Citovsky et al., NeurIPS 2021): margin sampling made diverse, for batches of many thousands.

Each round the pool's features are clustered once by average-linkage (hierarchical, Euclidean) into ``clusters``
clusters (default: the batch size). The margin pool is the ``oversample`` × batch candidates with the lowest margin
(top-1 minus top-2 probability; ties: lowest position). The batch is filled round-robin over the clusters that
hold margin-pool candidates, smallest cluster first (size = its margin-pool candidates; ties: the cluster holding
the lower-margin candidate first), taking from each cluster its lowest-margin candidate not yet taken, and cycling
until the batch is full. (The paper draws within a cluster at random; the lowest margin first makes the order
deterministic given the clustering.)

Average linkage needs all pairwise distances of what it clusters, so it runs on at most ``cap`` points: the margin
pool first (lowest margins first), then a seeded random sample of the rest of the pool; margin-pool candidates
beyond the cap join the cluster with the nearest centroid. Memory: cap² / 2 float64 distances for scipy's
linkage (1.6 GB at the default cap of 20,000, held twice while scipy runs) plus O(N), whatever N is.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext, Selection, Strategy, check_batch, read_option, require_labeled
from fmask.query.clustering import block_rows, squared_distances
from fmask.query.registry import register_strategy
from fmask.query.uncertainty import margin_scores

DEFAULT_OVERSAMPLE = 10
DEFAULT_CAP = 20_000


def condensed_distances(points: torch.Tensor) -> np.ndarray:
    """Euclidean distances of all pairs i < j of ``points`` (n, E) in scipy's condensed order (float64,
    n(n − 1)/2 entries), computed in blocks of rows on the points' device."""
    n = points.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    sq_norms = (points * points).sum(dim=1)
    rows = block_rows(n)
    offset = 0
    for start in range(0, n, rows):
        block = squared_distances(points[start:start + rows], points, sq_norms).sqrt_().double().cpu().numpy()
        for i in range(block.shape[0]):
            row = block[i, start + i + 1:]
            out[offset:offset + len(row)] = row
            offset += len(row)
    return out


def average_linkage_clusters(points: torch.Tensor, clusters: int) -> np.ndarray:
    """Average-linkage clustering of ``points`` (n, E) cut into at most ``clusters`` clusters: labels 0..k−1 (n,)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = points.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    tree = linkage(condensed_distances(points), method="average")
    labels = fcluster(tree, t=min(clusters, n), criterion="maxclust")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """Index of the nearest of ``centroids`` (k, E) for every row of ``points`` (ties: the lowest index)."""
    sq_norms = (centroids * centroids).sum(dim=1)
    rows = block_rows(centroids.shape[0])
    return torch.cat([squared_distances(points[s:s + rows], centroids, sq_norms).argmin(dim=1).cpu()
                      for s in range(0, points.shape[0], rows)]).numpy()


def cluster_margin_pool(features: torch.Tensor, margins: torch.Tensor, batch: int, *, clusters: int,
                        oversample: int, cap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the margin pool: positions in ascending margin order, the cluster of each)."""
    n = features.shape[0]
    order = np.asarray(torch.sort(margins.double().cpu(), stable=True).indices)
    pool = order[:min(n, oversample * batch)]
    if n <= cap:
        clustered = np.arange(n)
    else:  # the margin pool first, then a seeded sample of the rest
        first = pool[:cap]
        rest = np.setdiff1d(np.arange(n), first)
        fill = np.random.default_rng(seed).choice(rest, cap - len(first), replace=False)
        clustered = np.concatenate([first, np.sort(fill)])
    points = features if features.dtype == torch.float64 else features.float()
    labels = average_linkage_clusters(points[torch.as_tensor(clustered, device=points.device)], clusters)
    cluster_of = np.full(n, -1, dtype=np.int64)
    cluster_of[clustered] = labels
    outside = pool[cluster_of[pool] < 0]
    if len(outside):
        index = torch.as_tensor(clustered, device=points.device)
        members = torch.as_tensor(labels, device=points.device)
        k = int(labels.max()) + 1
        sums = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
        sums.index_add_(0, members, points[index])
        centroids = sums / torch.bincount(members, minlength=k)[:, None].to(points.dtype)
        cluster_of[outside] = nearest_centroid(points[torch.as_tensor(outside, device=points.device)], centroids)
    return pool, cluster_of[pool]


def round_robin(candidates: np.ndarray, cluster_of: np.ndarray, batch: int) -> list[int]:
    """Round-robin over the clusters of ``candidates`` (in priority order, ``cluster_of`` aligned with them):
    smallest cluster first (ties: the one whose best candidate comes first), each cluster's candidates in order."""
    groups: dict[int, list[int]] = {}
    for candidate, cluster in zip(candidates.tolist(), cluster_of.tolist()):
        groups.setdefault(cluster, []).append(candidate)
    queue = sorted(groups.values(), key=len)  # a stable sort keeps first-appearance order among equal sizes
    picked: list[int] = []
    depth = 0
    while len(picked) < batch:
        for group in queue:
            if depth < len(group):
                picked.append(group[depth])
                if len(picked) == batch:
                    break
        depth += 1
    return picked


def cluster_margin_select(features: torch.Tensor, margins: torch.Tensor, batch: int, *,
                          clusters: Optional[int] = None, oversample: int = DEFAULT_OVERSAMPLE, cap: int = DEFAULT_CAP,
                          seed: int = 0) -> list[int]:
    """Positions of ``batch`` Cluster-Margin picks among the candidates of ``features`` (N, E) and ``margins`` (N,):
    ``clusters`` average-linkage clusters (default ``batch``) over at most ``cap`` points (``seed``-ed sample),
    round-robin over the ``oversample`` × batch lowest margins."""
    n = features.shape[0]
    if batch < 0 or batch > n:
        raise ValueError(f"batch must be between 0 and the {n} candidates, got {batch}")
    if oversample < 1 or cap < 1 or (clusters is not None and clusters < 1):
        raise ValueError(f"oversample, cap and clusters must be positive, got {oversample}, {cap}, {clusters}")
    if batch == 0:
        return []
    pool, cluster_of = cluster_margin_pool(features, margins, batch, clusters=clusters or batch,
                                           oversample=oversample, cap=cap, seed=seed)
    return round_robin(pool, cluster_of, batch)


def _positive_option(ctx: QueryContext, name: str, default: Optional[int]) -> Optional[int]:
    value = read_option(ctx.options, name, int, default)
    if value is not None and (isinstance(value, bool) or value < 1):
        raise FmaskError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    return value


@register_strategy("cluster-margin")
class ClusterMarginStrategy(Strategy):
    """Lowest margins, spread round-robin over average-linkage clusters (``--clusters``, ``--oversample``,
    ``--cluster-cap``)."""

    needs_labels = True

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        require_labeled(ctx, self.name)
        check_batch(ctx, batch)
        margins = -margin_scores(ctx.probs())  # top-1 minus top-2 probability
        positions = cluster_margin_select(
            ctx.features(ctx.unlabeled_ids).to(ctx.device), margins, batch,
            clusters=_positive_option(ctx, "clusters", None),
            oversample=_positive_option(ctx, "oversample", DEFAULT_OVERSAMPLE),
            cap=_positive_option(ctx, "cluster_cap", DEFAULT_CAP), seed=ctx.seed)
        return Selection(ids=[ctx.unlabeled_ids[p] for p in positions], scores=[-float(margins[p]) for p in positions])
