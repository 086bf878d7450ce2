"""BAIT (Ash et al. 2021): greedy batch selection by the last-layer Fisher, on fmask's Fisher-greedy engine.

For sample x with penultimate features h_x and predicted probabilities p(x), the row for class y is
sqrt(p_y(x)) * grad_{head.weight} log p_y(x) = sqrt(p_y(x)) * (e_y - p(x)) (outer) h_x, so V_x^T V_x summed over y
is the expected Fisher of the classifier layer. Labeled samples enter M_0 with the same (model-predicted)
embeddings; F is their mean over candidates and labeled samples, as in the BAIT code.

Options (ctx.options): "lamb" (float, default 1.0), "float64" (bool), "backward_steps" (bool: pick 2x then
prune), "chunk_size" (int or None), "memory_limit" (bytes or None).
"""

from __future__ import annotations

import torch

from fmask.core import distributed
from fmask.core.errors import FmaskError
from fmask.query.base import GreedyOptions, QueryContext, Selection, Strategy
from fmask.query.fisher_greedy import (FisherGreedyOptions, default_memory_limit, plan_selection,
                                       select_by_fisher_greedy)
from fmask.query.registry import register_strategy

_SHRINK_HINT = "the fishermask strategy with a small --sparsity (BAIT's D = classes x embedding width is fixed)"


def bait_embeddings(probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(n, C, C*E) last-layer gradient embeddings: row y is sqrt(p_y) (e_y - p) (outer) h, flattened like head.weight.

    ``probs`` (n, C) are softmax probabilities, ``features`` (n, E) the penultimate embeddings; the result has
    ``features``' dtype.
    """
    n, num_classes = probs.shape
    probs = probs.to(features.dtype)
    eye = torch.eye(num_classes, dtype=features.dtype, device=features.device)
    # d log p_y / d logits = e_y - p; d logits_k / d W_kj = h_j.
    coefficients = probs.sqrt().unsqueeze(2) * (eye.unsqueeze(0) - probs.unsqueeze(1))  # (n, y, k)
    width = num_classes * features.shape[1]  # explicit: an empty shard (n = 0) cannot infer it
    return (coefficients.unsqueeze(3) * features[:, None, None, :]).reshape(n, num_classes, width)


@register_strategy("bait")
class BaitStrategy(Strategy):
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        def embed(candidates: list[int], labeled: list[int], options: GreedyOptions):
            # Blocks of whole forward batches (everything in one process): each rank's batches are the ones a
            # single process would run.
            mine = distributed.shard(candidates, align=ctx.batch_size)
            mine_labeled = distributed.shard(labeled, align=ctx.batch_size)
            self._check_fits(ctx, batch, len(candidates), len(mine), len(mine_labeled), options)
            pool = self._embeddings(ctx, mine, options.dtype)
            return pool, self._embeddings(ctx, mine_labeled, options.dtype) if mine_labeled else None

        return select_by_fisher_greedy(ctx, batch, embed, shrink_hint=_SHRINK_HINT)

    @staticmethod
    def _check_fits(ctx: QueryContext, batch: int, total: int, candidates: int, labeled: int,
                    options: GreedyOptions) -> None:
        """Fail on shapes before any forward pass or embedding is built (this rank's block of each set)."""
        num_classes, width = ctx.model.head.out_features, ctx.model.head.in_features
        rank, dim = num_classes, num_classes * width
        host_bytes = (candidates + labeled) * rank * dim * torch.empty(0, dtype=options.dtype).element_size()
        if host_bytes > default_memory_limit("cpu"):
            raise FmaskError(
                f"BAIT's embeddings for {candidates + labeled} samples need {host_bytes / 2**30:.1f} GiB "
                f"of RAM (D = {num_classes} classes x {width} features); use {_SHRINK_HINT}"
            )
        if 0 <= batch <= total:
            engine = FisherGreedyOptions(backward_steps=options.backward_steps, chunk_size=options.chunk_size,
                                         memory_limit=options.memory_limit, shrink_hint=_SHRINK_HINT)
            plan_selection(candidates, rank, dim, labeled, batch=batch, total_candidates=total, options=engine,
                           device=ctx.device, dtype=options.dtype,
                           inputs_on_device=torch.device(ctx.device).type == "cpu")  # embeddings are built on the CPU

    @staticmethod
    def _embeddings(ctx: QueryContext, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        logits, features = ctx.forward(ids)
        probs = torch.softmax(logits.to(dtype), dim=1)
        return bait_embeddings(probs, features.to(dtype))
