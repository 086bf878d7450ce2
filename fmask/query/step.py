"""``fmask query``: load the checkpoint, its pool and labeled set, run a registered strategy over the unlabeled
pool and write the selected-index JSON (sample ids in selection order, their paths for pools from your own files,
scores, timing, input hashes) and the same list as a CSV beside it. Strategies that use no model (random) run
without a checkpoint: the first batch of a pool with no labels."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fmask import __version__
from fmask.core import paths
from fmask.core.device import memory_budget, resolve_device
from fmask.core.errors import FmaskError
from fmask.core.labeled import LabeledPool, open_labeled_pool
from fmask.core.atomic import atomic_write_bytes, atomic_write_json
from fmask.core.hashing import FORMAT_VERSION, sha256_file
from fmask.core.readers import read_json
from fmask.core.records import check_record
from fmask.core.steps import step_output
from fmask.core.numerics import deterministic_enabled, exact_float32
from fmask.query.base import QueryContext, Selection, Strategy, read_option
from fmask.core.progress import ProgressFn
from fmask.query.registry import get_strategy, list_strategies
from fmask.train.checkpoint import open_round

QUERY = "fmask query"


@dataclass
class QueryResult:
    out: Path
    skipped: bool
    data: dict  # the query file's content

    @property
    def selection(self) -> Selection:
        """The selected sample ids, their scores and the strategy's recorded choices, typed."""
        return Selection(ids=list(self.data["selected"]), scores=list(self.data["scores"]),
                         details=dict(self.data.get("details") or {}))


def check_selection(selected: list[int], candidates: list[int], batch: int, strategy: str) -> None:
    """The selection contract, enforced for every strategy (a violation is a bug, not bad input)."""
    candidate_set = set(candidates)
    if len(selected) != batch or len(set(selected)) != batch or not all(i in candidate_set for i in selected):
        raise RuntimeError(f"strategy {strategy!r} broke the selection contract: {len(selected)} ids for batch {batch}")


def strategy_for_batch(strategy: str, batch: int, *, batch_name: str = "--batch") -> Strategy:
    """The registered ``strategy``, once ``batch`` (given as ``batch_name``) is known to be positive."""
    chosen = get_strategy(strategy)
    if batch <= 0:
        raise FmaskError(f"{batch_name} {batch} must be positive")
    return chosen


def check_batch_fits(batch: int, candidates: list[int], *, batch_name: str = "--batch") -> None:
    if batch > len(candidates):
        raise FmaskError(f"{batch_name} {batch} is larger than the unlabeled pool ({len(candidates)} samples); "
                         f"lower {batch_name}")


@exact_float32()  # scores rank candidates by small differences: no TF32 (see fmask.core.numerics)
def run_strategy(chosen: Strategy, context: QueryContext, batch: int, *, model_name: str) -> tuple[Selection, float]:
    """``chosen.select`` on ``context`` within the memory budget (option memory_limit), held to the selection
    contract and refused when it scores NaN (``model_name`` names the model in that message); returns the
    selection and the seconds it took. ``fmask query`` and :func:`fmask.select` both select through here."""
    started = time.perf_counter()
    with memory_budget(read_option(context.options, "memory_limit", int, None)):  # --memory-limit: every plan uses it
        selection = chosen.select(context, batch)
    seconds = time.perf_counter() - started
    check_selection(selection.ids, context.unlabeled_ids, batch, chosen.name)
    if any(math.isnan(float(score)) for score in selection.scores):
        # NaN ranks nothing: the ids would be arbitrary, so no query is written (±inf is a valid score).
        raise FmaskError(f"strategy {chosen.name!r} scored candidates NaN ({model_name} gives non-finite outputs "
                         "on this pool); nothing was written; retrain it with `fmask train`")
    return selection, seconds


