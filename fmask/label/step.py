"""``fmask label``: turn a query's selection into the next labeled set (a JSON and a CSV beside it), with labels
from the pool's ground truth (the simulated oracle; pools from your own images have none) or from human answers (a
CSV keyed by ``sample_id`` or ``path``, or a Label Studio JSON export, read by :mod:`fmask.label.answers`, or the
annotations of a live Label Studio project, pulled by :mod:`fmask.label.label_studio`). A run keeps to one label
source unless mixing is asked for explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fmask.core.errors import FmaskError
from fmask.core import paths
from fmask.core.hashing import sha256_file, sha256_json
from fmask.core.readers import read_json
from fmask.core.steps import step_output
from fmask.label import label_studio
from fmask.label.answers import read_answers  # noqa: F401  (re-exported: its historical home)
from fmask.core.labeled import LabeledSet, extend_labeled, load_labeled, write_labeled
from fmask.pool.pool import load_pool
from fmask.query.step import load_query

LABEL_STUDIO_TASKS_KEY = "label_studio_tasks"  # in a labeled set: sample id -> the Label Studio task that labeled it


@dataclass
class LabelResult:
    out: Path
    skipped: bool
    added: int
    unanswered: list[int]
    data: dict
    source: str = "oracle"  # where this round's labels came from: "oracle" or "human"
    label_studio: Optional[label_studio.PullResult] = None  # the pull, when the answers came from a live server


def check_one_source(previous: LabeledSet, source: str, allow_mixed_sources: bool) -> None:
    """Refuse a round whose label source (oracle or human) differs from the earlier rounds', unless asked for:
    a simulated round slipped into a real annotation run (or the reverse) would silently change the experiment."""
    earlier = {s for s in previous.data["sources"] if s in ("oracle", "human")}  # "initial" came with the pool
    if allow_mixed_sources or not earlier - {source}:
        return
    if source == "oracle":
        raise FmaskError(f"labeled set {previous.path} holds human labels from earlier rounds but no --answers (or "
                         "--project) was given, so the simulated oracle would label this round; pass --answers FILE "
                         "or --project NAME, or --allow-mixed-sources to mix oracle and human labels on purpose")
    raise FmaskError(f"labeled set {previous.path} holds simulated-oracle labels from earlier rounds but --answers "
                     "(or --project) gives human labels; keep to one source, or pass --allow-mixed-sources to mix "
                     "them on purpose")


def run_label(*, query: str | os.PathLike, out: str | os.PathLike, labeled: Optional[str | os.PathLike] = None,
              answers: Optional[str | os.PathLike] = None, pool_dir: Optional[str | os.PathLike] = None,
              force: bool = False, allow_mixed_sources: bool = False, label_studio_url: Optional[str] = None,
              project: Optional[str] = None) -> LabelResult:
    """Write the next labeled set: ``previous`` plus the query's ids, labeled by the oracle, by ``answers`` or by
    the annotations of the Label Studio project titled ``project`` (at ``label_studio_url``, else
    ``LABEL_STUDIO_URL``)."""
    out = Path(out)
    if project is not None and answers is not None:
        raise FmaskError("give --answers FILE or --project NAME (Label Studio), not both: one label source per run")
    if project is None and label_studio_url is not None:
        raise FmaskError("--label-studio needs --project NAME, the Label Studio project to pull the answers from")
    url = label_studio.resolve_url(label_studio_url) if project is not None else None
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
    if answers is None and project is None and not pool.ground_truth:
        raise FmaskError(f"pool {pool.dir} has no ground truth (it was built from your own images), so nothing can "
                         "label the query by itself; export it (`fmask export`), label it, and pass the answers with "
                         "--answers FILE")
    if paths.labeled_csv(out) == out:
        raise FmaskError(f"--out {out} must not end in .csv: the CSV is written beside the labeled-set JSON; give a "
                         ".json path")
    source = "human" if answers is not None or project is not None else "oracle"
    check_one_source(previous, source, allow_mixed_sources)
    step = {"query": sha256_file(query), "labeled": previous.hash,
            "answers": sha256_file(answers) if answers is not None and Path(answers).is_file() else None}
    pulled = None
    if project is not None and url is not None:  # read-only; before the lock, as the server may be slow
        pulled = label_studio.pull_answers(url=url, title=project, classes=pool.classes, query_sha256=step["query"],
                                           allowed_ids=set(selected), query_name=str(query))
        step["answers"] = sha256_json(pulled.fingerprint())  # new annotations make the step stale
    def reuse() -> dict:
        current = read_json(out, what="labeled set", made_by="fmask label")
        if not paths.labeled_csv(out).is_file():  # a run killed between the two files gets its CSV now
            write_labeled(out, current, pool)
        return current

    with step_output(out, command="label", step=step, force=force, beside=(paths.labeled_csv(out),),
                     on_current=reuse) as output:
        if output.current:
            return LabelResult(out, True, 0, [], output.recorded, source, pulled)
        if answers is not None or pulled is not None:
            sample_paths = dict(zip(pool.ids, pool.paths(pool.ids))) if pool.has_paths else None
            given = pulled.answers if pulled is not None else read_answers(Path(answers), pool.classes,
                                                                           set(selected), sample_paths)
            ids = [i for i in selected if i in given]
            labels = [given[i] for i in ids]
            unanswered = [i for i in selected if i not in given]
        else:
            ids, labels, unanswered = list(selected), pool.labels(selected).tolist(), []
        data = extend_labeled(previous, ids, labels, round_=int(query_data["round"]), source=source,
                              strategy=query_data["strategy"], query_hash=step["query"])
        if pulled is not None:  # where each label was given: the Label Studio project and task ids
            data[LABEL_STUDIO_TASKS_KEY] = {**previous.data.get(LABEL_STUDIO_TASKS_KEY, {}), **{
                str(i): {"url": pulled.url, "project": pulled.project, "project_id": pulled.project_id,
                         "task_ids": pulled.task_ids.get(i, [])} for i in ids}}
        data = output.sealed(data)
        write_labeled(out, data, pool)
    return LabelResult(out, False, len(ids), unanswered, data, source, pulled)
