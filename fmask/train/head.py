"""``fmask train --finetune head``: a linear head trained on a frozen backbone's cached features. The features
are computed once per (pool, weights, preprocessing) (fmask.train.features); a round then costs a few epochs of
one matrix product. The checkpoint holds the head and the backbone's hash, not the backbone."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fmask import __version__
from fmask.core.progress import ProgressFn
from fmask.train.checkpoint import save_checkpoint
from fmask.train.features import pool_features
from fmask.train.metrics import record_metrics, test_metrics
from fmask.train.models import HeadOnly
from fmask.train.recipe import make_optimizer, make_schedule
from fmask.train.validation import TEST, VALIDATION, not_measured, validation_split


def fit_head(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, config: Any,
             device: torch.device, progress: Optional[ProgressFn] = None) -> tuple[nn.Linear, dict]:
    """Train ``nn.Linear(E, num_classes)`` on ``features`` (n, E) with cross-entropy: initialised after
    ``torch.manual_seed(config.seed)``, each epoch a fresh order from a CPU generator seeded with ``config.seed``
    in batches of ``config.batch_size``, the config's optimiser and schedule (stepped per epoch), gradients
    clamped when ``config.grad_clamp`` is set; stops early at ``config.target_train_accuracy`` when set."""
    torch.manual_seed(config.seed)
    head = nn.Linear(features.shape[1], num_classes).to(device)
    optimizer = make_optimizer(HeadOnly(head), config)
    schedule = make_schedule(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    x, y = features.to(device=device, dtype=torch.float32), labels.to(device)
    n, epochs, train_accuracy = len(x), 0, 0.0
    for epoch in range(1, config.max_epochs + 1):
        order = torch.randperm(n, generator=generator).to(device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # the epoch's summed losses (for progress)
        for start in range(0, n, config.batch_size):
            batch = order[start:start + config.batch_size]
            inputs = x[batch]
            if config.mc_dropout:  # --mc-dropout: the dropout layer before the head, on the cached features
                inputs = F.dropout(inputs, p=config.mc_dropout, training=True)
            logits = head(inputs)
            loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clamp is not None:
                nn.utils.clip_grad_value_(head.parameters(), config.grad_clamp)
            optimizer.step()
            correct += (logits.argmax(1) == y[batch]).sum()
            loss_sum += loss.detach().double() * len(batch)
        if schedule is not None:
            schedule.step()
        epochs, train_accuracy = epoch, int(correct) / max(n, 1)
        if progress is not None:
            progress(f"training the head (epoch {epoch}, loss {float(loss_sum) / max(n, 1):.4f}, train acc "
                     f"{train_accuracy:.3f})", epoch, config.max_epochs)
        if config.target_train_accuracy is not None and train_accuracy >= config.target_train_accuracy:
            break
    return head.eval(), {"epochs": epochs, "train_accuracy": train_accuracy}


def train_head_locked(out: Path, *, step: dict, pool: Any, labeled_set: Any, config: Any, backbone: Any,
                      device: torch.device, progress: Optional[ProgressFn]) -> dict:
    """train's work for ``--finetune head`` (the lock of the checkpoint's directory held): features (cached),
    the head, its test metrics, the head checkpoint and its metrics row. Returns the metrics."""
    started = time.perf_counter()
    features = pool_features(pool, backbone, device=device, progress=progress)
    feature_seconds = time.perf_counter() - started
    started = time.perf_counter()
    train_ids, validation_ids = validation_split(labeled_set.ids, labeled_set.labels, config.val_fraction, config.seed)
    label_of = dict(zip(labeled_set.ids, labeled_set.labels))
    labels = torch.tensor([label_of[i] for i in train_ids], dtype=torch.long)
    head, stats = fit_head(features.train[pool.rows(train_ids)], labels, num_classes=pool.num_classes,
                           config=config, device=device, progress=progress)
    train_seconds = time.perf_counter() - started
    with torch.no_grad():
        if validation_ids:  # --val-fraction: measured on the held-out part of the labeled set
            predicted = head(features.train[pool.rows(validation_ids)].to(device)).argmax(1).cpu()
            metrics = test_metrics(predicted, torch.tensor([label_of[i] for i in validation_ids]), pool.num_classes)
            metrics.update(evaluated_on=VALIDATION, validation_samples=len(validation_ids), test_samples=0)
        elif len(pool.test_labels):
            metrics = test_metrics(head(features.test.to(device)).argmax(1).cpu(), pool.test_labels,
                                   pool.num_classes)
            metrics["evaluated_on"] = TEST
        else:
            metrics = not_measured(pool.num_classes)
    metrics.update(stats, train_seconds=train_seconds, feature_seconds=feature_seconds,
                   features_computed=features.computed, labeled=len(labeled_set.ids), trained_on=len(train_ids),
                   loader="features", precision="fp32")
    state_dict = {f"head.{name}": value for name, value in head.state_dict().items()}
    save_checkpoint(out, model=None, state_dict=state_dict, config=replace(config, precision="fp32"), pool=pool,
                    labeled_set=labeled_set, metrics=metrics, step=step, fmask_version=__version__,
                    extra={**backbone.record(), "finetune": "head", "features": features.path.name})
    record_metrics(out, labeled_set=labeled_set, metrics=metrics, train_seed=config.seed)
    return metrics
