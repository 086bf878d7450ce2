"""``fmask.select``: run a registered strategy on a model and a pool held in memory and get the selection back,
without writing anything. It selects through the same :func:`fmask.query.step.run_strategy` as ``fmask query``."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fmask.core.device import resolve_device
from fmask.core.errors import FmaskError
from fmask.core.labeled import LabeledSet
from fmask.core.progress import ProgressFn
from fmask.fisher.step import EMBED_DTYPES, MaskFile, check_embedding_memory, load_mask
from fmask.fisher.grads import masked_embeddings
from fmask.pool.pool import Pool, load_pool
from fmask.pool.tensor import TensorPool
from fmask.query.base import QueryContext, Selection
from fmask.query.step import check_batch_fits, run_strategy, strategy_for_batch

PoolLike = Pool | torch.Tensor | str | os.PathLike
MaskLike = MaskFile | str | os.PathLike


class InMemoryMask(MaskFile):
    """A loaded mask whose gradient embeddings are computed in memory with the model given, never read from or
    written to the cache beside the mask file (that cache belongs to the mask's checkpoint and pool)."""

    def embeddings(self, model: nn.Module, pool: Any, unlabeled_ids: Sequence[int], labeled_ids: Sequence[int], *,
                   device: Optional[torch.device] = None, dtype: Optional[str] = None, rows: Optional[str] = None,
                   batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or self.metadata.get("embed_dtype", "float32")
        if dtype not in EMBED_DTYPES:
            raise FmaskError(f"unknown embedding dtype {dtype!r}; use one of: {', '.join(EMBED_DTYPES)}")
        num_classes = model.head.out_features
        check_embedding_memory(len(unlabeled_ids) + len(labeled_ids), num_classes, self.k, dtype)
        columns = self.columns
        return tuple(  # type: ignore[return-value]
            masked_embeddings(model, lambda positions, ids=list(ids): pool.inputs([ids[i] for i in positions]),
                              columns, num_samples=len(ids), batch_size=batch_size, dtype=EMBED_DTYPES[dtype],
                              device=device, num_classes=num_classes, rows=rows or self.embedding_rows,
                              progress=progress)
            for ids in (unlabeled_ids, labeled_ids))


def _as_int_list(values: Any, what: str) -> list:
    if isinstance(values, LabeledSet):
        return list(values.ids)
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise FmaskError(f"{what} must be a list of integers, got {type(values).__name__}")
    return list(values)


def _open_pool(pool: PoolLike, labeled: Any) -> tuple[Pool | TensorPool, list[int]]:
    """The pool and the labeled ids checked against it: sample ids of a built pool, positions of a tensor."""
    if isinstance(pool, (str, os.PathLike)):
        pool = load_pool(pool)
    if isinstance(labeled, LabeledSet) and not isinstance(pool, Pool):
        raise FmaskError(f"labeled set {labeled.path} names sample ids of a built pool; with a tensor pool, pass the "
                         "labeled rows' positions")
    if isinstance(labeled, LabeledSet) and labeled.data["pool"] != pool.hash:
        raise FmaskError(f"labeled set {labeled.path} belongs to another pool; pass the pool it was made for")
    ids = _as_int_list(labeled, "labeled")
    if isinstance(pool, torch.Tensor):
        pool = TensorPool(pool)
        ids = pool.positions(ids, "labeled position")
    elif isinstance(pool, Pool):
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int)), None)
        if bad is not None:
            raise FmaskError(f"labeled sample id {bad!r} is not an integer; pass ids from pool.ids")
        pool.rows(ids)  # refuses an id the pool does not hold
    else:
        raise FmaskError(f"pool must be a pool from fmask.load_pool (or its directory) or a float tensor (N, C, H, W), "
                         f"got {type(pool).__name__}")
    if len(set(ids)) != len(ids):
        raise FmaskError(f"labeled lists {next(i for i in ids if ids.count(i) > 1)} twice; each sample is labeled once")
    return pool, ids