def query_csv_text(data: dict) -> str:
    """The selection as a CSV: rank, sample_id, path, score (what people who just want the list open)."""
    from fmask.pool.files import csv_text

    rows = ((rank, sample_id, path or "", score) for rank, (sample_id, path, score) in
            enumerate(zip(data["selected"], data.get("selected_paths") or [None] * len(data["selected"]),
                          data["scores"]), start=1))
    return csv_text(("rank", "sample_id", "path", "score"), rows)


@dataclass
class ModelFree(LabeledPool):
    """A query that uses no model at all (random without --ckpt or a backbone): the first batch of a pool with no
    labels."""

    checkpoint: None = None
    backbone: None = None

    def strategy_view(self, device: Any, progress: Optional[ProgressFn] = None) -> tuple[None, Any]:
        return None, self.pool


def open_model_free(*, pool_dir: Optional[str | os.PathLike], labeled: Optional[str | os.PathLike]) -> ModelFree:
    if pool_dir is None:
        raise FmaskError("without --ckpt, give --pool (the pool to pick from)")
    from fmask.pool.pool import load_pool

    labeled_path = labeled if labeled is not None else paths.pool_labeled(pool_dir)
    return open_labeled_pool(load_pool(pool_dir), pool_dir, labeled_path, kind=ModelFree)


