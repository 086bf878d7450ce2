"""Entropy sampling: pick the candidates whose predicted class distribution has the most entropy."""

import torch

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy


def entropy_scores(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row of ``probs`` (n, C); 0·log 0 counts as 0."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)


@register_strategy("entropy")
class EntropyStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, entropy_scores(ctx.probs()), batch)
