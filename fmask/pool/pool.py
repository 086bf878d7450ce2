"""``fmask build-pool``: a pool directory from a benchmark dataset (pick a possibly class-imbalanced pool, draw the
round-0 labeled set) or from your own image files (fmask.pool.own_images), with the images decoded once into a
memory-mapped uint8 cache (fmask.pool.cache). :class:`Pool` reads it back, memory-mapped."""

from __future__ import annotations

import csv
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.core.atomic import atomic_path
from fmask.core.hashing import FORMAT_VERSION, json_bytes, seal_json, sha256_file, sha256_json
from fmask.core.readers import read_json
from fmask.core.records import Recorded, check_record
from fmask.core.steps import STEP_KEY, StepOutput, step_is_current, step_output
from fmask.pool.cache import PixelStats, create_rows, open_rows
from fmask.pool.datasets import open_dataset
from fmask.core.progress import ProgressFn

SETTINGS = {
    "balanced": None,  # every train sample of every class
    "setting1": [250, 5000, 250, 250],  # the paper's Setting 1: classes 0-3 only
    "setting2": [250] * 9 + [5000],  # the paper's Setting 2: nine small classes, the tenth large
}
BUILD_POOL = "fmask build-pool"
ROWS_PER_CHUNK = 2048  # images read from a dataset and written to the cache at a time
POOL_OUTPUTS = paths.POOL_OUTPUTS  # every file a pool directory may hold, in publish order


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
    skipped: bool  # the pool was current: nothing was rebuilt
    class_counts: list[int]  # pool samples per class (labeled samples per class for your own images)
    n_pool: int
    n_test: int
    n_initial: int  # labeled samples in round 0
    notes: list[str] = field(default_factory=list)  # summary lines for the user (skipped files, duplicates)


def build_pool(*, out: str | os.PathLike, dataset: Optional[str] = None, images: Optional[str | os.PathLike] = None,
               root: str | os.PathLike = "data", setting: Optional[str] = None,
               class_counts: Optional[Sequence[int]] = None, initial: Optional[int] = None, seed: int = 0,
               test_per_class: Optional[int] = None, download: bool = False, labels: Optional[str | os.PathLike] = None,
               classes: Optional[str] = None, test: Optional[str | os.PathLike] = None,
               image_size: Optional[int] = None, resize: Optional[str] = None, channels: int = 3,
               workers: Optional[int] = None, strict: bool = False, force: bool = False,
               progress: Optional[ProgressFn] = None) -> BuildPoolResult:
    """Build a pool directory under ``out`` from a benchmark ``dataset`` (default digits) or from ``images`` (a
    folder or a CSV of your own files; see fmask.pool.own_images.build_image_pool)."""
    if images is not None:
        given = {"--dataset": dataset, "--initial": initial, "--setting": setting, "--class-counts": class_counts,
                 "--test-per-class": test_per_class}
        clash = next((name for name, value in given.items() if value is not None), None)
        if clash is not None:
            raise FmaskError(f"--images builds a pool from your own files and cannot take {clash} (a benchmark "
                             f"option); drop {clash}, or drop --images to build a benchmark pool")
        from fmask.pool.own_images import build_image_pool

        return build_image_pool(images=Path(images), out=Path(out), labels=labels, classes=classes, test=test,
                                image_size=image_size, resize=resize, channels=channels, workers=workers,
                                strict=strict, force=force, progress=progress)
    given = {"--labels": labels, "--classes": classes, "--test": test, "--image-size": image_size,
             "--resize": resize, "--channels": None if channels == 3 else channels, "--strict": strict or None}
    clash = next((name for name, value in given.items() if value is not None), None)
    if clash is not None:
        raise FmaskError(f"{clash} applies to pools built from your own files; add --images DIR (or CSV), or drop "
                         f"{clash} for a benchmark dataset")
    return build_dataset_pool(dataset=dataset or "digits", out=out, root=root, setting=setting or "balanced",
                              class_counts=class_counts, initial=100 if initial is None else initial, seed=seed,
                              test_per_class=test_per_class, download=download, force=force, progress=progress)


