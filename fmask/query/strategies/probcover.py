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

The balls are never stored (a large radius can put thousands of points in each, billions of pairs in all): they
are recomputed in blocks of rows on the features' device when the greedy needs them, once for every ball's size,
then one per pick and one per newly covered point (at most N over the run). Work at most about twice N² · E
multiply-adds, memory O(N + block × N), never N × N.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext, read_option
from fmask.core.progress import ProgressFn
from fmask.query.clustering import block_rows, kmeans_labels, squared_distances
from fmask.query.coverage import PoolFeatureStrategy
from fmask.query.registry import register_strategy

DEFAULT_PURITY = 0.95
PURITY_SAMPLE = 5_000


def normalized(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (all-zero rows stay zero), in float32 (float64 stays float64)."""
    features = features if features.dtype == torch.float64 else features.float()
    return F.normalize(features, dim=1)


def balls(points: torch.Tensor, centres: torch.Tensor, radius: float, sq_norms: torch.Tensor) -> torch.Tensor:
    """Membership (len(centres), N): which of ``points`` lie within ``radius`` of each centre (a position into
    ``points``; every ball holds its centre). ``sq_norms`` are the points' squared norms."""
    block = squared_distances(points[centres], points, sq_norms) <= radius * radius
    block[torch.arange(len(centres), device=points.device), centres] = True
    return block


def probcover_greedy(points: torch.Tensor, labeled: np.ndarray, batch: int, radius: float,
                     progress: Optional[ProgressFn] = None) -> tuple[list[int], list[float]]:
    """Greedy max coverage of the balls of ``radius`` around ``points`` (N, E), starting from the points covered by
    the balls of the ``labeled`` rows: (positions in pick order, how many points each pick newly covered).

    Balls are recomputed in blocks of rows when needed, never stored: one pass over all N balls for their sizes,
    one ball per pick, and the balls of the newly covered points to lower the gains of the balls holding them
    (ball membership is symmetric), at most N of those over the whole run. Memory O(N + block × N)."""
    labeled = np.asarray(labeled, dtype=bool)
    n, device = points.shape[0], points.device
    if batch < 0 or batch > int((~labeled).sum()):
        raise ValueError(f"batch must be between 0 and the {int((~labeled).sum())} unlabeled points, got {batch}")
    sq_norms = (points * points).sum(dim=1)
    rows = block_rows(n)

    def blocks(index: torch.Tensor):
        for start in range(0, len(index), rows):
            yield index[start:start + rows]

    covered = torch.zeros(n, dtype=torch.bool, device=device)
    for centres in blocks(torch.as_tensor(np.flatnonzero(labeled), device=device)):
        covered |= balls(points, centres, radius, sq_norms).any(dim=0)
    size = torch.empty(n, dtype=torch.int64, device=device)  # points in each ball
    gain = torch.empty(n, dtype=torch.int64, device=device)  # points in each ball not yet covered
    for centres in blocks(torch.arange(n, device=device)):
        members = balls(points, centres, radius, sq_norms)
        size[centres] = members.sum(dim=1)
        gain[centres] = (members & ~covered).sum(dim=1)
    eligible = torch.as_tensor(~labeled, device=device)
    scale = int(size.max().item()) + 1 if n else 1
    positions: list[int] = []
    scores: list[float] = []
    for step in range(batch):
        key = torch.where(eligible, gain * scale + size, -1)  # most newly covered, then the larger ball
        pick = int(torch.argmax(key).item())  # the first maximum: the lowest position
        newly = torch.nonzero(balls(points, torch.tensor([pick], device=device), radius, sq_norms)[0]
                              & ~covered).flatten()
        covered[newly] = True
        for centres in blocks(newly):  # each ball holding a newly covered point gains one fewer
            gain -= balls(points, centres, radius, sq_norms).sum(dim=0)
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
    return probcover_greedy(normalized(features), labeled, batch, radius)[0]


@register_strategy("probcover")
class ProbCoverStrategy(PoolFeatureStrategy):
    """Cold-start coverage: greedy max coverage of δ-balls (``--radius``, default the purity rule)."""

    def pick(self, ctx: QueryContext, features: torch.Tensor, labeled: np.ndarray, batch: int
             ) -> tuple[list[int], list[float]]:
        points = normalized(features.to(ctx.device))
        radius = read_option(ctx.options, "radius", float, None)
        if radius is None:
            pseudo_labels = kmeans_labels(points, ctx.model.head.out_features, seed=ctx.seed)
            radius = purity_radius(points, pseudo_labels, seed=ctx.seed)
        elif not radius > 0:
            raise FmaskError(f"--radius {radius} must be positive; distances between normalised features lie in [0, 2]")
        return probcover_greedy(points, labeled, batch, float(radius), ctx.progress)
