"""``fmask train``: train a model from scratch on the labeled set (the paper's protocol by default: Adam 1e-3,
crop + flip, until 99% training accuracy or an epoch cap, gradients clamped to ±0.1), evaluate it on the test
split and write a checkpoint that loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from fmask import __version__, paths
from fmask.device import resolve_device
from fmask.errors import FmaskError
from fmask.io import STEP_KEY, check_writable, step_is_current
from fmask.label.labeled import load_labeled
from fmask.pool.pool import Pool, load_pool
from fmask.query.base import ProgressFn
from fmask.train.augment import random_crop_flip
from fmask.train.checkpoint import load_checkpoint, save_checkpoint
from fmask.train.metrics import record_metrics
from fmask.train.models import build_model


@dataclass
class TrainConfig:
    model: str = "resnet18"
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 100
    target_train_accuracy: float = 0.99  # stop once an epoch reaches it (the paper's protocol)
    grad_clamp: Optional[float] = 0.1  # clamp each gradient entry to ±value (the authors' code); None: off
    weight_decay: float = 0.0
    augment: bool = True
    seed: int = 0


@dataclass
class TrainResult:
    checkpoint: Path
    skipped: bool
    metrics: dict


@torch.no_grad()
def evaluate(model: torch.nn.Module, pool: Pool, device: torch.device, batch_size: int = 512) -> dict:
    """Accuracy, balanced accuracy and per-class accuracy on the pool's test split."""
    model.eval()
    predictions = []
    for start in range(0, len(pool.test_images), batch_size):
        x = pool.normalize(pool.test_images[start:start + batch_size].to(device))
        predictions.append(model(x).argmax(1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    truth = pool.test_labels
    per_class = []
    for cls in range(pool.num_classes):
        members = truth == cls
        per_class.append(float((predicted[members] == cls).float().mean()) if members.any() else float("nan"))
    present = [a for a in per_class if a == a]
    return {"accuracy": float((predicted == truth).float().mean()), "balanced_accuracy": sum(present) / len(present),
            "per_class_accuracy": per_class, "test_samples": int(len(truth))}


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, pool: Pool, config: TrainConfig,
        device: torch.device, progress: Optional[ProgressFn] = None) -> dict:
    """Train ``model`` on uint8 ``images`` (already on ``device``) until the target train accuracy."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pad, flip = pool.manifest["augment"]["crop_pad"], pool.manifest["augment"]["flip"]
    n = len(images)
    epoch, train_accuracy = 0, 0.0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        correct = 0
        for start in range(0, n, config.batch_size):
            index = order[start:start + config.batch_size]
            if len(index) < 2 and n >= 2:  # BatchNorm needs two samples; the lone one is seen next epoch
                continue
            batch = images[index]
            if config.augment:
                batch = random_crop_flip(batch, pad=pad, flip=flip, generator=generator)
            logits = model(pool.normalize(batch))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clamp is not None:
                torch.nn.utils.clip_grad_value_(model.parameters(), config.grad_clamp)
            optimizer.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
        train_accuracy = correct / max(n, 1)
        if progress:
            progress(f"training (train acc {train_accuracy:.3f})", epoch, config.max_epochs)
        if train_accuracy >= config.target_train_accuracy:
            break
    model.eval()
    return {"epochs": epoch, "train_accuracy": train_accuracy}


def train(*, pool_dir: str | os.PathLike, labeled: Optional[str | os.PathLike], out: str | os.PathLike,
          config: TrainConfig, device: str = "auto", force: bool = False,
          progress: Optional[ProgressFn] = None) -> TrainResult:
    """Train from scratch on the labeled set and write the checkpoint ``out`` (skipped when unchanged)."""
    out = Path(out)
    if config.max_epochs <= 0 or config.batch_size <= 0 or config.lr <= 0:
        raise FmaskError("--epochs, --batch-size and --lr must be positive")
    pool = load_pool(pool_dir)
    labeled_path = Path(labeled) if labeled is not None else paths.pool_labeled(pool_dir)
    labeled_set = load_labeled(labeled_path, pool)
    if len(labeled_set.ids) == 0:
        raise FmaskError(f"labeled set {labeled_path} is empty; build the pool with --initial > 0")
    torch_device = resolve_device(device)
    build_model(config.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes)  # validate the name
    step = {"pool": pool.hash, "labeled": labeled_set.hash, "config": asdict(config)}
    if not force and step_is_current(out, step):
        return TrainResult(out, True, load_checkpoint(out).metrics)
    check_writable(out)

    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes).to(torch_device)
    images = pool.images(labeled_set.ids).to(torch_device)
    labels = torch.tensor(labeled_set.labels, dtype=torch.long, device=torch_device)
    started = time.perf_counter()
    fit_stats = fit(model, images, labels, pool, config, torch_device, progress)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(model, pool, torch_device)
    metrics.update(fit_stats, train_seconds=train_seconds, labeled=len(labeled_set.ids))
    save_checkpoint(out, model=model, config=config, pool=pool, labeled_set=labeled_set, metrics=metrics,
                    step=step, fmask_version=__version__)
    record_metrics(out, labeled_set=labeled_set, metrics=metrics, train_seed=config.seed)
    return TrainResult(out, False, metrics)
