"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): max coverage of δ-balls, for small budgets.

On L2-normalised features, the ball of x is every point within distance δ of x (x included). The points inside
the ball of a labeled sample count as covered; each pick is the candidate whose ball holds the most points not
yet covered, whose ball then covers them (greedy max coverage). Ties, and the picks left once everything is
covered, go to the candidate with the larger ball, then the lowest position. Needs no labels and no trained
head: it works from a cold start, given features.

δ comes from ``--radius`` or from the paper's purity rule: k-means of the normalised features into as many
clusters as classes gives pseudo-labels; a ball is pure when every point in it shares its centre's pseudo-label,
and δ is the largest radius at which at least 95% of the balls are pure. A ball around x is pure exactly while δ
is below the distance from x to the nearest point of another cluster, so δ comes from those distances (computed
in blocks, for a seeded sample of 5,000 centres when the pool is larger).

The ball graph is built in blocks of rows on the features' device and kept sparse (CSR, 4 bytes per edge; a
radius that would put more than 100 million edges in it is refused), with its transpose for the greedy's updates:
memory O(N + edges), never N × N.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fmask.errors import FmaskError
from fmask.query.base import ProgressFn, QueryContext, Selection, Strategy, read_option
from fmask.query.clustering import block_rows, kmeans_labels, squared_distances
from fmask.query.registry import register_strategy
from fmask.query.strategies.kcenter import check_batch
from fmask.query.strategies.typiclust import pool_features

