"""Random sampling: the baseline every strategy must beat."""

import torch

from fmask.query.base import QueryContext, Selection, Strategy
from fmask.query.registry import register_strategy


@register_strategy("random")
class RandomStrategy(Strategy):
    cold_start = True
    needs_model = False  # picks the first batch of a pool that has no labels yet, without any model

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        order = torch.randperm(len(ctx.unlabeled_ids), generator=ctx.generator())[:batch].tolist()
        return Selection(ids=[ctx.unlabeled_ids[i] for i in order], scores=[0.0] * len(order))
