"""``fmask build-pool``: pick a (possibly class-imbalanced) pool from a dataset's train split, decode its
images once into a uint8 cache, and draw the round-0 labeled set. :class:`Pool` reads it back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from fmask import paths
from fmask.errors import FmaskError
from fmask.io import (FORMAT_VERSION, STEP_KEY, atomic_save_safetensors, atomic_write_json, check_writable,
                      output_lock, read_json, read_safetensors, seal_json, sha256_file, sha256_json, step_is_current)
from fmask.pool.datasets import open_dataset

SETTINGS = {
    "balanced": None,  # every train sample of every class
    "setting1": [250, 5000, 250, 250],  # the paper's Setting 1: classes 0-3 only
    "setting2": [250] * 9 + [5000],  # the paper's Setting 2: nine small classes, the tenth large
}
BUILD_POOL = "fmask build-pool"


def parse_class_counts(text: str) -> list[int]:
    """``"250,5000,250,250"``: samples of classes 0, 1, 2, 3 (the pool keeps only these classes)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise FmaskError(f"--class-counts {text!r} is not a comma-separated list of integers, e.g. 250,5000,250") from exc
    if not counts or any(c <= 0 for c in counts):
        raise FmaskError(f"--class-counts {text!r} needs at least one count and every count positive")
    return counts


@dataclass
class BuildPoolResult:
    pool_dir: Path
    skipped: bool
    class_counts: list[int]
    n_pool: int
    n_test: int
    n_initial: int


def build_pool(*, dataset: str, out: str | os.PathLike, root: str | os.PathLike = "data", setting: str = "balanced",
               class_counts: Optional[Sequence[int]] = None, initial: int = 100, seed: int = 0,
               test_per_class: Optional[int] = None, download: bool = False, force: bool = False) -> BuildPoolResult:
    """Build a pool directory (manifest, image cache, round-0 labeled set) under ``out``."""
    out = Path(out)
    if class_counts is None:
        if setting not in SETTINGS:
            raise FmaskError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}, or give --class-counts")
        class_counts = SETTINGS[setting]
    else:
        setting = "custom"
    if initial < 0:
        raise FmaskError(f"--initial {initial} is negative; give the number of random labeled samples to start with")
    if test_per_class is not None and test_per_class <= 0:
        raise FmaskError("--test-per-class must be positive; omit it to keep the whole test split")
    step = {"dataset": dataset, "setting": setting, "class_counts": list(class_counts) if class_counts else None,
            "initial": initial, "seed": seed, "test_per_class": test_per_class}
    if out.exists() and not out.is_dir():
        raise FmaskError(f"--out {out} is a file; give a directory for the pool")
    with output_lock(out, "build-pool", outputs=(paths.POOL_IMAGES, paths.POOL_LABELED, paths.POOL_MANIFEST)):
        return _build_pool_locked(out=out, step=step, dataset=dataset, root=Path(root), download=download,
                                  class_counts=class_counts, initial=initial, seed=seed,
                                  test_per_class=test_per_class, setting=setting, force=force)


