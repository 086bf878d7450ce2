"""FisherMask (Gul et al. 2024): BAIT's greedy Fisher objective on per-class gradient embeddings restricted to
the top-k parameters by Fisher information (the ``--mask`` file from ``fmask fisher``).

Each sample's embedding V_x (classes x k) has rows sqrt(p_y(x)) grad log p_y(x) on the masked parameters; they
come from the mask's cache (computed once per round by ``fmask fisher``, or here when missing). Labeled samples
enter M_0, and the batch is picked by :func:`fmask.query.fisher_greedy.fisher_greedy_detailed`.

Options (ctx.options): "lamb" (float, default 1.0), "float64" (bool), "backward_steps" (bool: pick 2x then
prune), "chunk_size" (int or None), "memory_limit" (bytes or None).
"""

from __future__ import annotations

from typing import Any

from fmask import distributed
from fmask.errors import FmaskError
from fmask.query.base import QueryContext, Selection, Strategy, greedy_options
from fmask.query.fisher_greedy import fisher_greedy_detailed
from fmask.query.registry import register_strategy


@register_strategy("fishermask")
class FisherMaskStrategy(Strategy):
    needs_mask = True

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        if ctx.mask is None:
            raise FmaskError("the fishermask strategy needs --mask; run `fmask fisher --ckpt CKPT --out MASK` first")
        lamb, dtype, backward_steps, chunk_size, memory_limit = greedy_options(ctx.options)

        candidates, labeled = list(ctx.unlabeled_ids), list(ctx.labeled_ids)
        if distributed.is_distributed():
            return self._select_sharded(ctx, batch, candidates, labeled, lamb=lamb, dtype=dtype,
                                        backward_steps=backward_steps, chunk_size=chunk_size,
                                        memory_limit=memory_limit)
        pool, labeled_embeddings = ctx.mask.embeddings(
            ctx.model, ctx.pool, candidates, labeled, device=ctx.device, progress=ctx.progress
        )
        result = fisher_greedy_detailed(
            pool, batch, labeled_embeddings if labeled else None, lamb=lamb, backward_steps=backward_steps,
            dtype=dtype, chunk_size=chunk_size, device=ctx.device, memory_limit=memory_limit, progress=ctx.progress,
        )
        return Selection(ids=[candidates[p] for p in result.positions], scores=result.gains)

    @staticmethod
    def _select_sharded(ctx: QueryContext, batch: int, candidates: list[int], labeled: list[int], **engine: Any
                        ) -> Selection:
        """Under torchrun: each rank holds its block of the embeddings and of the greedy state."""
        from fmask.distributed_fisher import local_mask_embeddings
        from fmask.query.fisher_greedy_dist import fisher_greedy_distributed

        pool, labeled_embeddings = local_mask_embeddings(ctx.mask, ctx.model, ctx.pool, candidates, labeled,
                                                         device=ctx.device, progress=ctx.progress)
        result = fisher_greedy_distributed(pool, batch, labeled_embeddings if labeled else None, device=ctx.device,
                                           progress=ctx.progress, **engine)
        return Selection(ids=[candidates[p] for p in result.positions], scores=result.gains)
