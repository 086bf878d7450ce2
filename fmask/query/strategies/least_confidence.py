"""Least-confidence sampling: pick the candidates whose most likely class is least likely."""

import torch

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy


def least_confidence_scores(probs: torch.Tensor) -> torch.Tensor:
    """One minus the top probability: higher means less confident."""
    return 1.0 - probs.max(dim=1).values


@register_strategy("least-confidence")
class LeastConfidenceStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, least_confidence_scores(ctx.probs()), batch)