def build_dataset_pool(*, dataset: str, out: str | os.PathLike, root: str | os.PathLike = "data",
                       setting: str = "balanced", class_counts: Optional[Sequence[int]] = None, initial: int = 100,
                       seed: int = 0, test_per_class: Optional[int] = None, download: bool = False,
                       force: bool = False, progress: Optional[ProgressFn] = None) -> BuildPoolResult:
    """A pool from a benchmark dataset: the manifest, the image cache and the round-0 labeled set."""
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
    with pool_step(out, step, force=force) as output:
        if output.current:
            return output.recorded
        return _build_pool_locked(out=out, step=step, dataset=dataset, root=Path(root), download=download,
                                  class_counts=class_counts, initial=initial, seed=seed,
                                  test_per_class=test_per_class, setting=setting, progress=progress)


def pool_is_current(out: Path, step: dict) -> bool:
    """The pool in ``out`` was built from the same inputs and every file it needs is there."""
    return step_is_current(paths.pool_manifest(out), step) and \
        all(paths.pool_file(out, name).is_file() for name in (*paths.POOL_CACHE, paths.POOL_LABELED))


@contextmanager
def pool_step(out: Path, step: dict, *, force: bool) -> Iterator[StepOutput[BuildPoolResult]]:
    """:func:`fmask.core.steps.step_output` for a pool directory: the manifest records the step (published last),
    the pool is current when its every file is there too, and a current pool gives its BuildPoolResult."""
    def reuse() -> BuildPoolResult:
        manifest = read_json(paths.pool_manifest(out), what="pool manifest", made_by=BUILD_POOL)
        return BuildPoolResult(out, True, manifest["class_counts"], len(manifest["ids"]), len(manifest["test_ids"]),
                               manifest["initial"])

    with step_output(paths.pool_manifest(out), command="build-pool", step=step, force=force,
                     beside=[paths.pool_file(out, name) for name in POOL_OUTPUTS if name != paths.POOL_MANIFEST],
                     is_current=lambda: pool_is_current(out, step), on_current=reuse) as output:
        yield output


def _build_pool_locked(*, out: Path, step: dict, dataset: str, root: Path, download: bool,
                       class_counts: Optional[Sequence[int]], initial: int, seed: int,
                       test_per_class: Optional[int], setting: str,
                       progress: Optional[ProgressFn]) -> BuildPoolResult:
    """build_dataset_pool's work, done while holding the lock of ``out``."""
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

    with staged_pool(out, [name for name in POOL_OUTPUTS if name not in USER_FILE_TABLES]) as staged:
        stats, shape = copy_into_cache(source.load_train, ids, staged[paths.POOL_IMAGES], progress=progress,
                                       what="caching pool images")
        _, test_shape = copy_into_cache(source.load_test, test_ids, staged[paths.POOL_TEST_IMAGES],
                                        progress=progress, what="caching test images")
        if test_shape != shape:
            raise FmaskError(f"test images {test_shape} differ in shape from train images {shape}; make both splits "
                             "the same size")
        height, width = shape[1:]
        finish_pool(staged, dataset=dataset, classes=source.classes[:n_classes], ids=ids, test_ids=test_ids,
                    labels=source.train_labels[ids], test_labels=source.test_labels[test_ids], image_shape=shape,
                    stats=stats, flip=source.default_flip, ground_truth=True, labeled_ids=initial_ids,
                    labeled_labels=source.train_labels[initial_ids], seed=seed, sample_paths=None,
                    extra={"setting": setting, "class_counts": counts, "seed": seed, "initial": initial}, step=step)
    for name in USER_FILE_TABLES:
        paths.pool_file(out, name).unlink(missing_ok=True)  # left by an earlier pool from your own files
    return BuildPoolResult(out, False, counts, len(ids), len(test_ids), initial)


USER_FILE_TABLES = (paths.POOL_SAMPLES_CSV, paths.POOL_SKIPPED_CSV, paths.POOL_DUPLICATES_CSV)  # own images only


