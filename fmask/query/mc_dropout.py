"""Monte Carlo dropout (Gal & Ghahramani 2016) for BALD and BatchBALD: S stochastic forward passes through a model
trained with ``fmask train --mc-dropout p``.

fmask's only dropout layer sits right before the head and everything under it runs in eval mode, so the S passes
share one pass through the body: the penultimate features are computed once (the query's cached forward pass) and
only dropout and the head run S times. Each pass drops every feature with probability p and scales the rest by
1/(1 − p), as ``nn.Dropout`` does in training, with masks drawn from a generator seeded with the query's seed on
the model's device: the passes are reproducible, and dropout is active in them alone (the model stays in eval mode).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Optional

import torch
from torch import nn

from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext, Selection, Strategy, read_option, require_labeled
from fmask.core.progress import ProgressFn
from fmask.train.models import head_dropout_rate

DEFAULT_MC_SAMPLES = 20
DEFAULT_CHUNK_ROWS = 1024


@torch.no_grad()
def mc_dropout_log_probs(features: torch.Tensor, head: nn.Module, rate: float, samples: int, *,
                         generator: torch.Generator, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                         progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """log softmax(head(dropout_p(h))) for ``samples`` dropout masks per row h of ``features`` (N, E): (N, S, C).

    Runs on the device of ``features``; ``generator`` must live there too. Memory: ``chunk_rows`` × S × E masks.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout rate must be in (0, 1), got {rate}")
    if samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    n, width = features.shape
    keep = 1.0 - rate
    out = torch.empty(n, samples, head.out_features, device=features.device)
    for start in range(0, n, chunk_rows):
        rows = features[start:start + chunk_rows]
        kept = torch.rand((rows.shape[0], samples, width), generator=generator, device=rows.device) < keep
        dropped = (rows / keep)[:, None, :] * kept
        out[start:start + rows.shape[0]] = torch.log_softmax(head(dropped.to(head.weight.dtype)).float(), dim=-1)
        if progress is not None:
            progress("MC dropout passes", min(start + chunk_rows, n), n)
    return out


def mc_samples_option(ctx: QueryContext) -> int:
    samples = read_option(ctx.options, "mc_samples", int, DEFAULT_MC_SAMPLES)
    if isinstance(samples, bool) or samples < 2:
        raise FmaskError(f"--mc-samples {samples} is too few: BALD needs at least 2 dropout passes; pass e.g. 20")
    return samples


def candidate_log_probs(ctx: QueryContext, strategy: str) -> torch.Tensor:
    """MC-dropout log-probabilities (N, S, C) of ``ctx.unlabeled_ids`` on ``ctx.device`` (cached per context).

    Refuses a model without a dropout layer before its head, naming the flag that adds one."""
    rate = head_dropout_rate(ctx.model)
    if rate <= 0.0:
        raise FmaskError(f"strategy {strategy!r} needs a checkpoint trained with dropout before the head; retrain "
                         "it with `fmask train --mc-dropout 0.3`")
    samples = mc_samples_option(ctx)
    key = ("mc_dropout", samples, tuple(ctx.unlabeled_ids))
    if key not in ctx._cache:
        features = ctx.features(ctx.unlabeled_ids).to(ctx.device)
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        ctx._cache[key] = mc_dropout_log_probs(features, ctx.model.head, rate, samples, generator=generator,
                                               progress=ctx.progress)
    return ctx._cache[key]


class McDropoutStrategy(Strategy):
    """A strategy scoring the candidates from MC dropout passes (BALD, BatchBALD): it needs a head trained on labels
    and a model trained with dropout before its head; both are refused before any pass runs."""

    needs_labels = True
    needs_mc_dropout = True

    def select(self, ctx: QueryContext, batch: int) -> Selection:
        require_labeled(ctx, self.name)
        from fmask.query.strategies.kcenter import check_batch  # here: see fmask.query.coverage

        check_batch(ctx, batch)
        settings = self.settings(ctx)  # options are refused before the passes run
        return self.pick(ctx, candidate_log_probs(ctx, self.name), batch, **settings)

    def settings(self, ctx: QueryContext) -> dict[str, Any]:
        """The strategy's own options read from ``ctx.options``, passed to ``pick`` as keywords."""
        return {}

    @abstractmethod
    def pick(self, ctx: QueryContext, log_probs: torch.Tensor, batch: int, **settings: Any) -> Selection:
        """The selection from ``log_probs`` (N, S, C) of the candidates."""
