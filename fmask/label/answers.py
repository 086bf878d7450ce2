"""Human answers for ``fmask label --answers``, read into ``{sample id: class index}``.

Two formats, told apart by the file (``.json``, or text that starts with ``[``/``{``, is Label Studio):

- a CSV with a header row naming a ``label`` column and a ``sample_id`` or a ``path`` column (pools from your own
  files: the path as samples.csv lists it); where both stand, ``sample_id`` wins and a row whose ``path`` names
  another sample is refused. Other columns are ignored, so the ``manifest.csv`` that ``fmask export`` writes can
  be filled in directly; a label is a class name or index; a blank label leaves that sample unanswered;
- Label Studio's JSON export (Export -> JSON): a list of tasks, each with ``data.sample_id`` or ``data.path``
  (``fmask export`` writes both) and ``annotations[].result[].value.choices``; tasks without an annotation, and
  cancelled (skipped) annotations, leave that id unanswered. Predictions are never read as answers. The same rules
  read the tasks that :mod:`fmask.label.label_studio` pulls from a live server (:func:`label_studio_answers`).

Anything else is refused with one line naming the file, the place and the fix, before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from fmask.core.errors import FmaskError
from fmask.core.labeled import resolve_label

CSV_FORMAT = "csv"
LABEL_STUDIO_FORMAT = "label-studio"
ID_COLUMN, PATH_COLUMN, LABEL_COLUMN = "sample_id", "path", "label"


class SampleKeys:
    """How an answer names its sample: by ``sample_id``, or by ``path`` in pools from your own files."""

    def __init__(self, sample_paths: Optional[Mapping[int, str]] = None) -> None:
        self.path_of = dict(sample_paths or {})
        self.id_of = {path: sample_id for sample_id, path in self.path_of.items()}

    def resolve(self, raw_id: Any, raw_path: Any, where: str) -> int:
        """The sample id a row or task names (``raw_id`` / ``raw_path``: None or blank when not given)."""
        has_id = raw_id is not None and str(raw_id).strip() != ""
        has_path = isinstance(raw_path, str) and raw_path.strip() != ""
        if has_id:
            sample_id = _parse_sample_id(raw_id, where)
            if has_path and self.path_of and self.path_of.get(sample_id) != raw_path.strip():
                raise FmaskError(f"{where}: sample_id {sample_id} is {self.path_of.get(sample_id)!r} in the pool but "
                                 f"the row's path is {raw_path.strip()!r}; fix the row (sample_id wins where both "
                                 "are given, so they must agree)")
            return sample_id
        if has_path:
            if not self.path_of:
                raise FmaskError(f"{where}: this pool has no file paths (a benchmark pool); give answers by sample_id")
            if raw_path.strip() not in self.id_of:
                raise FmaskError(f"{where}: path {raw_path.strip()!r} is not in the pool (paths are compared exactly, "
                                 "as samples.csv lists them)")
            return self.id_of[raw_path.strip()]
        raise FmaskError(f"{where} names no sample; give its sample_id or its path")


def answers_format(path: Path) -> str:
    """``label-studio`` for a ``.json`` file or text that opens with ``[``/``{``; ``csv`` otherwise."""
    if path.suffix.lower() == ".json":
        return LABEL_STUDIO_FORMAT
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    return LABEL_STUDIO_FORMAT if head[:1] in (b"[", b"{") else CSV_FORMAT


def _unknown_label(where: str, raw: Any, classes: list[str]) -> FmaskError:
    return FmaskError(f"{where}: unknown label {raw!r}; use a class index 0-{len(classes) - 1} or a name from {classes}")


def _parse_sample_id(raw: Any, where: str) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    raise FmaskError(f"{where}: sample_id {raw!r} is not an integer; give the sample id `fmask query` selected")


def _record(answers: dict[int, int], sample_id: int, label: int, where: str, allowed_ids: set[int]) -> None:
    if sample_id not in allowed_ids:
        raise FmaskError(f"{where}: sample id {sample_id} is not in the query; answer only queried ids")
    if answers.get(sample_id, label) != label:
        raise FmaskError(f"{where}: sample id {sample_id} has conflicting answers; keep one label per id")
    answers[sample_id] = label


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # utf-8-sig: spreadsheets save a byte-order mark
    except UnicodeDecodeError as exc:
        raise FmaskError(f"answers file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc


def read_csv_answers(path: Path, classes: list[str], allowed_ids: set[int],
                     keys: Optional[SampleKeys] = None) -> dict[int, int]:
    """``sample_id,label`` or ``path,label`` rows (a header row names the columns; extra columns are ignored) ->
    {id: class}."""
    keys = keys or SampleKeys()
    try:
        rows = list(csv.reader(io.StringIO(_read_text(path), newline=""), strict=True))
    except csv.Error as exc:
        raise FmaskError(f"answers file {path} is not a well-formed CSV ({exc}); quote fields that hold commas "
                         "or quotes") from exc
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise FmaskError(f"answers file {path} is empty; give a header row 'sample_id,label' (or 'path,label') and "
                         "one row per answer")
    header = [cell.strip().lower() for cell in rows[0]]
    if LABEL_COLUMN not in header or (ID_COLUMN not in header and PATH_COLUMN not in header):
        raise FmaskError(f"answers file {path} needs a header row 'sample_id,label' or 'path,label' (its first row is "
                         f"{','.join(rows[0])[:60]!r})")
    id_col = header.index(ID_COLUMN) if ID_COLUMN in header else None
    path_col = header.index(PATH_COLUMN) if PATH_COLUMN in header else None
    label_col = header.index(LABEL_COLUMN)
    answers: dict[int, int] = {}
    for row_number, row in enumerate(rows[1:], start=2):
        where = f"{path}: row {row_number}"
        if len(row) != len(header):
            raise FmaskError(f"{where} has {len(row)} fields but the header has {len(header)}; quote fields that "
                             "hold commas")
        sample_id = keys.resolve(row[id_col] if id_col is not None else None,
                                 row[path_col] if path_col is not None else None, where)
        raw_label = row[label_col].strip()
        if not raw_label:  # left blank by the annotator: stays unlabeled
            if sample_id not in allowed_ids:
                raise FmaskError(f"{where}: sample id {sample_id} is not in the query; answer only queried ids")
            continue
        label = resolve_label(raw_label, classes)
        if label is None:
            raise _unknown_label(where, raw_label, classes)
        _record(answers, sample_id, label, where, allowed_ids)
    return answers


def _task_choices(task: dict, where: str) -> list[str]:
    """Every class choice in the task's annotations that were not cancelled."""
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list):
        raise FmaskError(f"{where}: 'annotations' is not a list; export the project again with Export -> JSON")
    chosen: list[str] = []
    for annotation in annotations:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("result", []), list):
            raise FmaskError(f"{where}: an annotation is not an object with a 'result' list; export again with "
                             "Export -> JSON")
        if annotation.get("was_cancelled"):  # the annotator skipped the task
            continue
        for item in annotation.get("result", []):
            value = item.get("value") if isinstance(item, dict) else None
            choices = value.get("choices") if isinstance(value, dict) else None
            if choices is None:  # another control (a comment box, a rating) carries no class
                continue
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise FmaskError(f"{where}: value.choices is not a list of class names; use the labeling config "
                                 "`fmask export` wrote")
            if len(choices) > 1:
                raise FmaskError(f"{where}: an annotation picks {len(choices)} classes {choices}; choose exactly one "
                                 "class per image")
            chosen.extend(choices)
    return chosen