@contextmanager
def staged_pool(out: Path, names: Sequence[str] = POOL_OUTPUTS) -> Iterator[dict[str, Path]]:
    """Temp paths for the pool files ``names`` (in POOL_OUTPUTS order), renamed into place together when the block
    succeeds, in that order (the manifest last); when it fails, none is."""
    with ExitStack() as stack:
        # ExitStack renames the last entered first: enter in reverse publish order.
        staged = {name: stack.enter_context(atomic_path(paths.pool_file(out, name))) for name in reversed(names)}
        yield staged


def copy_into_cache(load: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, target: Path, *,
                    progress: Optional[ProgressFn] = None, what: str = "caching images"
                    ) -> tuple[PixelStats, tuple[int, ...]]:
    """Write ``load(ids)`` into a new cache file at ``target``, a chunk at a time; returns the pixel statistics
    and the image shape (C, H, W)."""
    first = np.ascontiguousarray(load(ids[:1])) if len(ids) else None
    shape = tuple(first.shape[1:]) if first is not None else (0, 0, 0)
    rows = create_rows(target, (len(ids), *shape))
    stats = PixelStats(shape[0])
    for start in range(0, len(ids), ROWS_PER_CHUNK):
        chunk = np.ascontiguousarray(load(ids[start:start + ROWS_PER_CHUNK]))
        if chunk.shape[1:] != shape:
            raise FmaskError(f"images have different sizes {shape} and {tuple(chunk.shape[1:])}; resize them to one "
                             "size, or build the pool with --images and --image-size")
        rows[start:start + len(chunk)] = chunk
        stats.add_images(chunk)
        if progress is not None:
            progress(what, min(start + ROWS_PER_CHUNK, len(ids)), len(ids))
    rows.flush()
    del rows
    return stats, shape


def write_npy(target: Path, array: np.ndarray) -> None:
    with open(target, "wb") as handle:  # a handle: np.save would add ".npy" to the temp name
        np.save(handle, array)


