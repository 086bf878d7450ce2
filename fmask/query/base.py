"""The one selection contract every strategy follows.

A strategy gets a :class:`QueryContext` (model, pool, labeled and candidate ids, device, seed, options)
and returns a :class:`Selection`: exactly ``batch`` distinct candidate sample ids in selection order,
never a labeled id, reproducible under ``ctx.seed``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from fmask.core.errors import FmaskError
from fmask.core.numerics import autocast, resolve_precision
from fmask.core.progress import ProgressFn



@dataclass
class Selection:
    """What a strategy picked: ``ids`` in selection order (sample ids; positions for a tensor pool in
    :func:`fmask.select`), ``scores[i]`` the score ``ids[i]`` had when it was picked."""

    ids: list[int]  # sample ids, in selection order
    scores: list[float]  # the score each id had when it was picked (strategy-specific meaning)
    details: dict[str, Any] = field(default_factory=dict)  # choices worth recording in the query file


@dataclass
class QueryContext:
    model: Optional[nn.Module]  # eval mode, on ``device``; has forward_features(x) and head (nn.Linear); None for
    # strategies that use no model (``needs_model = False``)
    pool: Any  # fmask.pool.pool.Pool, fmask.train.features.FeaturePool or fmask.pool.tensor.TensorPool:
    # pool.inputs(ids, device) -> what the model takes (normalised images (n, C, H, W) or features (n, E))
    labeled_ids: list[int]
    unlabeled_ids: list[int]  # the candidates, ascending sample ids
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    mask: Any = None  # the loaded --mask file (fmask.fisher.MaskFile) or None
    options: dict[str, Any] = field(default_factory=dict)  # lamb, float64, backward_steps, ...
    batch_size: int = 256  # inference chunk size
    progress: Optional[ProgressFn] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed``: the same seed gives the same draws."""
        return torch.Generator().manual_seed(self.seed)

    def report(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)

    @torch.no_grad()
    def forward(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (n, C), penultimate features (n, E)) for ``ids``, float32 on CPU, cached."""
        key = ("forward", tuple(ids))
        if key not in self._cache:
            # options["precision"]: fp32 by default, since scores rank candidates by small differences;
            # auto | bf16 | fp16 trade that for speed on GPUs.
            precision = resolve_precision(self.options.get("precision", "fp32"), self.device)
            memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
            # Results go into tensors allocated once: small per-batch pieces kept until the end would sit between
            # the freed batch buffers and fragment the heap, which then grows with the pool.
            logits = torch.empty(len(ids), self.model.head.out_features)
            feats = torch.empty(len(ids), self.model.head.in_features)
            for start in range(0, len(ids), self.batch_size):
                stop = min(start + self.batch_size, len(ids))
                # A built pool reads each batch's rows from its memory-mapped uint8 cache (never the whole pool in
                # host memory) and normalises them on the device.
                x = self.pool.inputs(ids[start:stop], self.device)
                if x.dim() == 4:  # images (cached backbone features are (n, E))
                    x = x.contiguous(memory_format=memory_format)
                with autocast(precision, self.device):
                    h = self.model.forward_features(x)
                    logits[start:stop] = self.model.head(h).float().cpu()
                feats[start:stop] = h.float().cpu()
                self.report("forward pass", stop, len(ids))
            self._cache[key] = (logits, feats)
        return self._cache[key]

    def probs(self) -> torch.Tensor:
        """Softmax probabilities of the candidates (len(unlabeled_ids), C)."""
        return torch.softmax(self.forward(self.unlabeled_ids)[0], dim=1)

    def features(self, ids: Sequence[int]) -> torch.Tensor:
        """Penultimate-layer embeddings (n, E) of ``ids``."""
        return self.forward(ids)[1]


class Strategy(ABC):
    """Base class of all strategies; ``name`` is set by ``@register_strategy``."""

    name: str = ""
    needs_mask: bool = False  # True: ``fmask query`` refuses to run without --mask
    needs_labels: bool = False  # True: scores come from a head trained on labels; an empty labeled set is refused
    needs_mc_dropout: bool = False  # True: needs a checkpoint trained with --mc-dropout (``fmask run`` trains one)
    cold_start: bool = False  # True: uses no prediction, so it runs on a pretrained backbone without a checkpoint
    needs_model: bool = True  # False: uses no model at all, so it runs without --ckpt and without a backbone (the
    # first batch of a pool with no labels)

    @abstractmethod
    def select(self, ctx: QueryContext, batch: int) -> Selection:
        """Pick ``batch`` distinct ids from ``ctx.unlabeled_ids``."""


def require_labeled(ctx: QueryContext, strategy: str) -> None:
    """Refuse the cold start for a strategy whose scores need a classifier trained on labels."""
    if not ctx.labeled_ids:
        raise FmaskError(f"strategy {strategy!r} needs a model trained on labeled samples and the labeled set is empty; "
                         "start with typiclust, probcover, kcenter or random")


def top_scores(ctx: QueryContext, scores: torch.Tensor, batch: int) -> Selection:
    """Highest ``scores`` first (aligned with ctx.unlabeled_ids); ties go to the lowest sample id."""
    # A stable sort on -score keeps ascending-id order among equal scores.
    order = torch.sort(-scores.double(), stable=True).indices[:batch].tolist()
    return Selection(ids=[ctx.unlabeled_ids[i] for i in order], scores=[float(scores[i]) for i in order])


def read_option(options: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """A strategy option of type ``kind`` (None keeps the default); anything else is refused in one line."""
    value = options.get(name, default)
    if value is None or isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return value
    raise FmaskError(f"option {name!r} must be {kind.__name__}, got {value!r}; fix --{name.replace('_', '-')}")


class GreedyOptions(NamedTuple):
    """The Fisher-greedy engine's options, as fishermask and bait read them from ``ctx.options``."""

    lamb: float
    dtype: torch.dtype
    backward_steps: bool
    chunk_size: Optional[int]
    memory_limit: Optional[int]


def greedy_options(options: dict[str, Any]) -> GreedyOptions:
    return GreedyOptions(
        lamb=float(read_option(options, "lamb", float, 1.0)),
        dtype=torch.float64 if read_option(options, "float64", bool, False) else torch.float32,
        backward_steps=bool(read_option(options, "backward_steps", bool, False)),
        chunk_size=read_option(options, "chunk_size", int, None),
        memory_limit=read_option(options, "memory_limit", int, None),
    )
