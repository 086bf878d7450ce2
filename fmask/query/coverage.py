"""What the cold-start strategies that pick from the features of the whole pool share (TypiClust, ProbCover):
the candidates' and labeled samples' features in one matrix, and the select that turns their picks into ids."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from fmask.query.base import QueryContext, Selection, Strategy


def candidate_and_labeled_features(ctx: QueryContext) -> tuple[torch.Tensor, np.ndarray]:
    """Features of the candidates then the labeled samples (N, E), and the mask of the labeled rows."""
    candidates, labeled = ctx.features(ctx.unlabeled_ids), ctx.features(ctx.labeled_ids)
    mask = np.zeros(len(candidates) + len(labeled), dtype=bool)
    mask[len(candidates):] = True
    return torch.cat([candidates, labeled]), mask


class PoolFeatureStrategy(Strategy):
    """A strategy that sees only the features of the whole pool (labeled rows marked), so it runs from a cold start
    on a pretrained backbone before any checkpoint exists."""

    cold_start = True

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        # Imported here: a strategy module, which importing first would load (and register) every strategy
        # while this module is half-initialised.
        from fmask.query.strategies.kcenter import check_batch

        check_batch(ctx, batch)
        features, labeled = candidate_and_labeled_features(ctx)
        positions, scores = self.pick(ctx, features, labeled, batch)
        return Selection(ids=[ctx.unlabeled_ids[p] for p in positions], scores=scores)

    @abstractmethod
    def pick(self, ctx: QueryContext, features: torch.Tensor, labeled: np.ndarray, batch: int
             ) -> tuple[list[int], list[float]]:
        """Positions among the candidate rows (the first len(ctx.unlabeled_ids) of ``features``) and their scores."""
