"""Margin sampling: pick the candidates whose two most likely classes are closest."""

import torch

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy


def margin_scores(probs: torch.Tensor) -> torch.Tensor:
    """Negative gap between the top two probabilities: higher means more uncertain."""
    top2 = probs.topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])


@register_strategy("margin")
class MarginStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, margin_scores(ctx.probs()), batch)