@exact_float32()  # scores rank candidates by small differences: no TF32 (see fmask.core.numerics)
def run_query(*, ckpt: Optional[str | os.PathLike], out: str | os.PathLike, strategy: str, batch: int,
              pool_dir: Optional[str | os.PathLike] = None, labeled: Optional[str | os.PathLike] = None,
              mask: Optional[str | os.PathLike] = None, seed: int = 0, device: str = "auto",
              options: Optional[dict[str, Any]] = None, batch_size: int = 256, force: bool = False,
              progress: Optional[ProgressFn] = None, model: Optional[str] = None,
              weights: Optional[str | os.PathLike] = None, input_size: Optional[int] = None,
              mean: Optional[list[float]] = None, std: Optional[list[float]] = None) -> QueryResult:
    """Select ``batch`` ids with ``strategy`` and write the query JSON ``out`` and the same list as CSV beside it.

    Without ``ckpt``: strategies that use no model (random) need only ``pool_dir``; a cold start gives
    ``pool_dir``, ``model`` and pretrained ``weights`` (with optional ``input_size``/``mean``/``std``): the backbone
    whose cached features the feature-only strategies use. With a ``--finetune head`` checkpoint, ``weights``
    replaces the backbone file it records."""
    # Unset options (None) mean "the strategy's default" and are not recorded.
    out, options = Path(out), {k: v for k, v in (options or {}).items() if v is not None}
    chosen = strategy_for_batch(strategy, batch)
    if paths.query_csv(out) == out:
        raise FmaskError(f"--out {out} must not end in .csv: the CSV list is written beside the JSON; give a .json path")
    if ckpt is None:
        if not chosen.cold_start:
            raise FmaskError(f"strategy {strategy!r} needs a trained model's predictions; pass --ckpt (without one "
                             f"only {', '.join(s for s in list_strategies() if get_strategy(s).cold_start)} run)")
        if not chosen.needs_model and model is None and weights is None:
            opened = open_model_free(pool_dir=pool_dir, labeled=labeled)
        else:
            from fmask.train.features import open_cold_start

            opened = open_cold_start(pool_dir=pool_dir, labeled=labeled, model=model, weights=weights,
                                     input_size=input_size, mean=mean, std=std)
    else:
        if model is not None or input_size is not None or mean is not None or std is not None:
            raise FmaskError("--model, --input-size, --mean and --std describe a cold start's backbone; a --ckpt "
                             "records its own, drop them")
        opened = open_round(ckpt, pool_dir=pool_dir, labeled=labeled, weights=weights)
    checkpoint, pool, pool_dir = opened.checkpoint, opened.pool, opened.pool_dir
    labeled_path, labeled_set, candidates = opened.labeled_path, opened.labeled_set, opened.unlabeled_ids
    check_batch_fits(batch, candidates)
    mask_file, mask_hash = None, None
    if mask is not None and checkpoint is None:
        raise FmaskError("--mask comes from `fmask fisher` on a checkpoint; a cold start without --ckpt takes none")
    if mask is not None:
        from fmask.fisher import load_mask

        mask_file = load_mask(mask, checkpoint_hash=checkpoint.hash)
        mask_hash = sha256_file(mask)
    if chosen.needs_mask and mask_file is None:
        raise FmaskError(f"strategy {strategy!r} needs --mask (run `fmask fisher --ckpt {ckpt} --out MASK` first)")
    inputs = {"checkpoint": checkpoint.hash if checkpoint is not None else None, "pool": pool.hash,
              "labeled": labeled_set.hash, "mask": mask_hash}
    if checkpoint is None and opened.backbone is not None:  # a cold start: the backbone's weights and
        # preprocessing made the features
        inputs.update(weights=opened.backbone.weights.sha256, model=opened.backbone.model,
                      preprocessing=opened.backbone.preprocessing)
    step = {"inputs": inputs, "strategy": strategy, "batch": batch, "seed": seed, "options": options}
    if deterministic_enabled():
        step["deterministic"] = True
    def reuse() -> dict:
        current = read_json(out, what="query", made_by=QUERY)
        if not paths.query_csv(out).is_file():  # a run killed between the two files gets its CSV now
            atomic_write_bytes(paths.query_csv(out), query_csv_text(current).encode())
        return current

    # Under torchrun every rank runs the strategy (the Fisher-greedy ones shard their work); rank 0 alone locks,
    # decides whether the output is current and writes it.
    with step_output(out, command="query", step=step, force=force, beside=(paths.query_csv(out),),
                     on_current=reuse) as output:
        if output.current:
            return QueryResult(out, True, output.recorded)

        torch_device = resolve_device(device)
        # A head checkpoint or a cold start: the head alone on the pool's cached backbone features (no model at
        # all for a model-free query).
        strategy_model, strategy_pool = opened.strategy_view(torch_device, progress)
        context = QueryContext(model=strategy_model.to(torch_device) if strategy_model is not None else None,
                               pool=strategy_pool,
                               labeled_ids=list(labeled_set.ids), unlabeled_ids=candidates, device=torch_device,
                               seed=seed, mask=mask_file, options=options, batch_size=batch_size, progress=progress)
        selection, seconds = run_strategy(chosen, context, batch, model_name=f"checkpoint {ckpt}")
        selected = [int(i) for i in selection.ids]
        data = output.sealed({
            "format": FORMAT_VERSION, "kind": "query", "fmask_version": __version__, "strategy": strategy,
            "batch": batch, "seed": seed, "round": labeled_set.round + 1, "selected": selected,
            "selected_paths": pool.paths(selected) if pool.has_paths else None,
            "scores": [float(s) for s in selection.scores], "seconds": seconds, "options": options,
            "details": selection.details,
            "inputs": inputs, "checkpoint_path": str(Path(ckpt).resolve()) if ckpt is not None else None,
            "pool_dir": str(pool_dir.resolve()), "labeled_path": str(labeled_path.resolve()),
        })
        if output.writes:
            atomic_write_bytes(paths.query_csv(out), query_csv_text(data).encode())
            atomic_write_json(out, data)  # last: a current query means its CSV is complete too
    return QueryResult(out, False, data)


def load_query(path: str | os.PathLike) -> dict:
    data = read_json(path, what="query", made_by=QUERY)
    check_record(data, kind="query", keys=("selected", "strategy", "round", "inputs", "pool_dir", "labeled_path"),
                 newer=f"query {path}", not_ours=f"{path} is not an fmask query file; pass the JSON `{QUERY}` wrote")
    selected = data["selected"]
    if not isinstance(selected, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in selected):
        raise FmaskError(f"query {path}: 'selected' must be a list of sample ids; rerun `{QUERY}`")
    if len(set(selected)) != len(selected):
        raise FmaskError(f"query {path} selects a sample id twice; rerun `{QUERY}`")
    return data
