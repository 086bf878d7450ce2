"""Margin sampling: pick the candidates whose two most likely classes are closest."""

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy
from fmask.query.uncertainty import margin_scores


@register_strategy("margin")
class MarginStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, margin_scores(ctx.probs()), batch)
