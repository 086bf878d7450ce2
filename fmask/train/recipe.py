"""Training recipes: the paper's from-scratch protocol (TrainConfig's defaults) or, for pretrained weights, the
usual fine-tuning practice (AdamW, a cosine schedule, a smaller learning rate for the backbone, a fixed number of
epochs); and the optimiser and schedule a config names."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Optional

import torch
from torch import nn

from fmask.core.errors import FmaskError

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
FINETUNE_MODES = ("full", "head")

# Fine-tuning a pretrained backbone: the head at lr, the backbone at lr x backbone_lr_scale; no early stop at a
# training accuracy (a pretrained network reaches 99% quickly and then overfits), no gradient clamping.
FULL_FINETUNE = {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3, "backbone_lr_scale": 0.1,
                 "weight_decay": 0.01, "max_epochs": 10, "target_train_accuracy": None, "grad_clamp": None}
# A linear head on cached features: cheap epochs, so more of them; no augmentation (the features are fixed).
HEAD_FINETUNE = {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3, "backbone_lr_scale": 0.0,
                 "weight_decay": 0.01, "max_epochs": 30, "target_train_accuracy": None, "grad_clamp": None,
                 "augment": False}


def make_train_config(config_class: type, *, model: str, weights: Optional[str] = None, finetune: str = "full",
                      **given: Any) -> Any:
    """``config_class`` (TrainConfig) for these options: its defaults (the paper's) without ``weights``, the
    fine-tuning recipe of ``finetune`` with them; every ``given`` value that is not None overrides either."""
    if finetune not in FINETUNE_MODES:
        raise FmaskError(f"unknown --finetune {finetune!r}; use one of: {', '.join(FINETUNE_MODES)}")
    if finetune == "head" and weights is None:
        raise FmaskError("--finetune head trains a head on a frozen backbone and needs --weights (a file or default)")
    names = {f.name for f in fields(config_class)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    base = config_class(model=model, weights=weights, finetune=finetune)
    if weights is not None:
        base = replace(base, **(HEAD_FINETUNE if finetune == "head" else FULL_FINETUNE))
    if finetune == "head" and given.get("augment"):
        raise FmaskError("--finetune head trains on cached features and cannot augment; drop --augment")
    config = replace(base, **{k: v for k, v in given.items() if v is not None})
    return replace(config, grad_clamp=None) if config.grad_clamp == 0 else config  # --grad-clamp 0: off


def check_recipe(config: Any) -> None:
    """One line for an optimiser, schedule or learning-rate scale fmask does not know."""
    if config.optimizer not in OPTIMIZERS:
        raise FmaskError(f"unknown --optimizer {config.optimizer!r}; use one of: {', '.join(OPTIMIZERS)}")
    if config.schedule not in SCHEDULES:
        raise FmaskError(f"unknown --schedule {config.schedule!r}; use one of: {', '.join(SCHEDULES)}")
    if config.backbone_lr_scale < 0:
        raise FmaskError(f"--backbone-lr-scale {config.backbone_lr_scale} must be 0 or more")
    if config.finetune not in FINETUNE_MODES:
        raise FmaskError(f"unknown --finetune {config.finetune!r}; use one of: {', '.join(FINETUNE_MODES)}")


def make_optimizer(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    """The config's optimiser; with ``backbone_lr_scale`` other than 1 the ``head.*`` parameters get ``lr`` and
    the others ``lr x backbone_lr_scale`` (a scale of 0 leaves the backbone where it is)."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    if config.backbone_lr_scale == 1.0:
        return optimizer_class(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    head = [p for name, p in model.named_parameters() if name.startswith("head.")]
    backbone = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    groups = [{"params": head, "lr": config.lr}]
    if backbone and config.backbone_lr_scale > 0:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    return optimizer_class(groups, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: Any) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Cosine: every group's rate follows (1 + cos(π·epoch/epochs))/2 of its start, stepped once per epoch."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs)
    return None
