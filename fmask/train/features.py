"""Frozen-backbone features: the penultimate features of every pool and test image under one pretrained backbone,
computed once per (pool, weights, preprocessing) and cached beside the pool as a safetensors file that later
steps memory-map. ``--finetune head`` trains on them, and ``fmask query`` and ``fmask fisher`` serve a head
checkpoint (or a cold start without any checkpoint) from them instead of running the backbone again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import fmask
from fmask.core import distributed, paths
from fmask.core.errors import FmaskError
from fmask.core.labeled import LabeledPool, open_labeled_pool
from fmask.core.atomic import atomic_save_safetensors
from fmask.core.hashing import FORMAT_VERSION, sha256_json
from fmask.core.readers import mmap_safetensors
from fmask.core.steps import STEP_KEY, step_is_current, step_output
from fmask.core.progress import ProgressFn
from fmask.train.models import HeadOnly, head_dropout_rate, set_head_dropout
from fmask.train.pretrained import Backbone

FEATURES_KIND = "backbone-features"
MADE_BY = "fmask train --finetune head"
DEFAULT_BATCH_SIZE = 256


@dataclass
class PoolFeatures:
    """A pool's cached backbone features (memory-mapped): rows follow ``pool.ids`` and the test split's order."""

    path: Path
    train: torch.Tensor  # (len(pool.ids), E) float32
    test: torch.Tensor  # (len(test ids), E) float32
    computed: bool  # this call ran the backbone (False: read from the cache)


def pool_features(pool: Any, backbone: Backbone, *, device: torch.device, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: Optional[ProgressFn] = None,
                  build: Optional[Callable[[], nn.Module]] = None) -> PoolFeatures:
    """The features of every image of ``pool`` under ``backbone``: read from the cache beside the pool when it is
    current, otherwise computed (with ``build()``, default ``backbone.build(pool)``) and cached atomically."""
    step = {"pool": pool.hash, **backbone.features_step}
    path = paths.feature_cache(pool.dir, sha256_json(step))
    cached = _read_cache(path, step, pool)
    # Reading needs no lock (nor a writable pool directory). Under torchrun every rank asks (a cold-start query):
    # the ranks decide together below, where the main rank computes and the others read after it.
    if cached is not None and not distributed.is_distributed():
        return cached
    with step_output(path, command="features", step=step,
                     is_current=lambda: _read_cache(path, step, pool) is not None) as output:  # written meanwhile?
        if not output.current and output.writes:
            model = (build() if build is not None else backbone.build(pool)).to(device).eval()
            # The memory-mapped caches themselves (rows in id order), read a batch at a time: no copy of the pool.
            train = backbone_features(model, pool, pool.all_images, device=device, batch_size=batch_size,
                                      progress=progress, task="backbone features (pool)")
            test = backbone_features(model, pool, pool.test_images, device=device, batch_size=batch_size,
                                     progress=progress, task="backbone features (test)")
            tensors = {"train": train, "test": test, "train_ids": torch.tensor(pool.ids, dtype=torch.int64)}
            metadata = {"format": str(FORMAT_VERSION), "kind": FEATURES_KIND, "fmask_version": fmask.__version__,
                        "pool": pool.hash, "model": backbone.model, "weights": backbone.weights.sha256,
                        "preprocessing": json.dumps(backbone.preprocessing), STEP_KEY: json.dumps(step)}
            atomic_save_safetensors(path, tensors, metadata)
    cached = _read_cache(path, step, pool)
    if cached is None:
        raise FmaskError(f"the feature cache {path} could not be read back after writing it; check the disk")
    return PoolFeatures(path, cached.train, cached.test, computed=not output.current)


def _read_cache(path: Path, step: dict, pool: Any) -> Optional[PoolFeatures]:
    if not step_is_current(path, step):
        return None
    try:
        tensors, _ = mmap_safetensors(path, what="feature cache", made_by=MADE_BY)
        train, test, ids = tensors["train"], tensors["test"], tensors["train_ids"]
    except (FmaskError, KeyError):
        return None  # a damaged cache is recomputed
    if train.dim() != 2 or train.dtype != torch.float32 or len(train) != len(pool.ids) \
            or len(test) != len(pool.test_labels) or ids.tolist() != list(pool.ids):
        return None
    return PoolFeatures(path, train, test, computed=False)


@torch.no_grad()
def backbone_features(model: nn.Module, pool: Any, images: torch.Tensor, *, device: torch.device,
                      batch_size: int = DEFAULT_BATCH_SIZE, progress: Optional[ProgressFn] = None,
                      task: str = "backbone features") -> torch.Tensor:
    """``model.forward_features`` (float32, eval mode) of uint8 ``images`` normalised as ``pool`` does; (n, E) on
    the CPU."""
    rows = None  # allocated once the width is known: per-batch pieces kept to the end would fragment the heap
    for start in range(0, len(images), batch_size):
        x = pool.normalize(images[start:start + batch_size].to(device))
        features = model.forward_features(x).float().cpu()
        if rows is None:
            rows = torch.empty(len(images), features.shape[1])
        rows[start:start + len(features)] = features
        if progress is not None:
            progress(task, min(start + batch_size, len(images)), len(images))
    return rows if rows is not None else torch.empty(0, model.head.in_features)


class FeaturePool:
    """A pool seen through a frozen backbone: ``inputs(ids)`` gives the cached features of ``ids`` (what a
    :class:`~fmask.train.models.HeadOnly` model takes) instead of images; ids, classes and labels are the pool's.
    It deliberately has no ``images``: whatever runs on it runs on the features."""

    def __init__(self, pool: Any, features: PoolFeatures) -> None:
        self.pool = pool
        self.features = features

    dir = property(lambda self: self.pool.dir)
    manifest = property(lambda self: self.pool.manifest)
    ids = property(lambda self: self.pool.ids)
    hash = property(lambda self: self.pool.hash)
    classes = property(lambda self: self.pool.classes)
    num_classes = property(lambda self: self.pool.num_classes)
    test_labels = property(lambda self: self.pool.test_labels)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        return self.pool.rows(ids)

    def labels(self, ids: Sequence[int]) -> torch.Tensor:
        return self.pool.labels(ids)

    def inputs(self, ids: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """The cached features (n, E) of sample ``ids`` (only these rows are read from the file), on ``device``."""
        rows = self.features.train[self.pool.rows(ids)]
        return rows if device is None else rows.to(device)

    @property
    def test_inputs(self) -> torch.Tensor:
        return self.features.test


def head_view(checkpoint: Any, pool: Any, *, device: torch.device,
              progress: Optional[ProgressFn] = None) -> tuple[nn.Module, FeaturePool]:
    """A head checkpoint's head alone and the pool's cached features under its (verified) backbone."""
    features = pool_features(pool, checkpoint.backbone, device=device, progress=progress,
                             build=lambda: checkpoint.model)
    head = set_head_dropout(HeadOnly(checkpoint.model.head), head_dropout_rate(checkpoint.model))
    return head, FeaturePool(pool, features)


# ---- cold start: a pretrained backbone and no checkpoint ------------------------------------------------------


@dataclass
class ColdStart(LabeledPool):
    """What ``fmask query`` needs without a checkpoint: the pool, its labeled set (possibly empty), the
    candidates and the pretrained backbone whose features the feature-only strategies use."""

    backbone: Backbone
    checkpoint: None = None

    def strategy_view(self, device: torch.device, progress: Optional[ProgressFn] = None
                      ) -> tuple[nn.Module, FeaturePool]:
        """The pool's features and a zero head (uniform predictions: no strategy here may read them)."""
        features = pool_features(self.pool, self.backbone, device=device, progress=progress)
        head = nn.Linear(features.train.shape[1], self.pool.num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return HeadOnly(head), FeaturePool(self.pool, features)


def open_cold_start(*, pool_dir: Optional[str | os.PathLike], labeled: Optional[str | os.PathLike],
                    model: Optional[str], weights: Optional[str | os.PathLike],
                    input_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> ColdStart:
    """The pool (``--pool``), its labeled set (default: the pool's round-0 set, which may be empty) and the
    backbone of ``--model`` with ``--weights``."""
    from fmask.pool.pool import load_pool
    from fmask.train.models import build_model

    if pool_dir is None or model is None or weights is None:
        raise FmaskError("fmask query needs --ckpt, or for a cold start without one --pool, --model and --weights "
                         "(a pretrained backbone whose features the strategy uses)")
    pool = load_pool(pool_dir)
    build_model(model, in_channels=pool.image_shape[0], num_classes=pool.num_classes)  # validate the name first
    labeled_path = labeled if labeled is not None else paths.pool_labeled(pool_dir)
    opened = open_labeled_pool(pool, pool_dir, labeled_path)  # the labeled set is checked before the backbone
    backbone = Backbone.resolve(model, weights, channels=pool.image_shape[0], input_size=input_size, mean=mean,
                                std=std)
    return ColdStart(**vars(opened), backbone=backbone)
