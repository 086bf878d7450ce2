"""Checkpoints: a plain dict of tensors and primitives (loads with ``torch.load(weights_only=True)``) carrying
the format version, the architecture, the config, the metrics and the provenance (pool and labeled set)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fmask.core.errors import FmaskError
from fmask.core.labeled import LabeledPool, open_labeled_pool
from fmask.core.atomic import atomic_torch_save
from fmask.core.hashing import FORMAT_VERSION, sha256_file
from fmask.core.readers import read_torch
from fmask.core.records import Recorded, check_record
from fmask.core.steps import STEP_KEY
from fmask.train.models import build_model, set_head_dropout

TRAIN = "fmask train"


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of the weights: a flipped bit inside the zip (which torch does not check) is caught on load."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: Path, *, model: Optional[nn.Module], config: Any, pool: Any, labeled_set: Any, metrics: dict,
                    step: dict, fmask_version: str, state_dict: Optional[dict[str, torch.Tensor]] = None,
                    extra: Optional[dict] = None) -> None:
    """Write the checkpoint of ``model`` (or of ``state_dict``: a head checkpoint's head alone); ``extra`` keys
    (the pretrained weights' record and preprocessing, ``finetune``) are added to it."""
    if state_dict is None:
        state_dict = model.state_dict()
    state = {
        "format": FORMAT_VERSION, "kind": "checkpoint", "fmask_version": fmask_version,
        "arch": config.model, "in_channels": pool.image_shape[0], "num_classes": pool.num_classes,
        "image_shape": list(pool.image_shape), "normalization": pool.manifest["normalization"],
        "classes": list(pool.classes), "pool_decoding": pool.manifest.get("decoding"),
        "state_dict": (weights := {k: v.detach().cpu().clone() for k, v in state_dict.items()}),
        "weights_sha256": weights_sha256(weights),
        "config": asdict(config),
        "pool_dir": str(Path(pool.dir).resolve()), "pool_hash": pool.hash,
        "labeled_path": str(Path(labeled_set.path).resolve()), "labeled_hash": labeled_set.hash,
        "labeled_ids": list(labeled_set.ids), "round": labeled_set.round, "strategy": labeled_set.strategy,
        "seed": labeled_set.seed, "metrics": metrics, STEP_KEY: step, **(extra or {}),
    }
    atomic_torch_save(path, state)


@dataclass
class Checkpoint:
    path: Path
    hash: str  # sha256 of the file: masks and queries record it
    state: dict
    model: nn.Module  # eval mode, on CPU
    backbone: Any = None  # fmask.train.pretrained.Backbone of a --finetune head checkpoint (its weights verified)

    # What the checkpoint records (its state dict's keys):
    arch = Recorded[str]("state")
    metrics = Recorded[dict]("state")
    pool_dir = Recorded[str]("state")
    pool_hash = Recorded[str]("state")
    labeled_path = Recorded[str]("state")
    labeled_hash = Recorded[str]("state")
    labeled_ids = Recorded[list[int]]("state")
    # ``full`` (the checkpoint holds every weight) or ``head`` (a head on a frozen backbone file).
    finetune = Recorded[str]("state", default="full")


REQUIRED = ("kind", "arch", "in_channels", "num_classes", "state_dict", "pool_hash", "pool_dir", "labeled_hash",
            "labeled_path", "labeled_ids", "metrics")


def load_checkpoint(path: str | os.PathLike, *, weights: Optional[str | os.PathLike] = None) -> Checkpoint:
    """Read and check a checkpoint and build its model. A ``--finetune head`` checkpoint holds only its head: the
    backbone comes from the weights file it records (or ``weights``), refused when its sha256 differs."""
    path = Path(path)
    state = read_torch(path, what="checkpoint", made_by=TRAIN)
    check_record(state, kind="checkpoint", keys=REQUIRED, newer=f"checkpoint {path}",
                 not_ours=f"{path} is not an fmask checkpoint; pass a .pt written by `{TRAIN}`")
    state_dict = state["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise FmaskError(f"checkpoint {path} has a malformed state_dict; retrain with `{TRAIN}`")
    if state.get("weights_sha256") != weights_sha256(state_dict):
        raise FmaskError(f"checkpoint {path} is corrupt (its weights do not match their recorded hash); retrain with `{TRAIN}`")
    bad = next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise FmaskError(f"checkpoint {path} has NaN or infinite weights in {bad}; retrain with `{TRAIN}`")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    dropout = config.get("mc_dropout") or 0.0
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise FmaskError(f"checkpoint {path} records an invalid mc_dropout {dropout!r}; retrain with `{TRAIN}`")
    backbone = None
    if state.get("finetune", "full") == "head":
        from fmask.train.pretrained import checkpoint_backbone, head_checkpoint_model

        backbone = checkpoint_backbone(state, path, weights=weights)
        model = head_checkpoint_model(state, backbone, path)
    else:
        if weights is not None:
            raise FmaskError(f"checkpoint {path} holds its whole network; --weights replaces only the backbone file "
                             "of a `--finetune head` checkpoint, drop it")
        model = build_model(state["arch"], in_channels=int(state["in_channels"]), num_classes=int(state["num_classes"]),
                            preprocessing=state.get("preprocessing"), normalization=state.get("normalization"))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise FmaskError(f"checkpoint {path} does not match architecture {state['arch']!r}; retrain with `{TRAIN}`") from exc
    set_head_dropout(model, float(dropout))
    model.eval()
    return Checkpoint(path, sha256_file(path), state, model, backbone)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The checkpoint's model in eval mode, on CPU (the notebook entry point)."""
    return load_checkpoint(path).model


@dataclass
class Round(LabeledPool):
    """A checkpoint with the pool and labeled set it belongs to, and the candidates left to label."""

    checkpoint: Checkpoint

    def strategy_view(self, device: torch.device, progress=None) -> tuple[nn.Module, Any]:
        """The model and the pool that strategies and the Fisher pass see: the checkpoint's model on the pool's
        images, or for a ``--finetune head`` checkpoint its head alone on the cached backbone features."""
        if self.checkpoint.finetune != "head":
            return self.checkpoint.model, self.pool
        from fmask.train.features import head_view

        return head_view(self.checkpoint, self.pool, device=device, progress=progress)


def open_round(ckpt: str | os.PathLike, *, pool_dir: Optional[str | os.PathLike] = None,
               labeled: Optional[str | os.PathLike] = None, weights: Optional[str | os.PathLike] = None) -> Round:
    """Load a checkpoint, its pool (refused when its hash differs from the checkpoint's) and a labeled set
    (default: the one the checkpoint was trained on); ``weights`` replaces a head checkpoint's backbone file."""
    from fmask.pool.pool import load_pool
    from fmask.core.threads import fit_threads_to_work

    checkpoint = load_checkpoint(ckpt, weights=weights)
    pool_dir = Path(pool_dir) if pool_dir is not None else Path(checkpoint.pool_dir)
    pool = load_pool(pool_dir)
    if pool.hash != checkpoint.pool_hash:
        raise FmaskError(f"checkpoint {ckpt} was trained on another pool (hash {checkpoint.pool_hash[:12]}, "
                         f"{pool_dir} has {pool.hash[:12]}); pass the --pool it was trained on")
    labeled_path = labeled if labeled is not None else checkpoint.labeled_path
    opened = open_labeled_pool(pool, pool_dir, labeled_path, kind=Round, checkpoint=checkpoint)
    fit_threads_to_work(checkpoint.model, pool.image_shape, what=checkpoint.arch)  # the CLI's thread policy
    return opened