def _build_pool_locked(*, out: Path, step: dict, dataset: str, root: Path, download: bool,
                       class_counts: Optional[Sequence[int]], initial: int, seed: int,
                       test_per_class: Optional[int], setting: str, force: bool) -> BuildPoolResult:
    """build_pool's work, done while holding the lock of ``out``."""
    if not force and step_is_current(paths.pool_manifest(out), step) and paths.pool_images(out).is_file() \
            and paths.pool_labeled(out).is_file():
        manifest = read_json(paths.pool_manifest(out), what="pool manifest", made_by=BUILD_POOL)
        return BuildPoolResult(out, True, manifest["class_counts"], len(manifest["ids"]), len(manifest["test_ids"]),
                               initial)
    for target in (paths.pool_manifest(out), paths.pool_images(out), paths.pool_labeled(out)):
        check_writable(target)

    source = open_dataset(dataset, root=root, download=download)
    n_classes_available = len(source.classes)
    counts = list(class_counts) if class_counts else [int((source.train_labels == c).sum()) for c in range(n_classes_available)]
    if len(counts) > n_classes_available:
        raise FmaskError(f"the setting names {len(counts)} classes but {dataset} has {n_classes_available}; "
                         "give fewer --class-counts")
    empty = next((cls for cls, count in enumerate(counts) if count <= 0), None)
    if empty is not None:  # a class the model must output but can never be shown or tested on
        raise FmaskError(f"class {empty} ({source.classes[empty]}) would have no samples in the pool; add train "
                         "images for it (or remove its empty folder), or give it a positive --class-counts entry")
    rng = np.random.default_rng(seed)
    pool_ids = []
    for cls, count in enumerate(counts):
        available = np.flatnonzero(source.train_labels == cls)
        if count > len(available):
            raise FmaskError(f"class {cls} ({source.classes[cls]}) has {len(available)} train samples but the setting "
                             f"asks for {count}; lower --class-counts or pick another --setting")
        pool_ids.append(rng.choice(available, size=count, replace=False) if count < len(available) else available)
    ids = np.sort(np.concatenate(pool_ids)).astype(np.int64)
    if initial > len(ids):
        raise FmaskError(f"--initial {initial} is larger than the pool ({len(ids)} samples); lower --initial")
    n_classes = len(counts)
    test_ids = []
    for cls in range(n_classes):
        available = np.flatnonzero(source.test_labels == cls)
        if test_per_class is not None and test_per_class < len(available):
            available = np.sort(rng.choice(available, size=test_per_class, replace=False))
        test_ids.append(available)
    test_ids = np.sort(np.concatenate(test_ids)).astype(np.int64)
    if len(test_ids) == 0:
        raise FmaskError(f"{dataset} has no test images of the pool's classes; add a test/ split with these classes")
    initial_ids = np.sort(rng.choice(ids, size=initial, replace=False)) if initial else np.zeros(0, np.int64)

    train_images = np.ascontiguousarray(source.load_train(ids))
    test_images = np.ascontiguousarray(source.load_test(test_ids))
    if test_images.shape[1:] != train_images.shape[1:]:
        raise FmaskError(f"test images {test_images.shape[1:]} differ in shape from train images "
                         f"{train_images.shape[1:]}; make both splits the same size")
    train_labels, test_labels = source.train_labels[ids], source.test_labels[test_ids]
    # Normalisation from the pool's own pixels: dataset-agnostic and reproducible.
    pixels = train_images.astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3)).tolist()
    std = np.maximum(pixels.std(axis=(0, 2, 3)), 1e-3).tolist()

    tensors = {"train_images": torch.from_numpy(train_images), "train_labels": torch.from_numpy(train_labels),
               "test_images": torch.from_numpy(test_images), "test_labels": torch.from_numpy(test_labels)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(paths.pool_images(out), tensors, {"format": str(FORMAT_VERSION)})
    images_sha256 = sha256_file(paths.pool_images(out))
    content = {"dataset": dataset, "classes": source.classes[:n_classes], "ids": ids.tolist(),
               "test_ids": test_ids.tolist(), "images_sha256": images_sha256}
    pool_hash = sha256_json(content)
    height, width = train_images.shape[2:]
    manifest = {
        "format": FORMAT_VERSION, "kind": "pool", **content, "hash": pool_hash,
        "setting": setting, "class_counts": counts, "seed": seed, "initial": initial,
        "image_shape": list(train_images.shape[1:]), "normalization": {"mean": mean, "std": std},
        "augment": {"crop_pad": max(1, min(height, width) // 8), "flip": source.default_flip},
        STEP_KEY: step,
    }
    from fmask.label.labeled import initial_labeled_set  # the labeled-set format lives with `label`

    labeled = initial_labeled_set(pool_hash, initial_ids, source.train_labels[initial_ids], seed)
    atomic_write_json(paths.pool_labeled(out), seal_json(labeled))
    atomic_write_json(paths.pool_manifest(out), seal_json(manifest))  # last: a manifest means the pool is complete
    return BuildPoolResult(out, False, counts, len(ids), len(test_ids), initial)


@dataclass
class Pool:
    """A built pool: sample ids, ground truth and the normalised inputs the model takes."""

    dir: Path
    manifest: dict
    _images: torch.Tensor = field(repr=False)
    _labels: torch.Tensor = field(repr=False)
    test_images: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor = field(repr=False)
    _row: dict = field(repr=False, default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.manifest["ids"]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.manifest["normalization"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.manifest["normalization"]["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Positions in the image cache of sample ``ids``; unknown ids are refused."""
        try:
            return torch.tensor([self._row[int(i)] for i in ids], dtype=torch.long)
        except KeyError as exc:
            raise FmaskError(f"sample id {exc.args[0]} is not in the pool {self.dir}; use ids from its manifest") from exc

    def images(self, ids: Sequence[int]) -> torch.Tensor:
        """uint8 images (n, C, H, W) of ``ids``."""
        return self._images[self.rows(ids)]

    def labels(self, ids: Sequence[int]) -> torch.Tensor:
        """Ground-truth class indices of ``ids`` (the simulated oracle)."""
        return self._labels[self.rows(ids)]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) -> the float input the model takes (on the images' device)."""
        return (images.float() / 255.0 - self.mean.to(images.device)) / self.std.to(images.device)

    def inputs(self, ids: Sequence[int]) -> torch.Tensor:
        """Exactly the normalised float inputs (n, C, H, W) that the fisher and query steps feed the model."""
        return self.normalize(self.images(ids))


def load_pool(pool_dir: str | os.PathLike) -> Pool:
    """Read a pool directory written by ``fmask build-pool``, checking its image cache against the manifest."""
    pool_dir = Path(pool_dir)
    if not pool_dir.is_dir():
        raise FmaskError(f"pool directory {pool_dir} does not exist; run `{BUILD_POOL} --out {pool_dir}` first")
    manifest = read_json(paths.pool_manifest(pool_dir), what="pool manifest", made_by=BUILD_POOL)
    required = ("kind", "ids", "test_ids", "classes", "hash", "images_sha256", "normalization", "image_shape")
    if manifest.get("kind") != "pool" or any(key not in manifest for key in required):
        raise FmaskError(f"{paths.pool_manifest(pool_dir)} is not an fmask pool manifest; rerun `{BUILD_POOL}`")
    if manifest.get("format", 0) > FORMAT_VERSION:
        raise FmaskError(f"pool {pool_dir} was written by a newer fmask (format {manifest['format']}); upgrade fmask")
    images_path = paths.pool_images(pool_dir)
    if images_path.is_file() and sha256_file(images_path) != manifest["images_sha256"]:
        raise FmaskError(f"{images_path} does not match its manifest (changed or truncated); rerun `{BUILD_POOL} --force`")
    tensors, _ = read_safetensors(images_path, what="pool image cache", made_by=BUILD_POOL)
    content = {key: manifest[key] for key in ("dataset", "classes", "ids", "test_ids", "images_sha256")}
    if sha256_json(content) != manifest["hash"]:
        raise FmaskError(f"{paths.pool_manifest(pool_dir)} was edited (its hash does not match); rerun `{BUILD_POOL} --force`")
    pool = Pool(pool_dir, manifest, tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                tensors["test_labels"])
    pool._row = {int(i): row for row, i in enumerate(manifest["ids"])}
    return pool
