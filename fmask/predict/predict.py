"""``fmask predict``: the model's class and probability for every image of a pool, or of a folder (or CSV) of
image files decoded the way the model's pool was: the rest of the pool labeled by the model, the deliverable of
most active-learning projects."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fmask.core import paths
from fmask.core.device import resolve_device
from fmask.core.errors import FmaskError
from fmask.core.atomic import atomic_write_bytes
from fmask.core.steps import step_output
from fmask.core.progress import ProgressFn

PREDICT = "fmask predict"


@dataclass
class PredictResult:
    out: Path
    rows: int  # images predicted
    skipped: int  # files that could not be read (--images), listed beside the output
    skipped_csv: Optional[Path]


@torch.no_grad()
def predict_probabilities(model: nn.Module, source: Any, ids: Sequence[int], *, device: torch.device,
                          batch_size: int = 256, progress: Optional[ProgressFn] = None,
                          task: str = "predicting") -> torch.Tensor:
    """Softmax probabilities (n, classes) of ``model`` on ``source.inputs(ids)`` (a Pool, or any object with that
    method), float32 on CPU, a batch at a time."""
    model = model.to(device).eval()
    chunks = [torch.zeros(0, model.head.out_features)] if hasattr(model, "head") else []
    for start in range(0, len(ids), batch_size):
        chunks.append(torch.softmax(model(source.inputs(ids[start:start + batch_size]).to(device)).float(), 1).cpu())
        if progress is not None:
            progress(task, min(start + batch_size, len(ids)), len(ids))
    return torch.cat(chunks)


class CachedImages:
    """Decoded images in a cache file, normalised the way a checkpoint's pool was."""

    def __init__(self, rows: np.ndarray, normalization: dict) -> None:
        self.rows = rows
        self.mean = torch.tensor(normalization["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalization["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def inputs(self, positions: Sequence[int]) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(self.rows[np.asarray(positions, dtype=np.int64)]))
        return (images.float() / 255.0 - self.mean) / self.std


def _prediction_rows(probs: torch.Tensor, classes: Sequence[str]) -> list[tuple[str, str]]:
    best, index = probs.max(dim=1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    return [(classes[int(i)], f"{float(p):.4f}") for p, i in zip(best, index)]


def run_predict(*, ckpt: str | os.PathLike, out: str | os.PathLike, pool_dir: Optional[str | os.PathLike] = None,
                images: Optional[str | os.PathLike] = None, workers: Optional[int] = None, device: str = "auto",
                batch_size: int = 256, progress: Optional[ProgressFn] = None) -> PredictResult:
    """Write ``out``: one row per image with its path, the predicted class and its probability. ``pool_dir``
    (default: the checkpoint's pool) predicts every pool sample (sample_id column too); ``images`` decodes a folder
    or CSV of files decoded the way the checkpoint's pool was (files it cannot read are listed beside ``out``)."""
    from fmask.pool.files import csv_text
    from fmask.train.checkpoint import load_checkpoint

    out = Path(out)
    if pool_dir is not None and images is not None:
        raise FmaskError("give --pool or --images, not both")
    if out.suffix.lower() != ".csv":
        raise FmaskError(f"--out {out} must be a .csv file (the predictions are a CSV)")
    checkpoint = load_checkpoint(ckpt)
    classes = checkpoint.state.get("classes")
    torch_device = resolve_device(device)
    with step_output(out, command="predict", step=None, beside=(paths.skipped_csv_beside(out),)):
        if images is None:
            from fmask.pool.pool import load_pool

            pool = load_pool(pool_dir if pool_dir is not None else checkpoint.pool_dir)
            if pool.hash != checkpoint.pool_hash:
                raise FmaskError(f"checkpoint {ckpt} was trained on another pool; pass the --pool it was trained on, "
                                 "or --images to predict files")
            probs = predict_probabilities(checkpoint.model, pool, pool.ids, device=torch_device,
                                          batch_size=batch_size, progress=progress)
            predicted = _prediction_rows(probs, pool.classes)
            rows = ((i, path or "", *guess) for i, path, guess in zip(pool.ids, pool.paths(pool.ids), predicted))
            atomic_write_bytes(out, csv_text(("sample_id", "path", "predicted", "probability"), rows).encode())
            paths.skipped_csv_beside(out).unlink(missing_ok=True)
            return PredictResult(out, len(pool.ids), 0, None)
        return _predict_files(checkpoint, Path(images), out, classes, workers, torch_device, batch_size, progress)


def _predict_files(checkpoint, images: Path, out: Path, classes: Optional[list[str]], workers: Optional[int],
                   device: torch.device, batch_size: int, progress: Optional[ProgressFn]) -> PredictResult:
    from fmask.pool.decode import OK, DecodeOptions, decode_into_cache, default_workers
    from fmask.pool.files import csv_text, list_image_folder, read_images_csv
    from fmask.pool.cache import open_rows

    if classes is None:
        raise FmaskError(f"checkpoint {checkpoint.path} records no class names (written by an older fmask); retrain "
                         "it with `fmask train`")
    if not images.exists():
        raise FmaskError(f"--images {images} does not exist; give a folder of images or a CSV with a path column")
    files, skipped = list_image_folder(images) if images.is_dir() else (read_images_csv(images), [])
    if not files:
        raise FmaskError(f"no image files in {images}; point --images at the folder that holds your images")
    decoding = checkpoint.state.get("pool_decoding") or {}
    channels, height, width = checkpoint.state["image_shape"]
    # The model takes images of its pool's size: files of another size are brought to it like --resize does
    # (crop when the pool was built without resizing).
    options = DecodeOptions((height, width), decoding.get("resize") or "crop", channels)
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as scratch:
        cache = Path(scratch) / paths.POOL_IMAGES  # decoded like a pool's image cache
        results = decode_into_cache([f.file for f in files], cache, options, workers=workers, progress=progress,
                                    what="decoding images")
        good = [i for i, result in enumerate(results) if result.status == OK]
        probs = predict_probabilities(checkpoint.model, CachedImages(open_rows(cache), checkpoint.state["normalization"]),
                                      good, device=device, batch_size=batch_size, progress=progress)
    predicted = dict(zip(good, _prediction_rows(probs, classes)))
    rows = ((f.path, *predicted[i]) for i, f in enumerate(files) if i in predicted)
    bad = [(s.path, s.reason) for s in skipped] + [(files[i].path, r.reason) for i, r in enumerate(results)
                                                    if r.status != OK]
    skipped_csv = paths.skipped_csv_beside(out)
    if bad:
        atomic_write_bytes(skipped_csv, csv_text(("path", "reason"), sorted(bad)).encode())
    else:
        skipped_csv.unlink(missing_ok=True)
    atomic_write_bytes(out, csv_text(("path", "predicted", "probability"), rows).encode())
    return PredictResult(out, len(good), len(bad), skipped_csv if bad else None)