def finish_pool(staged: dict[str, Path], *, dataset: str, classes: Sequence[str], ids: np.ndarray,
                test_ids: np.ndarray, labels: np.ndarray, test_labels: np.ndarray, image_shape: Sequence[int],
                stats: PixelStats, flip: bool, ground_truth: bool, labeled_ids: np.ndarray,
                labeled_labels: np.ndarray, seed: int, sample_paths: Optional[Sequence[str]], extra: dict,
                step: dict) -> dict:
    """Write the labels, the manifest and the round-0 labeled set (JSON and CSV) into ``staged`` temp files, once
    the image caches are there; returns the manifest."""
    write_npy(staged[paths.POOL_LABELS], np.asarray(labels, dtype=np.int64))
    write_npy(staged[paths.POOL_TEST_LABELS], np.asarray(test_labels, dtype=np.int64))
    content = {"dataset": dataset, "classes": list(classes), "ids": [int(i) for i in ids],
               "test_ids": [int(i) for i in test_ids],
               "cache_sha256": {name: sha256_file(staged[name]) for name in paths.POOL_CACHE}}
    if sample_paths is not None:
        content["samples_sha256"] = sha256_file(staged[paths.POOL_SAMPLES_CSV])
    pool_hash = sha256_json(content)
    mean, std = stats.mean_std()
    height, width = image_shape[1:]
    manifest = {
        "format": FORMAT_VERSION, "kind": "pool", **content, "hash": pool_hash, "ground_truth": ground_truth,
        **extra, "image_shape": list(image_shape), "normalization": {"mean": mean, "std": std},
        "augment": {"crop_pad": max(1, min(height, width) // 8), "flip": flip},
        STEP_KEY: step,
    }
    from fmask.core.labeled import initial_labeled_set, labeled_csv_text  # the labeled-set format lives with `label`

    labeled = seal_json(initial_labeled_set(pool_hash, labeled_ids, labeled_labels, seed))
    path_of = (lambda i: sample_paths[i]) if sample_paths is not None else (lambda i: None)
    staged[paths.labeled_csv(paths.POOL_LABELED).name].write_text(
        labeled_csv_text(labeled, classes, [path_of(i) for i in labeled["ids"]]), encoding="utf-8")
    staged[paths.POOL_LABELED].write_bytes(json_bytes(labeled))
    staged[paths.POOL_MANIFEST].write_bytes(json_bytes(seal_json(manifest)))
    return manifest


@dataclass
class Pool:
    """A built pool: sample ids, labels (ground truth for benchmark pools; -1 where unknown), the normalised inputs
    the model takes and, for pools from your own files, each sample's path. The images are memory-mapped: only the
    rows a step asks for are read."""

    dir: Path
    manifest: dict
    _images: torch.Tensor = field(repr=False)
    _labels: torch.Tensor = field(repr=False)
    test_images: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor = field(repr=False)
    _row: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))  # sample id -> cache row
    _paths: Optional[list[str]] = field(repr=False, default=None)

    # What the manifest records:
    ids = Recorded[list[int]]("manifest")
    hash = Recorded[str]("manifest")
    classes = Recorded[list[str]]("manifest")
    image_shape = Recorded[tuple[int, int, int]]("manifest", convert=tuple)
    # True for benchmark pools, whose every label is known (the simulated oracle can label them).
    ground_truth = Recorded[bool]("manifest", default=True, convert=bool)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_test_set(self) -> bool:
        return len(self.test_labels) > 0

    @property
    def has_paths(self) -> bool:
        """True for pools built from your own files: every sample has the path it was read from."""
        return "samples_sha256" in self.manifest

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.manifest["normalization"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.manifest["normalization"]["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Positions in the image cache of sample ``ids``; unknown ids are refused."""
        wanted = np.asarray([int(i) for i in ids], dtype=np.int64)
        inside = (wanted >= 0) & (wanted < len(self._row))
        rows = np.full(len(wanted), -1, dtype=np.int64)
        rows[inside] = self._row[wanted[inside]]
        if (rows < 0).any():
            missing = int(wanted[np.flatnonzero(rows < 0)[0]])
            raise FmaskError(f"sample id {missing} is not in the pool {self.dir}; use ids from its manifest")
        return torch.from_numpy(rows)

    def images(self, ids: Sequence[int]) -> torch.Tensor:
        """uint8 images (n, C, H, W) of ``ids``, read from the memory-mapped cache."""
        return self._images[self.rows(ids)]

    @property
    def all_images(self) -> torch.Tensor:
        """Every pool image (N, C, H, W) in ``ids`` order: the memory-mapped cache itself, not a copy (slice it to
        read a batch)."""
        return self._images

    def labels(self, ids: Sequence[int]) -> torch.Tensor:
        """Class indices of ``ids``: the ground truth (the simulated oracle); -1 where a pool without ground truth
        does not know it."""
        return self._labels[self.rows(ids)]

    def paths(self, ids: Sequence[int]) -> list[Optional[str]]:
        """The path each sample was read from (as samples.csv lists it), or None for pools without source files."""
        if not self.has_paths:
            return [None] * len(ids)
        if self._paths is None:
            self._paths = read_sample_paths(self.dir, len(self.ids))
        return [self._paths[int(row)] for row in self.rows(ids)]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) -> the float input the model takes (on the images' device)."""
        return (images.float() / 255.0 - self.mean.to(images.device)) / self.std.to(images.device)

    def inputs(self, ids: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """Exactly the normalised float inputs (n, C, H, W) that the fisher and query steps feed the model; with
        ``device``, the uint8 rows move there and are normalised there (a quarter of the bytes to copy)."""
        images = self.images(ids)
        return self.normalize(images if device is None else images.to(device, non_blocking=True))


def read_sample_paths(pool_dir: Path, count: int) -> list[str]:
    """The ``path`` column of a pool's samples.csv, in sample-id order, read row by row (only the paths are kept:
    for a pool of millions the whole table would not be small)."""
    samples = paths.pool_file(pool_dir, paths.POOL_SAMPLES_CSV)
    broken = FmaskError(f"{samples} does not list the pool's samples in order; rerun `{BUILD_POOL} --force`")
    sample_paths: list[str] = []
    try:
        with open(samples, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, strict=True)
            header = next(reader, [])
            if "sample_id" not in header or "path" not in header:
                raise broken
            id_column, path_column = header.index("sample_id"), header.index("path")
            for expected, row in enumerate(reader):
                if row[id_column] != str(expected):
                    raise broken
                sample_paths.append(row[path_column])
    except (OSError, UnicodeDecodeError, csv.Error, IndexError) as exc:
        raise broken from exc
    if len(sample_paths) != count:
        raise broken
    return sample_paths


def load_pool(pool_dir: str | os.PathLike) -> Pool:
    """Read a pool directory written by ``fmask build-pool``, checking its cache files against the manifest; the
    images stay on disk, memory-mapped."""
    pool_dir = Path(pool_dir)
    if not pool_dir.is_dir():
        raise FmaskError(f"pool directory {pool_dir} does not exist; run `{BUILD_POOL} --out {pool_dir}` first")
    manifest = read_json(paths.pool_manifest(pool_dir), what="pool manifest", made_by=BUILD_POOL)
    if manifest.get("kind") == "pool" and "images_sha256" in manifest and "cache_sha256" not in manifest:
        raise FmaskError(f"pool {pool_dir} was built by an older fmask (a safetensors image cache); rebuild it with "
                         f"`{BUILD_POOL} --force` and the same options")
    not_ours = f"{paths.pool_manifest(pool_dir)} is not an fmask pool manifest; rerun `{BUILD_POOL}`"
    check_record(manifest, kind="pool", keys=("ids", "test_ids", "classes", "hash", "cache_sha256", "normalization",
                                              "image_shape"), newer=f"pool {pool_dir}", not_ours=not_ours)
    if not isinstance(manifest["cache_sha256"], dict):
        raise FmaskError(not_ours)
    for name in paths.POOL_CACHE:
        cache_file = paths.pool_file(pool_dir, name)
        if not cache_file.is_file():
            raise FmaskError(f"{cache_file} is missing; rerun `{BUILD_POOL} --force`")
        if sha256_file(cache_file) != manifest["cache_sha256"].get(name):
            raise FmaskError(f"{cache_file} does not match its manifest (changed or truncated); rerun "
                             f"`{BUILD_POOL} --force`")
    content = {key: manifest[key] for key in ("dataset", "classes", "ids", "test_ids", "cache_sha256")}
    if "samples_sha256" in manifest:
        samples = paths.pool_file(pool_dir, paths.POOL_SAMPLES_CSV)
        if not samples.is_file() or sha256_file(samples) != manifest["samples_sha256"]:
            raise FmaskError(f"{samples} is missing or does not match its manifest; rerun `{BUILD_POOL} --force`")
        content["samples_sha256"] = manifest["samples_sha256"]
    if sha256_json(content) != manifest["hash"]:
        raise FmaskError(f"{paths.pool_manifest(pool_dir)} was edited (its hash does not match); rerun `{BUILD_POOL} --force`")
    arrays = {}
    for name in paths.POOL_CACHE:
        try:
            arrays[name] = open_rows(paths.pool_file(pool_dir, name))
        except (ValueError, OSError) as exc:
            raise FmaskError(f"{paths.pool_file(pool_dir, name)} is not a readable .npy file; rerun "
                             f"`{BUILD_POOL} --force`") from exc
    shape = tuple(manifest["image_shape"])
    expected = {paths.POOL_IMAGES: (len(manifest["ids"]), *shape), paths.POOL_TEST_IMAGES: (len(manifest["test_ids"]), *shape),
                paths.POOL_LABELS: (len(manifest["ids"]),), paths.POOL_TEST_LABELS: (len(manifest["test_ids"]),)}
    for name, array in arrays.items():
        if tuple(array.shape) != expected[name]:
            raise FmaskError(f"{paths.pool_file(pool_dir, name)} holds shape {tuple(array.shape)}, its manifest says "
                             f"{expected[name]}; rerun `{BUILD_POOL} --force`")
    ids = np.asarray(manifest["ids"], dtype=np.int64)
    row_of = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
    row_of[ids] = np.arange(len(ids))
    return Pool(pool_dir, manifest, torch.from_numpy(arrays[paths.POOL_IMAGES]),
                torch.from_numpy(np.asarray(arrays[paths.POOL_LABELS])),
                torch.from_numpy(arrays[paths.POOL_TEST_IMAGES]),
                torch.from_numpy(np.asarray(arrays[paths.POOL_TEST_LABELS])), row_of)
