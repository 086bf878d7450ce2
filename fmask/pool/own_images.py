"""``fmask build-pool --images DIR|CSV``: a pool from your own image files, labels optional.

Files are listed (fmask.pool.files), decoded in worker processes straight into the memory-mapped cache
(fmask.pool.decode), and numbered 0..N-1 in UTF-8 byte order of their paths once bad files and byte-identical
duplicates are dropped (the cache is compacted in place). The pool directory also gets samples.csv (one row per
sample), skipped.csv and duplicates.csv (what was left out and why), and the round-0 labeled set made of the labels
you gave."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.core.hashing import sha256_file
from fmask.core.labeled import resolve_label
from fmask.pool.cache import PixelStats, keep_rows
from fmask.pool.decode import BAD, OK, RESIZE_MODES, SIZE, DecodeOptions, FileResult, decode_into_cache, \
    default_workers, probe_size
from fmask.pool.files import (IMAGE_SUFFIXES, ImageFile, Skipped, csv_text, list_image_folder, list_test_set, listing_sha256,
                              parse_classes, path_order, read_images_csv, read_labels_csv)
from fmask.pool.pool import BuildPoolResult, finish_pool, pool_step, staged_pool
from fmask.core.progress import ProgressFn


@dataclass
class Decoded:
    """One split after decoding: the files kept (in id order) with their results, and what was left out."""

    kept: list[tuple[int, ImageFile, FileResult]]  # (position in the listing, file, result), in id order
    skipped: list[Skipped]
    duplicates: list[tuple[str, str, str]]  # (path, duplicate_of, split)
    dropped: dict[str, int]  # path of a file left out as a copy -> the id of the sample it copies

    def first_paths(self) -> dict[str, str]:
        """{sha256: path} of the kept files."""
        return {result.sha256: image.path for _, image, result in self.kept}


def _options(image_size: Optional[int], resize: Optional[str], channels: int) -> Optional[DecodeOptions]:
    if channels not in (1, 3):
        raise FmaskError(f"--channels {channels} is not supported; use 3 (RGB) or 1 (grayscale)")
    if resize is not None and resize not in RESIZE_MODES:
        raise FmaskError(f"--resize {resize!r} is unknown; use one of: {', '.join(RESIZE_MODES)}")
    if image_size is None:
        if resize is not None:
            raise FmaskError(f"--resize {resize} needs --image-size S (the side the images are brought to)")
        return None  # every image must already have one size (probed from the first)
    if image_size <= 0:
        raise FmaskError(f"--image-size {image_size} must be a positive number of pixels, e.g. 64")
    return DecodeOptions((image_size, image_size), resize or "crop", channels)


def _resolve_classes(declared: Optional[list[str]], raw_labels: Sequence[tuple[str, str]]) -> list[str]:
    """The class list: ``declared`` (--classes), else the sorted names the labels use."""
    if declared is None:
        names = sorted({raw for raw, _ in raw_labels})
        if not names:
            raise FmaskError("no image has a label and no --classes was given; fmask needs the class names to train "
                             "and to read answers: give --classes a,b,c (or --classes FILE, one name a line)")
        classes = names
    else:
        classes = declared
    if len(classes) < 2:
        raise FmaskError(f"the pool would have one class ({classes[0]!r}); a classifier needs at least two: list them "
                         "all with --classes a,b,c")
    return classes


def _class_index(raw: str, where: str, classes: list[str], declared: bool) -> int:
    index = resolve_label(raw, classes) if declared else classes.index(raw)
    if index is None:
        raise FmaskError(f"{where}: label {raw!r} is not a class; use a name from --classes {classes} or its index")
    return index


def build_image_pool(*, images: Path, out: Path, labels: Optional[str | os.PathLike] = None,
                     classes: Optional[str] = None, test: Optional[str | os.PathLike] = None,
                     image_size: Optional[int] = None, resize: Optional[str] = None, channels: int = 3,
                     workers: Optional[int] = None, strict: bool = False, force: bool = False,
                     progress: Optional[ProgressFn] = None) -> BuildPoolResult:
    """A pool from the image files below the folder ``images`` (or listed in the CSV ``images``), see the module
    docstring. Everything the user gave is checked before any file is decoded; a refusal writes nothing."""
    options = _options(image_size, resize, channels)
    if workers is not None and workers < 1:
        raise FmaskError(f"--workers {workers} must be at least 1")
    workers = workers or default_workers()
    if out.exists() and not out.is_dir():
        raise FmaskError(f"--out {out} is a file; give a directory for the pool")
    if not images.exists():
        raise FmaskError(f"--images {images} does not exist; give a folder of images or a CSV with a path column")
    if images.is_dir():
        files, skipped = list_image_folder(images, exclude=out)
        csv_labels: dict[str, tuple[str, str]] = {}
        where = f"under {images}"
    else:
        files, skipped = read_images_csv(images), []
        csv_labels = {f.path: (f.label, f"images CSV {images}") for f in files if f.label is not None}
        where = f"in {images}"
    if not files:
        raise FmaskError(f"no image files {where} (looked for {' '.join(sorted(IMAGE_SUFFIXES))}); point --images at "
                         "the folder that holds your images")
    if labels is not None and csv_labels:
        raise FmaskError(f"both the label column of {images} and --labels give labels; keep one of them")
    given_labels = read_labels_csv(Path(labels)) if labels is not None else csv_labels
    by_path = {f.path: f for f in files}
    unknown = next((p for p in given_labels if p not in by_path), None)
    if unknown is not None:
        raise FmaskError(f"{given_labels[unknown][1]}: {unknown!r} is not among the image files {where} (paths are "
                         "relative to the images folder, or as written in the images CSV, and compared exactly)")
    test_files, test_skipped = list_test_set(Path(test), exclude=out) if test is not None else ([], [])
    if test is not None and not test_files:
        raise FmaskError(f"--test {test} holds no image files; give a folder of <class>/ subfolders or a CSV with "
                         "path,label columns")
    declared = parse_classes(classes) if classes is not None else None
    class_list = _resolve_classes(declared, [*given_labels.values(), *[(f.label, "") for f in test_files]])
    label_of = {path: _class_index(raw, where_, class_list, declared is not None)
                for path, (raw, where_) in given_labels.items()}
    test_where = f"--test {test}"
    test_label_of = [_class_index(f.label, f"{test_where} ({f.path})", class_list, declared is not None)
                     for f in test_files]
    step = {"images": str(images.resolve()), "listing": listing_sha256(files),
            "labels": sha256_file(labels) if labels is not None else None, "classes": class_list,
            "test": str(Path(test).resolve()) if test is not None else None,
            "test_listing": listing_sha256(test_files), "image_size": image_size,
            "resize": options.resize if options else None, "channels": channels, "strict": strict}
    with pool_step(out, step, force=force) as output:
        if output.current:
            return output.recorded
        if options is None:
            probed = probe_size([f.file for f in files], channels)
            if probed is None:
                raise FmaskError(f"none of the {len(files)} image files {where} could be decoded; check that they are "
                                 "images (PIL must read them)")
            options = DecodeOptions(probed[1:], None, channels)
            first_size = files[probed[0]].path
        else:
            first_size = ""
        with staged_pool(out) as staged:
            pool = _decode_split(files, staged[paths.POOL_IMAGES], options, workers=workers, strict=strict,
                                 progress=progress, split="pool", first_size=first_size)
            if not pool.kept:
                raise FmaskError(f"none of the {len(files)} image files {where} could be decoded (the first: "
                                 f"{pool.skipped[0].path}: {pool.skipped[0].reason}); check that they are images")
            test_split = _decode_split(test_files, staged[paths.POOL_TEST_IMAGES], options, workers=workers,
                                       strict=strict, progress=progress, split="test", first_size=first_size,
                                       taken=pool.first_paths())
            sample_paths = [f.path for _, f, _ in pool.kept]
            id_of = {path: i for i, path in enumerate(sample_paths)}
            id_of.update(pool.dropped)  # a label given to a copy labels the sample it copies
            known = np.full(len(sample_paths), -1, dtype=np.int64)
            dropped_labels = []
            for path in sorted(label_of, key=path_order):
                if path not in id_of:
                    dropped_labels.append(path)  # the file was skipped
                    continue
                sample = id_of[path]
                if known[sample] >= 0 and known[sample] != label_of[path]:
                    raise FmaskError(f"{path!r} and {sample_paths[sample]!r} are the same image (same bytes) but are "
                                     f"labeled {class_list[label_of[path]]!r} and {class_list[known[sample]]!r}; keep "
                                     "one label")
                known[sample] = label_of[path]
            test_kept_labels = [test_label_of[position] for position, _, _ in test_split.kept]
            stats = PixelStats(channels)
            for _, _, result in pool.kept:
                stats.add(result.sums, result.squares, options.size[0] * options.size[1])
            _write_tables(staged, pool, test_split, known, class_list, [*skipped, *test_skipped])
            labeled_ids = np.flatnonzero(known >= 0)
            manifest = finish_pool(
                staged, dataset="images", classes=class_list, ids=np.arange(len(sample_paths)),
                test_ids=np.arange(len(test_split.kept)), labels=known, test_labels=np.asarray(test_kept_labels),
                image_shape=(channels, *options.size), stats=stats, flip=True, ground_truth=False,
                labeled_ids=labeled_ids, labeled_labels=known[labeled_ids], seed=0, sample_paths=sample_paths,
                extra={"source": {"images": str(images.resolve()), "labels": str(Path(labels).resolve()) if labels
                                  else None, "test": str(Path(test).resolve()) if test is not None else None},
                       "setting": "images", "initial": int(len(labeled_ids)),
                       "class_counts": np.bincount(known[labeled_ids], minlength=len(class_list)).tolist(),
                       "decoding": {"image_size": list(options.size), "resize": options.resize,
                                    "channels": channels}},
                step=step)
    listed = len(files) + len(skipped) + len(test_files) + len(test_skipped)
    notes = _summary(out, listed, pool, test_split, [*skipped, *test_skipped], dropped_labels)
    return BuildPoolResult(out, False, manifest["class_counts"], len(sample_paths), len(test_split.kept),
                           manifest["initial"], notes)


def _decode_split(files: list[ImageFile], target: Path, options: DecodeOptions, *, workers: int, strict: bool,
                  progress: Optional[ProgressFn], split: str, first_size: str,
                  taken: Optional[dict[str, str]] = None) -> Decoded:
    """Decode one split into the cache file ``target``, keep each decodable file whose bytes were not seen before
    (in path order; ``taken``: {sha256: path} of the pool, whose copies a test set drops), compact the cache to
    the kept rows."""
    results = decode_into_cache([f.file for f in files], target, options, workers=workers, stop_on_bad=strict,
                                progress=progress, what=f"decoding {split} images")
    size = next((i for i, r in enumerate(results) if r is not None and r.status == SIZE), None)
    if size is not None:
        height, width = options.size
        raise FmaskError(f"images differ in size: {first_size!r} is {width}x{height} but {files[size].path!r} is "
                         f"{results[size].reason}; give --image-size S (and --resize crop|pad|stretch) to bring them "
                         "to one size")
    bad = next((i for i, r in enumerate(results) if r is not None and r.status == BAD), None)
    if strict and bad is not None:
        raise FmaskError(f"{files[bad].path}: {results[bad].reason} (--strict refuses bad files: remove or fix it, "
                         "or drop --strict to skip and list it)")
    first: dict[str, tuple[str, int]] = {}  # sha256 -> (path, id) of the first file with those bytes
    kept, skipped, duplicates, dropped = [], [], [], {}
    for position, (image, result) in enumerate(zip(files, results)):
        if result.status != OK:
            skipped.append(Skipped(image.path, result.reason, split))
        elif taken is not None and result.sha256 in taken:
            duplicates.append((image.path, taken[result.sha256], "test (also in the pool)"))
        elif result.sha256 in first:
            duplicates.append((image.path, first[result.sha256][0], split))
            dropped[image.path] = first[result.sha256][1]
        else:
            first[result.sha256] = (image.path, len(kept))
            kept.append((position, image, result))
    keep_rows(target, np.asarray([position for position, _, _ in kept], dtype=np.int64))
    return Decoded(kept, skipped, duplicates, dropped)


def _write_tables(staged: dict[str, Path], pool: Decoded, test: Decoded, known: np.ndarray, classes: list[str],
                  listed: list[Skipped]) -> None:
    samples = ((i, f.path, r.sha256, r.width, r.height, classes[known[i]] if known[i] >= 0 else "")
               for i, (_, f, r) in enumerate(pool.kept))
    staged[paths.POOL_SAMPLES_CSV].write_text(
        csv_text(("sample_id", "path", "sha256", "width", "height", "label"), samples), encoding="utf-8")
    skipped = sorted([*listed, *pool.skipped, *test.skipped], key=lambda s: (s.split != "pool", path_order(s.path)))
    staged[paths.POOL_SKIPPED_CSV].write_text(
        csv_text(("path", "reason", "split"), ((s.path, s.reason, s.split) for s in skipped)), encoding="utf-8")
    staged[paths.POOL_DUPLICATES_CSV].write_text(
        csv_text(("path", "duplicate_of", "split"), [*pool.duplicates, *test.duplicates]), encoding="utf-8")


def _summary(out: Path, listed: int, pool: Decoded, test: Decoded, ignored: list[Skipped],
             dropped_labels: list[str]) -> list[str]:
    """The lines the user sees: what was skipped, what was a copy, which labels went with skipped files."""
    notes = []
    skipped = len(ignored) + len(pool.skipped) + len(test.skipped)
    if skipped:
        notes.append(f"skipped {skipped:,} of {listed:,} files; see {paths.pool_file(out, paths.POOL_SKIPPED_CSV)}")
    copies = len(pool.duplicates) + len(test.duplicates)
    if copies:
        notes.append(f"{copies:,} byte-identical copies kept once; see {paths.pool_file(out, paths.POOL_DUPLICATES_CSV)}")
    if dropped_labels:
        notes.append(f"{len(dropped_labels):,} labeled files could not be read, their labels are not used (first: "
                     f"{dropped_labels[0]!r}); see {paths.pool_file(out, paths.POOL_SKIPPED_CSV)}")
    return notes
