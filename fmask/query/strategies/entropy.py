"""Entropy sampling: pick the candidates whose predicted class distribution has the most entropy."""

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy
from fmask.query.uncertainty import entropy_scores


@register_strategy("entropy")
class EntropyStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, entropy_scores(ctx.probs()), batch)
