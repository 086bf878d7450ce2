"""Label state as data: a labeled-set JSON lists sample ids, their labels, the round that labeled each one and
where each label came from (``oracle``: the pool's ground truth; ``human``: an annotator's answer)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import numpy as np

from fmask.core.errors import FmaskError
from fmask.core import paths
from fmask.core.atomic import atomic_write_bytes, atomic_write_json
from fmask.core.hashing import FORMAT_VERSION, sha256_file
from fmask.core.readers import read_json
from fmask.core.records import Recorded, check_record

SOURCES = ("initial", "oracle", "human")


def initial_labeled_set(pool_hash: str, ids: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    n = len(ids)
    return {"format": FORMAT_VERSION, "kind": "labeled", "pool": pool_hash, "round": 0, "strategy": "initial",
            "seed": seed, "ids": [int(i) for i in ids], "labels": [int(y) for y in labels],
            "rounds": [0] * n, "sources": ["initial"] * n}


def resolve_label(raw: str, classes: list[str]) -> Optional[int]:
    """A class name (exact, else case-insensitive when that is unambiguous) or a class index -> index; else None."""
    text = raw.strip()
    if text in classes:
        return classes.index(text)
    folded = [index for index, name in enumerate(classes) if name.casefold() == text.casefold()]
    if len(folded) == 1:
        return folded[0]
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    return None


@dataclass
class LabeledSet:
    path: Path
    data: dict
    hash: str

    # What the labeled-set JSON records:
    ids = Recorded[list[int]]("data")
    labels = Recorded[list[int]]("data")
    round = Recorded[int]("data", convert=int)
    strategy = Recorded[str]("data", default="initial")
    seed = Recorded[int]("data", default=0, convert=int)


def validate_labeled(data: dict, path: Path, pool) -> None:
    """Refuse a labeled set that does not belong to ``pool`` or is inconsistent."""
    check_record(data, kind="labeled", keys=("ids", "labels", "rounds", "sources", "pool", "round"),
                 newer=f"labeled set {path}",
                 not_ours=f"{path} is not an fmask labeled set; use pool/{paths.POOL_LABELED} or a file `fmask label` "
                          "wrote")
    ids, labels = data["ids"], data["labels"]
    if not all(isinstance(v, list) for v in (ids, labels, data["rounds"], data["sources"])) or \
            not len(ids) == len(labels) == len(data["rounds"]) == len(data["sources"]):
        raise FmaskError(f"{path}: ids, labels, rounds and sources must be lists of equal length; rerun `fmask label`")
    if data["pool"] != pool.hash:
        raise FmaskError(f"labeled set {path} belongs to another pool (hash {str(data['pool'])[:12]}, this pool "
                         f"{pool.hash[:12]}); use a labeled set made for {pool.dir}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids + labels):
        raise FmaskError(f"{path}: ids and labels must be integers; rerun `fmask label`")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FmaskError(f"labeled set {path} lists sample id {dup} twice; each id may be labeled once")
    pool_ids = set(pool.ids)
    outside = [i for i in ids if i not in pool_ids]
    if outside:
        raise FmaskError(f"labeled set {path} holds sample id {outside[0]} which is not in the pool; use ids from the pool")
    bad = [y for y in labels if not 0 <= y < pool.num_classes]
    if bad:
        raise FmaskError(f"labeled set {path} has label {bad[0]} outside the pool's {pool.num_classes} classes")


def load_labeled(path: str | os.PathLike, pool) -> LabeledSet:
    path = Path(path)
    data = read_json(path, what="labeled set", made_by="fmask build-pool` or `fmask label")
    validate_labeled(data, path, pool)
    return LabeledSet(path, data, sha256_file(path))


@dataclass
class LabeledPool:
    """A pool, a labeled set of it and the candidates left to label: what every step that scores or picks reads
    (a checkpoint's round, a cold start, a model-free first batch)."""

    pool: Any  # fmask.pool.pool.Pool
    pool_dir: Path
    labeled_set: LabeledSet
    labeled_path: Path
    unlabeled_ids: list[int]  # ascending sample ids not in the labeled set


T = TypeVar("T", bound=LabeledPool)


# The ignore below: mypy cannot check a default against a TypeVar (LabeledPool is T's bound, so the default is T).
def open_labeled_pool(pool: Any, pool_dir: str | os.PathLike, labeled_path: str | os.PathLike, *,
                      kind: type[T] = LabeledPool, **extra: Any) -> T:  # type: ignore[assignment]
    """Load the labeled set at ``labeled_path`` against ``pool`` and collect the candidates; ``kind`` (a
    LabeledPool subclass) and ``extra`` add what the caller holds beside them."""
    labeled_set = load_labeled(labeled_path, pool)
    taken = set(labeled_set.ids)
    return kind(pool=pool, pool_dir=Path(pool_dir), labeled_set=labeled_set, labeled_path=Path(labeled_path),
                unlabeled_ids=[int(i) for i in pool.ids if i not in taken], **extra)


def extend_labeled(previous: LabeledSet, ids: Sequence[int], labels: Sequence[int], *, round_: int, source: str,
                   strategy: str, query_hash: str) -> dict:
    """The next labeled set: the previous one plus ``ids`` labeled in ``round_``."""
    data = dict(previous.data)
    data.update(
        ids=previous.ids + [int(i) for i in ids],
        labels=previous.labels + [int(y) for y in labels],
        rounds=previous.data["rounds"] + [round_] * len(ids),
        sources=previous.data["sources"] + [source] * len(ids),
        round=round_, strategy=strategy, query=query_hash, previous=previous.hash,
    )
    return data


LABELED_CSV_COLUMNS = ("sample_id", "path", "label", "round", "source")


def labeled_csv_text(data: dict, classes: Sequence[str], sample_paths: Sequence[Optional[str]]) -> str:
    """The labeled set as a CSV (one row per labeled id, label as the class name), ``sample_paths`` aligned with
    its ids (None for pools without source files). `fmask build-pool --labels` reads it back by path."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LABELED_CSV_COLUMNS)
    for sample_id, path, label, round_, source in zip(data["ids"], sample_paths, data["labels"], data["rounds"],
                                                      data["sources"]):
        writer.writerow([sample_id, path or "", classes[label], round_, source])
    return buffer.getvalue()


def write_labeled(path: str | os.PathLike, data: dict, pool) -> None:
    """Write a (sealed) labeled set and the CSV beside it (paths.labeled_csv), each atomically."""
    path = Path(path)
    atomic_write_bytes(paths.labeled_csv(path), labeled_csv_text(data, pool.classes, pool.paths(data["ids"])).encode())
    atomic_write_json(path, data)  # last: a current JSON means its CSV is complete too
