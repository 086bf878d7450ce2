"""BALD (Houlsby et al. 2011): pick the candidates whose label the model's weights disagree on most.

With S Monte Carlo dropout passes (fmask.query.mc_dropout), the score is the mutual information between the label
and the weights, I[y; w | x] = H[mean_s p_s(y | x)] − mean_s H[p_s(y | x)]: the predictive entropy minus the
expected entropy of one pass. It is high where the passes are each confident but disagree with one another.
"""

from __future__ import annotations

import math

import torch

from fmask.query.base import QueryContext, Selection, top_scores
from fmask.query.mc_dropout import McDropoutStrategy
from fmask.query.registry import register_strategy

ROWS_PER_CHUNK = 8192  # bounds the float64 copies to 8192 × S × C


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """−Σ_c p log p over the last axis, from log p (0 · log 0 counts as 0)."""
    finite = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)  # -inf would give 0 · -inf = NaN
    return -(finite.exp() * finite).sum(dim=-1)


def expected_entropies(log_probs: torch.Tensor) -> torch.Tensor:
    """mean_s H[p_s(y | x)] for every candidate of ``log_probs`` (N, S, C): float64, (N,)."""
    out = torch.empty(log_probs.shape[0], dtype=torch.float64, device=log_probs.device)
    for start in range(0, log_probs.shape[0], ROWS_PER_CHUNK):
        out[start:start + ROWS_PER_CHUNK] = _entropy_from_log_probs(
            log_probs[start:start + ROWS_PER_CHUNK].double()).mean(dim=1)
    return out


def bald_scores(log_probs: torch.Tensor) -> torch.Tensor:
    """Mutual information I[y; w | x] of every candidate of ``log_probs`` (N, S, C): float64, (N,)."""
    samples = log_probs.shape[1]
    out = torch.empty(log_probs.shape[0], dtype=torch.float64, device=log_probs.device)
    for start in range(0, log_probs.shape[0], ROWS_PER_CHUNK):
        chunk = log_probs[start:start + ROWS_PER_CHUNK].double()
        mean_log_probs = torch.logsumexp(chunk, dim=1) - math.log(samples)  # log of the mean over passes
        out[start:start + ROWS_PER_CHUNK] = (_entropy_from_log_probs(mean_log_probs)
                                             - _entropy_from_log_probs(chunk).mean(dim=1))
    return out


@register_strategy("bald")
class BaldStrategy(McDropoutStrategy):
    """Top BALD scores from MC dropout passes (``--mc-samples``, default 20)."""

    def pick(self, ctx: QueryContext, log_probs: torch.Tensor, batch: int) -> Selection:
        return top_scores(ctx, bald_scores(log_probs).cpu(), batch)