def label_studio_answers(tasks: list, classes: list[str], allowed_ids: set[int], origin: str,
                         keys: Optional[SampleKeys] = None) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Label Studio tasks (each with ``data.sample_id`` or ``data.path``, and annotations) -> ({id: class},
    {id: [task ids]}).

    The second map lists, per answered sample id, the Label Studio ids of the tasks whose annotations answered it
    (tasks without an ``id`` add nothing there). ``origin`` names the tasks' source in error messages; ``keys``
    resolves paths (pools from your own files).
    """
    keys = keys or SampleKeys()
    answers: dict[int, int] = {}
    task_ids: dict[int, list[int]] = {}
    for position, task in enumerate(tasks, start=1):
        where = f"{origin}: task {position}"
        if not isinstance(task, dict):
            raise FmaskError(f"{where} is not an object; in Label Studio use Export -> JSON")
        if "id" in task:
            where += f" (Label Studio id {task['id']})"
        data = task.get("data")
        if not isinstance(data, dict) or ("sample_id" not in data and "path" not in data):
            raise FmaskError(f"{where} has no data.sample_id; import the label_studio_tasks.json that `fmask export` "
                             "wrote and export with Export -> JSON (not JSON-MIN)")
        sample_id = keys.resolve(data.get("sample_id"), data.get("path"), where)
        for choice in _task_choices(task, where):
            label = resolve_label(choice, classes)
            if label is None:
                raise FmaskError(f"{where}: choice {choice!r} is not a class; use the labeling config `fmask export` "
                                 f"wrote (classes {classes})")
            _record(answers, sample_id, label, where, allowed_ids)
            if isinstance(task.get("id"), int) and task["id"] not in task_ids.setdefault(sample_id, []):
                task_ids[sample_id].append(task["id"])
        if sample_id not in allowed_ids:  # an unanswered task of another batch is still a mix-up
            raise FmaskError(f"{where}: sample id {sample_id} is not in the query; answer only queried ids")
    return answers, task_ids


def read_label_studio_answers(path: Path, classes: list[str], allowed_ids: set[int],
                              keys: Optional[SampleKeys] = None) -> dict[int, int]:
    """Label Studio's JSON export (a list of tasks with ``data.sample_id`` or ``data.path``, and annotations) ->
    {id: class}."""
    try:
        tasks = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise FmaskError(f"answers file {path} is not valid JSON (line {exc.lineno}: {exc.msg}); export it again "
                         "from Label Studio with Export -> JSON") from exc
    if not isinstance(tasks, list):
        raise FmaskError(f"answers file {path} is not a Label Studio JSON export (expected a list of tasks, found a "
                         f"{type(tasks).__name__}); in Label Studio use Export -> JSON")
    return label_studio_answers(tasks, classes, allowed_ids, str(path), keys)[0]


def read_answers(path: str | Path, classes: list[str], allowed_ids: set[int],
                 sample_paths: Optional[Mapping[int, str]] = None) -> dict[int, int]:
    """Human answers from a CSV or a Label Studio JSON export -> {sample id: class index}.

    ``sample_paths`` ({sample id: path} of a pool from your own files) lets answers name samples by path.
    Partial answers are fine (unanswered ids are simply absent); an empty answer set, ids outside
    ``allowed_ids``, labels outside ``classes`` and conflicting duplicates are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FmaskError(f"answers file {path} does not exist; give a CSV with columns sample_id,label or a Label "
                         "Studio JSON export")
    reader = read_label_studio_answers if answers_format(path) == LABEL_STUDIO_FORMAT else read_csv_answers
    answers = reader(path, classes, set(allowed_ids), SampleKeys(sample_paths))
    if not answers:
        raise FmaskError(f"answers file {path} answers none of the queried ids; label at least one image first")
    return answers
