"""Least-confidence sampling: pick the candidates whose most likely class is least likely."""

from fmask.query.base import QueryContext, Selection, Strategy, top_scores
from fmask.query.registry import register_strategy
from fmask.query.uncertainty import least_confidence_scores


@register_strategy("least-confidence")
class LeastConfidenceStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        return top_scores(ctx, least_confidence_scores(ctx.probs()), batch)