def _check_model(model: Any, strategy: str, needs_model: bool) -> None:
    if model is None:
        if needs_model:
            raise FmaskError(f"strategy {strategy!r} needs a model; pass model=fmask.load_model(CHECKPOINT)")
        return
    if not isinstance(model, nn.Module) or not callable(getattr(model, "forward_features", None)) or \
            not isinstance(getattr(model, "head", None), nn.Linear):
        raise FmaskError("model must be an fmask model (fmask.load_model(CHECKPOINT)): an nn.Module with "
                         f"forward_features(x) and a linear head, got {type(model).__name__}")


def _open_mask(mask: Optional[MaskLike], pool: Pool | TensorPool, strategy: str, needs_mask: bool
               ) -> Optional[InMemoryMask]:
    if mask is None:
        if needs_mask:
            raise FmaskError(f"strategy {strategy!r} needs mask= (a file from `fmask fisher --ckpt CKPT --out MASK`, "
                             "or fmask.load_mask of one)")
        return None
    if not needs_mask:
        raise FmaskError(f"strategy {strategy!r} uses no mask; drop mask=")
    if isinstance(mask, (str, os.PathLike)):
        mask = load_mask(mask, checkpoint_hash=None)
    if not isinstance(mask, MaskFile):
        raise FmaskError(f"mask must be a path to a file `fmask fisher` wrote or fmask.load_mask of one, got "
                         f"{type(mask).__name__}")
    if isinstance(pool, Pool) and mask.metadata.get("pool") != pool.hash:
        raise FmaskError(f"mask {mask.path} was made on another pool (hash {str(mask.metadata.get('pool'))[:12]}, "
                         f"this pool {pool.hash[:12]}); pass the pool its checkpoint was trained on")
    return InMemoryMask(**vars(mask))


@contextmanager
def _eval_mode(model: Optional[nn.Module]) -> Iterator[None]:
    """The model in eval mode for the block (no batch-norm statistics updated, no dropout), its mode restored."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def select(strategy: str, *, model: Optional[nn.Module], pool: PoolLike, labeled: Sequence[int] | LabeledSet,
           batch: int, seed: int = 0, mask: Optional[MaskLike] = None, device: Optional[str | torch.device] = None,
           batch_size: int = 256, progress: Optional[ProgressFn] = None, **options: Any) -> Selection:
    """Pick ``batch`` samples of ``pool`` that ``labeled`` leaves, with the registered ``strategy``, in memory.

    ``pool`` is a pool from :func:`fmask.load_pool` (or its directory), whose samples are named by sample id, or a
    float tensor (N, C, H, W) of the inputs the model takes, whose samples are named by position 0..N-1; ``labeled``
    holds such names (or is a labeled set of the pool). ``model`` is :func:`fmask.load_model`'s (any nn.Module
    with ``forward_features`` and a linear ``head``); it runs in eval mode on ``device`` (default: where its
    parameters are; a device given moves it there). ``mask`` (fishermask) is a file from ``fmask fisher`` or
    :func:`fmask.load_mask`'s; its embeddings are computed here, with ``model``. ``options`` are the strategy's,
    named as ``fmask query``'s flags (lamb=0.5, float64=True, mc_samples=20, radius=0.3, ...).

    Returns the :class:`~fmask.query.base.Selection`: ids in selection order, the score each had when picked."""
    chosen = strategy_for_batch(strategy, batch, batch_name="batch")
    opened, labeled_ids = _open_pool(pool, labeled)
    taken = set(labeled_ids)
    candidates = [i for i in opened.ids if i not in taken]
    check_batch_fits(batch, candidates, batch_name="batch")
    _check_model(model, strategy, chosen.needs_model)
    mask_file = _open_mask(mask, opened, strategy, chosen.needs_mask)
    if device is not None:
        torch_device = resolve_device(str(device))
        if model is not None:
            model.to(torch_device)
    else:
        first = next(model.parameters(), None) if model is not None else None
        torch_device = first.device if first is not None else torch.device("cpu")
    context = QueryContext(model=model, pool=opened, labeled_ids=labeled_ids, unlabeled_ids=candidates,
                           device=torch_device, seed=seed, mask=mask_file,
                           options={k: v for k, v in options.items() if v is not None}, batch_size=batch_size,
                           progress=progress)
    with _eval_mode(model):
        selection, _ = run_strategy(chosen, context, batch, model_name="the model")
    return selection
