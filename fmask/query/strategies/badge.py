"""BADGE (Ash et al. 2020): k-means++ seeding on last-layer gradient embeddings.

A candidate's gradient embedding is the gradient of the cross-entropy loss under its own predicted label ŷ
with respect to the classifier weights: g_x = (p_x − e_ŷ) ⊗ h_x, of size C·E. It is never built: with
r_x = p_x − e_ŷ,

    ⟨g_x, g_y⟩ = ⟨r_x, r_y⟩ · ⟨h_x, h_y⟩        ‖g_x‖² = ‖r_x‖² · ‖h_x‖²
    ‖g_x − g_y‖² = ‖g_x‖² + ‖g_y‖² − 2 ⟨r_x, r_y⟩⟨h_x, h_y⟩

so each k-means++ step costs one (N, C) and one (N, E) matrix-vector product and O(N) memory instead of
an N x (C·E) matrix.

Seeding follows BADGE's reference code: the first center is the candidate with the largest gradient norm
(ties: lowest position); every later center is drawn from ``generator`` with probability proportional to
its squared distance to the nearest center chosen so far. Distances are computed in float64 (the features
are converted once, N·E·8 bytes) so the draws do not depend on float32 rounding.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fmask.core.progress import ProgressFn
from fmask.query.base import QueryContext, Selection, Strategy, check_batch
from fmask.query.clustering import DEFAULT_CHUNK_SIZE, chunked_sq_norms, distance_options, kmeans_plus_plus
from fmask.query.registry import register_strategy

Device = Union[torch.device, str, None]


def gradient_embedding_residuals(probs: torch.Tensor) -> torch.Tensor:
    """r = p − e_ŷ (float64, (N, C)) with ŷ the predicted class (ties: lowest class index)."""
    residuals = probs.double().clone()
    predicted = torch.argmax(residuals, dim=1)  # the first maximum on ties
    residuals[torch.arange(residuals.shape[0], device=residuals.device), predicted] -= 1.0
    return residuals


def gradient_embedding_sq_norms(
    residuals: torch.Tensor, features: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """‖g_x‖² = ‖r_x‖² ‖h_x‖² for every candidate (float64, (N,))."""
    return (residuals.double() ** 2).sum(dim=1) * chunked_sq_norms(features, chunk_size)


def gradient_embedding_sq_distances(
    residuals: torch.Tensor,
    features: torch.Tensor,
    centers: Sequence[int],
    *,
    sq_norms: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """‖g_x − g_c‖² for every candidate x and every position c in ``centers`` (float64, (N, len(centers))).

    Factorized: only (N, C) and (chunk_size, E) float64 blocks are formed. ``sq_norms`` may pass
    precomputed :func:`gradient_embedding_sq_norms`.
    """
    residuals = residuals.double()
    if sq_norms is None:
        sq_norms = gradient_embedding_sq_norms(residuals, features, chunk_size=chunk_size)
    index = torch.as_tensor(list(centers), dtype=torch.long, device=features.device)
    center_residuals = residuals[index]  # (K, C)
    center_features = features[index].double()  # (K, E)
    residual_dots = residuals @ center_residuals.T  # (N, K)
    out = torch.empty(features.shape[0], len(index), dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], chunk_size):
        feature_dots = features[start : start + chunk_size].double() @ center_features.T
        out[start : start + chunk_size] = feature_dots * residual_dots[start : start + chunk_size]
    out.mul_(-2.0).add_(sq_norms[:, None]).add_(sq_norms[index][None, :])
    # Cancellation in the expanded form can leave tiny negatives for coincident embeddings.
    return out.clamp_(min=0.0)


def badge_select(
    probs: torch.Tensor,
    features: torch.Tensor,
    batch: int,
    *,
    generator: torch.Generator,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: Device = None,
    progress: Optional[ProgressFn] = None,
) -> tuple[list[int], list[float]]:
    """k-means++ seeding of ``batch`` centers on the gradient embeddings of (``probs`` (N, C), ``features`` (N, E)).

    Returns (positions in pick order, each pick's gradient-embedding distance to its nearest earlier center;
    the first pick, the largest-norm candidate, reports its norm). If every remaining candidate coincides
    with a chosen center (all weights zero), the lowest remaining position is taken without a draw.
    Work runs on ``device`` (default: the device of ``features``); ``generator`` is a CPU generator.
    """
    n = features.shape[0]
    if batch < 0 or batch > n:
        raise ValueError(f"batch must be between 0 and the {n} candidates, got {batch}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if batch == 0:
        return [], []
    target = torch.device(device) if device is not None else features.device
    features = features.to(device=target, dtype=torch.float64)
    residuals = gradient_embedding_residuals(probs.to(target))
    sq_norms = gradient_embedding_sq_norms(residuals, features, chunk_size=chunk_size)

    def to(center: int) -> torch.Tensor:
        return gradient_embedding_sq_distances(residuals, features, [center], sq_norms=sq_norms,
                                               chunk_size=chunk_size)[:, 0]

    return kmeans_plus_plus(sq_norms, to, batch, generator=generator, progress=progress, task="BADGE k-means++")


@register_strategy("badge")
class BadgeStrategy(Strategy):
    """Diverse and uncertain: k-means++ over gradient embeddings of the predicted-label loss."""

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        check_batch(ctx, batch)
        positions, distances = badge_select(ctx.probs(), ctx.features(ctx.unlabeled_ids), batch,
                                            **distance_options(ctx))
        return Selection(ids=[ctx.unlabeled_ids[i] for i in positions], scores=distances)