DEFAULT_PURITY = 0.95
PURITY_SAMPLE = 5_000
MAX_EDGES = 100_000_000


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (all-zero rows stay zero), in float32 (float64 stays float64)."""
    features = features if features.dtype == torch.float64 else features.float()
    return F.normalize(features, dim=1)


def coverage_graph(points: torch.Tensor, radius: float, *, max_edges: int = MAX_EDGES):
    """The ball graph: row x holds every point within ``radius`` of ``points[x]`` (x included), as a scipy CSR
    matrix (N, N) of booleans, built on the device of ``points`` in blocks of rows."""
    from scipy.sparse import csr_matrix

    n = points.shape[0]
    sq_norms = (points * points).sum(dim=1)
    counts = np.zeros(n, dtype=np.int64)
    columns: list[np.ndarray] = []
    edges = 0
    rows = block_rows(n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = squared_distances(points[start:stop], points, sq_norms)
        block[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # every ball holds its centre
        hits = torch.nonzero(block <= radius * radius)  # row-major: columns ascend within each row
        edges += hits.shape[0]
        if edges > max_edges:
            raise FmaskError(f"ProbCover's radius {radius:.4g} puts more than {max_edges:,} pairs of the {n:,} points "
                             "within reach of each other; pass a smaller --radius")
        counts[start:stop] = torch.bincount(hits[:, 0], minlength=stop - start).cpu().numpy()
        columns.append(hits[:, 1].to(torch.int32).cpu().numpy())
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.concatenate(columns) if columns else np.zeros(0, dtype=np.int32)
    return csr_matrix((np.ones(len(indices), dtype=bool), indices, indptr), shape=(n, n))


def probcover_greedy(graph, labeled: np.ndarray, batch: int,
                     progress: Optional[ProgressFn] = None) -> tuple[list[int], list[float]]:
    """Greedy max coverage on a ball ``graph`` (CSR, row x = the ball of x) from the balls of the ``labeled`` rows:
    (positions in pick order, how many points each pick newly covered)."""
    labeled = np.asarray(labeled, dtype=bool)
    n = graph.shape[0]
    if batch < 0 or batch > int((~labeled).sum()):
        raise ValueError(f"batch must be between 0 and the {int((~labeled).sum())} unlabeled points, got {batch}")
    indptr, indices = graph.indptr, graph.indices
    covered = np.zeros(n, dtype=bool)
    covered[graph[np.flatnonzero(labeled)].indices] = True
    degree = np.diff(indptr).astype(np.int64)
    # Points of each ball not yet covered (every ball holds its centre, so no row is empty for reduceat).
    gain = np.add.reduceat((~covered)[indices].astype(np.int64), indptr[:-1]) if n else np.zeros(0, np.int64)
    members_of = graph.T.tocsr()  # row y: the centres whose balls hold y
    eligible = ~labeled
    scale = int(degree.max()) + 1 if n else 1
    positions: list[int] = []
    scores: list[float] = []
    for step in range(batch):
        key = np.where(eligible, gain * scale + degree, -1)  # most newly covered, then the larger ball
        pick = int(np.argmax(key))  # the first maximum: the lowest position
        ball = indices[indptr[pick]:indptr[pick + 1]]
        newly = ball[~covered[ball]]
        covered[newly] = True
        if len(newly):
            gain -= np.bincount(members_of[newly].indices, minlength=n)
        eligible[pick] = False
        positions.append(pick)
        scores.append(float(len(newly)))
        if progress is not None:
            progress("ProbCover greedy", step + 1, batch)
    return positions, scores


def purity_radius(features: torch.Tensor, pseudo_labels: np.ndarray, *, purity: float = DEFAULT_PURITY,
                  sample: int = PURITY_SAMPLE, seed: int = 0) -> float:
    """The largest δ at which at least ``purity`` of the balls around the normalised ``features`` are pure (hold only
    their centre's pseudo-label); estimated over a ``seed``-ed sample of ``sample`` centres when N is larger."""
    points = normalized(features)
    n = points.shape[0]
    centres = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    labels = torch.as_tensor(np.asarray(pseudo_labels), device=points.device)
    sq_norms = (points * points).sum(dim=1)
    nearest_other = []
    rows = block_rows(n)
    for start in range(0, len(centres), rows):
        index = torch.as_tensor(centres[start:start + rows], device=points.device)
        block = squared_distances(points[index], points, sq_norms)
        block.masked_fill_(labels[index][:, None] == labels[None, :], float("inf"))
        nearest_other.append(block.min(dim=1).values.sqrt().double().cpu())
    distances = np.sort(torch.cat(nearest_other).numpy())
    allowed_impure = int(np.floor((1.0 - purity) * len(distances) + 1e-9))
    if allowed_impure >= len(distances) or not np.isfinite(distances[allowed_impure]):
        return 2.0  # every ball stays pure: any radius up to the largest distance between unit vectors
    # A ball around x is impure from δ = its distance to another cluster on: stay just below the first one too many.
    return float(np.nextafter(distances[allowed_impure], 0.0))


def probcover_select(features: torch.Tensor, labeled: torch.Tensor | np.ndarray, batch: int, *,
                     radius: float) -> list[int]:
    """Positions of ``batch`` ProbCover picks among the unlabeled rows of ``features`` (N, E) for balls of
    ``radius`` on the normalised features; ``labeled`` is a boolean mask (N,), all False for a cold start."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    labeled = np.asarray(labeled.cpu() if isinstance(labeled, torch.Tensor) else labeled, dtype=bool)
    return probcover_greedy(coverage_graph(normalized(features), radius), labeled, batch)[0]


@register_strategy("probcover")
class ProbCoverStrategy(Strategy):
    """Cold-start coverage: greedy max coverage of δ-balls (``--radius``, default the purity rule)."""

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        check_batch(ctx, batch)
        features, labeled = pool_features(ctx)
        points = normalized(features.to(ctx.device))
        radius = read_option(ctx.options, "radius", float, None)
        if radius is None:
            pseudo_labels = kmeans_labels(points, ctx.model.head.out_features, seed=ctx.seed)
            radius = purity_radius(points, pseudo_labels, seed=ctx.seed)
        elif not radius > 0:
            raise FmaskError(f"--radius {radius} must be positive; distances between normalised features lie in [0, 2]")
        positions, scores = probcover_greedy(coverage_graph(points, float(radius)), labeled, batch, ctx.progress)
        return Selection(ids=[ctx.unlabeled_ids[p] for p in positions], scores=scores)
