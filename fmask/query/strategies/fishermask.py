"""FisherMask (Gul et al. 2024): BAIT's greedy Fisher objective on per-class gradient embeddings restricted to
the top-k parameters by Fisher information (the ``--mask`` file from ``fmask fisher``).

Each sample's embedding V_x (classes x k) has rows sqrt(p_y(x)) grad log p_y(x) on the masked parameters; they
come from the mask's cache (computed once per round by ``fmask fisher``, or here when missing). Labeled samples
enter M_0, and the batch is picked by the engine in :mod:`fmask.query.fisher_greedy` (as for ``bait``).

Two points where the paper and the authors' code differ are options (default: the mask's recorded choice, which
defaults to the first of each):
- "embedding_rows": "scaled" (rows sqrt(p_y) grad log p_y, the paper's text) | "unscaled" (grad log p_y, the
  authors' code);
- "m0": "identity" (M_0 = lamb I + labeled Fisher, the authors' code) | "fisher" (lamb F + labeled Fisher, the
  paper's eq. 2, with a tiny ridge where F is singular; the greedy then runs in float64).
The strategies ``fishermask-unscaled`` and ``fishermask-m0fisher`` pin one of them, so an experiment can run them
side by side under their own names. The choice made is recorded in the query file ("details").

Other options (ctx.options): "lamb" (float, default 1.0), "float64" (bool), "backward_steps" (bool: pick 2x then
prune), "chunk_size" (int or None), "memory_limit" (bytes or None).
"""

from __future__ import annotations

import torch

from fmask.core.errors import FmaskError
from fmask.fisher.grads import check_embedding_rows
from fmask.fisher.step import check_m0
from fmask.query.base import GreedyOptions, QueryContext, Selection, Strategy, read_option
from fmask.query.fisher_greedy import select_by_fisher_greedy
from fmask.query.registry import register_strategy


@register_strategy("fishermask")
class FisherMaskStrategy(Strategy):
    needs_mask = True
    pinned: dict[str, str] = {}  # variant options a named variant fixes

    def variant(self, ctx: QueryContext) -> dict[str, str]:
        """{"embedding_rows": ..., "m0": ...}: the pinned values, else the options, else the mask's record."""
        chosen = {"embedding_rows": read_option(ctx.options, "embedding_rows", str, None) or ctx.mask.embedding_rows,
                  "m0": read_option(ctx.options, "m0", str, None) or ctx.mask.m0}
        for name, value in self.pinned.items():
            given = ctx.options.get(name)
            if given is not None and given != value:
                raise FmaskError(f"strategy {self.name!r} uses {name}={value}; drop --{name.replace('_', '-')} "
                                 f"{given}, or use the fishermask strategy")
            chosen[name] = value
        check_embedding_rows(chosen["embedding_rows"])
        check_m0(chosen["m0"])
        return chosen

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        if ctx.mask is None:
            raise FmaskError(f"the {self.name} strategy needs --mask; run `fmask fisher --ckpt CKPT --out MASK` first")
        variant = self.variant(ctx)

        def embed(candidates: list[int], labeled: list[int], _options: GreedyOptions):
            # This rank's block of each set (all of it in one process): from the mask's cache, or computed.
            return ctx.mask.embeddings(ctx.model, ctx.pool, candidates, labeled, device=ctx.device,
                                       rows=variant["embedding_rows"], progress=ctx.progress, block=True)

        # M_0 = lamb F is ill-conditioned where F is nearly singular: float32 loses it.
        selection = select_by_fisher_greedy(ctx, batch, embed, m0=variant["m0"],
                                            dtype=torch.float64 if variant["m0"] == "fisher" else None)
        selection.details = variant
        return selection


@register_strategy("fishermask-unscaled")
class FisherMaskUnscaledStrategy(FisherMaskStrategy):
    """FisherMask with the authors' code's embedding rows grad log p_y (no sqrt(p_y) weight)."""

    pinned = {"embedding_rows": "unscaled"}


@register_strategy("fishermask-m0fisher")
class FisherMaskM0FisherStrategy(FisherMaskStrategy):
    """FisherMask starting the greedy from the paper's eq. (2): M_0 = lamb F + the labeled Fisher."""

    pinned = {"m0": "fisher"}
