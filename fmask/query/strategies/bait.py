"""BAIT (Ash et al. 2021): greedy batch selection by the last-layer Fisher, on fmask's Fisher-greedy engine.

For sample x with penultimate features h_x and predicted probabilities p(x), the row for class y is
sqrt(p_y(x)) * grad_{head.weight} log p_y(x) = sqrt(p_y(x)) * (e_y - p(x)) (outer) h_x, so V_x^T V_x summed over y
is the expected Fisher of the classifier layer. Labeled samples enter M_0 with the same (model-predicted)
embeddings; F is their mean over candidates and labeled samples, as in the BAIT code.

Options (ctx.options): "lamb" (float, default 1.0), "float64" (bool), "backward_steps" (bool: pick 2x then
prune), "chunk_size" (int or None), "memory_limit" (bytes or None).
"""

from __future__ import annotations

from typing import Any

import torch

from fmask.core import distributed
from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext, Selection, Strategy, greedy_options
from fmask.query.fisher_greedy import default_memory_limit, fisher_greedy_detailed, plan_fisher_greedy
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
        lamb, dtype, backward_steps, chunk_size, memory_limit = greedy_options(ctx.options)

        candidates, labeled = list(ctx.unlabeled_ids), list(ctx.labeled_ids)
        if distributed.is_distributed():
            return self._select_sharded(ctx, batch, candidates, labeled, lamb=lamb, dtype=dtype,
                                        backward_steps=backward_steps, chunk_size=chunk_size,
                                        memory_limit=memory_limit)
        num_classes, width = ctx.model.head.out_features, ctx.model.head.in_features
        rank, dim = num_classes, num_classes * width
        # Fail on shapes before any forward pass or embedding is built.
        host_bytes = (len(candidates) + len(labeled)) * rank * dim * torch.empty(0, dtype=dtype).element_size()
        if host_bytes > default_memory_limit("cpu"):
            raise FmaskError(
                f"BAIT's embeddings for {len(candidates) + len(labeled)} samples need {host_bytes / 2**30:.1f} GiB "
                f"of RAM (D = {num_classes} classes x {width} features); use {_SHRINK_HINT}"
            )
        forward_count = min(2 * batch, len(candidates)) if backward_steps else batch
        if 0 <= batch <= len(candidates):
            plan_fisher_greedy(
                len(candidates), rank, dim, len(labeled), steps=2 * forward_count - batch, dtype=dtype,
                device=ctx.device, chunk_size=chunk_size, memory_limit=memory_limit, shrink_hint=_SHRINK_HINT,
                inputs_on_device=torch.device(ctx.device).type == "cpu",  # the embeddings are built on the CPU
            )

        pool = self._embeddings(ctx, candidates, dtype)
        labeled_embeddings = self._embeddings(ctx, labeled, dtype) if labeled else None
        result = fisher_greedy_detailed(
            pool, batch, labeled_embeddings, lamb=lamb, backward_steps=backward_steps, dtype=dtype,
            chunk_size=chunk_size, device=ctx.device, memory_limit=memory_limit, shrink_hint=_SHRINK_HINT,
            progress=ctx.progress,
        )
        return Selection(ids=[candidates[p] for p in result.positions], scores=result.gains)

    def _select_sharded(self, ctx: QueryContext, batch: int, candidates: list[int], labeled: list[int],
                        **engine: Any) -> Selection:
        """Under torchrun: each rank forwards and embeds only its block of candidates and labeled samples."""
        from fmask.query.fisher_greedy_dist import fisher_greedy_distributed

        dtype = engine["dtype"]
        # Blocks of whole forward batches: each rank's batches are the ones a single process would run.
        pool = self._embeddings(ctx, distributed.shard(candidates, align=ctx.batch_size), dtype)
        local_labeled = distributed.shard(labeled, align=ctx.batch_size)
        labeled_embeddings = self._embeddings(ctx, local_labeled, dtype) if local_labeled else None
        result = fisher_greedy_distributed(pool, batch, labeled_embeddings, device=ctx.device,
                                           shrink_hint=_SHRINK_HINT, progress=ctx.progress, **engine)
        return Selection(ids=[candidates[p] for p in result.positions], scores=result.gains)

    @staticmethod
    def _embeddings(ctx: QueryContext, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
        logits, features = ctx.forward(ids)
        probs = torch.softmax(logits.to(dtype), dim=1)
        return bait_embeddings(probs, features.to(dtype))
