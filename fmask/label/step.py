"""``fmask label``: turn a query's selection into the next labeled set, with labels from the pool's ground truth
(the simulated oracle) or from a CSV of human answers (``sample_id,label``; label by index or class name)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fmask.errors import FmaskError
from fmask.io import STEP_KEY, atomic_write_json, check_writable, sha256_file, step_is_current
from fmask.label.labeled import extend_labeled, load_labeled
from fmask.pool.pool import load_pool
from fmask.query.step import load_query


@dataclass
class LabelResult:
    out: Path
    skipped: bool
    added: int
    unanswered: list[int]
    data: dict


def read_answers(path: Path, classes: list[str], allowed_ids: set[int]) -> dict[int, int]:
    """``sample_id,label`` rows -> {id: class index}; refuses unknown ids, unknown classes and conflicts."""
    if not path.is_file():
        raise FmaskError(f"answers file {path} does not exist; give a CSV with columns sample_id,label")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FmaskError(f"answers file {path} is not a readable CSV ({exc}); save it as UTF-8 CSV") from exc
    if rows and not {"sample_id", "label"} <= set(rows[0].keys() if rows[0] else ()):
        raise FmaskError(f"answers file {path} needs a header row 'sample_id,label'")
    by_name = {name: index for index, name in enumerate(classes)}
    answers: dict[int, int] = {}
    for line, row in enumerate(rows, start=2):
        raw_id, raw_label = (row.get("sample_id") or "").strip(), (row.get("label") or "").strip()
        try:
            sample_id = int(raw_id)
        except ValueError:
            raise FmaskError(f"{path}:{line}: sample_id {raw_id!r} is not an integer") from None
        if sample_id not in allowed_ids:
            raise FmaskError(f"{path}:{line}: sample id {sample_id} is not in the query; answer only queried ids")
        if raw_label in by_name:
            label = by_name[raw_label]
        elif raw_label.lstrip("-").isdigit() and 0 <= int(raw_label) < len(classes):
            label = int(raw_label)
        else:
            raise FmaskError(f"{path}:{line}: unknown label {raw_label!r}; use a class index 0-{len(classes) - 1} "
                             f"or a name from {classes}")
        if answers.get(sample_id, label) != label:
            raise FmaskError(f"{path}:{line}: sample id {sample_id} has conflicting answers; keep one label per id")
        answers[sample_id] = label
    return answers


def run_label(*, query: str | os.PathLike, out: str | os.PathLike, labeled: Optional[str | os.PathLike] = None,
              answers: Optional[str | os.PathLike] = None, pool_dir: Optional[str | os.PathLike] = None,
              force: bool = False) -> LabelResult:
    out = Path(out)
    query_data = load_query(query)
    pool = load_pool(pool_dir if pool_dir is not None else query_data["pool_dir"])
    if query_data["inputs"].get("pool") != pool.hash:
        raise FmaskError(f"query {query} was made on another pool; pass the --pool it was made on")
    labeled_path = Path(labeled) if labeled is not None else Path(query_data["labeled_path"])
    previous = load_labeled(labeled_path, pool)
    if labeled is None and previous.hash != query_data["inputs"].get("labeled"):
        raise FmaskError(f"labeled set {labeled_path} changed since the query was made; rerun the query or pass --labeled")
    selected = query_data["selected"]
    overlap = set(selected) & set(previous.ids)
    if overlap:
        raise FmaskError(f"sample id {min(overlap)} of the query is already labeled in {labeled_path}; "
                         "pass the labeled set the query used")
    pool.rows(selected)  # refuses ids outside the pool
    step = {"query": sha256_file(query), "labeled": previous.hash,
            "answers": sha256_file(answers) if answers is not None and Path(answers).is_file() else None}
    if not force and step_is_current(out, step):
        from fmask.io import read_json

        return LabelResult(out, True, 0, [], read_json(out, what="labeled set", made_by="fmask label"))
    if answers is not None:
        given = read_answers(Path(answers), pool.classes, set(selected))
        ids = [i for i in selected if i in given]
        labels, source = [given[i] for i in ids], "human"
        unanswered = [i for i in selected if i not in given]
    else:
        ids, labels, source, unanswered = list(selected), pool.labels(selected).tolist(), "oracle", []
    check_writable(out)
    data = extend_labeled(previous, ids, labels, round_=int(query_data["round"]), source=source,
                          strategy=query_data["strategy"], query_hash=step["query"])
    data[STEP_KEY] = step
    atomic_write_json(out, data)
    return LabelResult(out, False, len(ids), unanswered, data)
