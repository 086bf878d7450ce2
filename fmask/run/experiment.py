"""``fmask run``: a grid of strategies × seeds × rounds over the staged steps, under one results directory.

Every step writes atomically and skips itself when its output already exists with the same inputs, so a run
killed at any moment (Ctrl-C, SIGKILL, power loss) resumes where it stopped when the same command is given
again, and ends with the same results as an uninterrupted run (training and queries are seeded).

Layout (named by fmask.core.paths, which ``fmask plot`` reads back):
    OUT/experiment.json                 the configuration
    OUT/timings.csv                     seconds per executed step
    OUT/seed{S}/pool/                   the pool and its round-0 labeled set
    OUT/seed{S}/round0.pt               round-0 model, shared by every strategy of the seed
    OUT/seed{S}/round0-mc-dropout.pt    the same with --mc-dropout 0.3, shared by bald and batchbald
    OUT/seed{S}/{strategy}/round{R}.pt, query{R}.json, labeled{R}.json, fisher{R}.safetensors, metrics.csv
"""

from __future__ import annotations

import csv
import os
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.core.atomic import atomic_path, atomic_write_json
from fmask.core.locking import output_lock
from fmask.core.readers import read_json
from fmask.core.labeled import load_labeled
from fmask.pool.pool import load_pool
from fmask.train.checkpoint import load_checkpoint
from fmask.train.metrics import record_metrics
from fmask.label.step import run_label
from fmask.pool.pool import SETTINGS, build_pool
from fmask.query.registry import get_strategy
from fmask.query.step import run_query
from fmask.train.trainer import TrainConfig, train
from fmask.core.progress import ProgressFn


# The dropout rate before the head for the chains of strategies that need MC dropout (bald, batchbald), round 0
# included; the other chains train without dropout, as in the paper.
MC_DROPOUT = 0.3


@dataclass
class ExperimentConfig:
    dataset: str = "digits"
    root: str = "data"
    download: bool = False
    setting: str = "balanced"
    class_counts: Optional[list[int]] = None
    initial: int = 20
    batch: int = 20
    rounds: int = 5
    strategies: list[str] = field(default_factory=lambda: ["random", "entropy"])
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str = "cnn"
    epochs: int = 40
    train_batch_size: int = 64
    target_train_accuracy: float = 0.99
    sparsity: float = 0.002
    embedding_rows: str = "scaled"  # fishermask: scaled (paper's text) | unscaled (authors' code)
    m0: str = "identity"  # fishermask: identity (lamb I, authors' code) | fisher (lamb F, paper's eq. 2)
    test_per_class: Optional[int] = None
    device: str = "auto"
    query_options: dict[str, Any] = field(default_factory=dict)


# The paper's settings (Gul et al. 2024, section V): pools and budgets as the paper describes them.
PRESETS: dict[str, dict[str, Any]] = {
    # Setting 1: classes 0-3 with 250/5000/250/250 (pool 5,750); low-data regime, budget 575 (10% of the pool).
    "setting1-low": dict(setting="setting1", initial=115, batch=115, rounds=4, model="resnet18", epochs=200),
    # Setting 1, high-data regime: start 250, +250 per round until the 5,750 are used.
    "setting1-high": dict(setting="setting1", initial=250, batch=250, rounds=22, model="resnet18", epochs=200),
    # Setting 2: 250 of each of nine classes, 5,000 of the tenth; batch 500 until a budget of 6,500.
    "setting2": dict(setting="setting2", initial=500, batch=500, rounds=12, model="resnet18", epochs=200),
}
# --small: the same pools with a small CNN, fewer rounds and a subsampled test split, for CPU runs. The paper's
# 0.2% would keep fewer entries than the small CNN's classifier layer holds (k ~ 106 against 516-1,290): 5% keeps
# k ~ 2,650, at least twice the head on every preset (fmask fisher refuses less).
SMALL = dict(model="cnn", epochs=30, test_per_class=300, sparsity=0.05)
SMALL_ROUNDS = {"setting1-low": 4, "setting1-high": 4, "setting2": 4}
# The demo: nine small classes and one large, the shape of Setting 2, scaled to the 1,348 train digits.
DEMO = dict(dataset="digits", class_counts=[25] * 9 + [130], initial=20, batch=20, rounds=5, model="cnn",
            epochs=40, train_batch_size=16, sparsity=0.05, device="cpu")


def preset_config(name: str, *, small: bool = False, **overrides: Any) -> ExperimentConfig:
    if name not in PRESETS:
        raise FmaskError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    if small:
        values.update(SMALL, rounds=SMALL_ROUNDS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig(**values)


def load_config_file(path: Path) -> dict[str, Any]:
    """A TOML file whose keys are ExperimentConfig fields (and optionally ``preset`` and ``small``)."""
    if not path.is_file():
        raise FmaskError(f"config file {path} does not exist; give a TOML file with experiment settings")
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FmaskError(f"config file {path} is not valid TOML ({exc})") from exc
    known = {f.name for f in fields(ExperimentConfig)} | {"preset", "small"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FmaskError(f"config file {path} has unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return values


def validate(config: ExperimentConfig) -> None:
    for name in config.strategies:
        get_strategy(name)  # unknown names are refused before any work
    if not config.strategies or not config.seeds:
        raise FmaskError("give at least one strategy and one seed")
    if config.rounds < 0 or config.batch <= 0 or config.initial <= 0:
        raise FmaskError("--rounds must be >= 0, --batch and --initial positive")
    from fmask.fisher.grads import check_embedding_rows
    from fmask.fisher.step import check_m0

    check_embedding_rows(config.embedding_rows)
    check_m0(config.m0)
    if config.class_counts is None and config.setting not in SETTINGS:
        raise FmaskError(f"unknown setting {config.setting!r}; choose one of: {', '.join(SETTINGS)}")


def check_mask_sparsity(config: ExperimentConfig, pool) -> None:
    """Refuse, as `fmask fisher` would at round 1, a sparsity whose mask the model's head would fill."""
    from fmask.fisher.mask import check_sparsity_works, is_head_parameter, mask_size
    from fmask.train.models import build_model

    model = build_model(config.model, in_channels=pool.image_shape[0], num_classes=pool.num_classes)
    num_parameters = sum(p.numel() for p in model.parameters())
    head_size = sum(p.numel() for name, p in model.named_parameters() if is_head_parameter(name))
    check_sparsity_works(sparsity=config.sparsity, k=mask_size(config.sparsity, num_parameters),
                         head_size=head_size, num_parameters=num_parameters, head_only_trainable=False)


def adopt_checkpoint(source: Path, target: Path) -> None:
    """Reuse the seed's round-0 checkpoint in a strategy's directory (copied, its metrics row recorded)."""
    if not (target.is_file() and target.read_bytes() == source.read_bytes()):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    checkpoint = load_checkpoint(target)
    labeled_set = load_labeled(checkpoint.labeled_path, load_pool(checkpoint.pool_dir))
    record_metrics(target, labeled_set=labeled_set, metrics=checkpoint.metrics,
                   train_seed=checkpoint.state["config"]["seed"])


@dataclass
class StepTimer:
    """Appends one row per executed step to OUT/timings.csv (skipped steps add nothing)."""

    path: Path

    def record(self, *, step: str, strategy: str, seed: int, round_: int, seconds: float) -> None:
        new = not self.path.exists()
        # Appending a short line is atomic enough: a torn last line is dropped by the reader.
        try:
            with open(self.path, "a", newline="") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["step", "strategy", "seed", "round", "seconds"])
                writer.writerow([step, strategy, seed, round_, f"{seconds:.4f}"])
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise FmaskError(f"could not write {self.path}: {exc.strerror or exc}; free space or choose another "
                             "--out") from exc


def remove_stale_temp_files(out: Path) -> int:
    """Temp files a killed step left behind (their names start with '.' and end with '.tmp')."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)




def run_experiment(*, out: str | os.PathLike, config: ExperimentConfig, progress: Optional[ProgressFn] = None,
                   on_step: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Run (or resume) the whole grid; returns the results directory."""
    out = Path(out)
    validate(config)
    if out.exists() and not out.is_dir():
        raise FmaskError(f"--out {out} is a file; give a directory for the results")
    # The whole tree is this run's: another command writing anywhere below it is refused, and the reverse.
    with output_lock(out, "run", tree=True):
        return _run_locked(out, config, progress, on_step)


def _run_locked(out: Path, config: ExperimentConfig, progress: Optional[ProgressFn],
                on_step: Optional[Callable[[str, int, int], None]]) -> Path:
    """run_experiment's work, done while holding the lock of the results tree."""
    recorded = out / paths.EXPERIMENT_JSON
    if recorded.is_file():
        previous = read_json(recorded, what="experiment config", made_by="fmask run")
        if previous.get("config") != asdict(config):
            raise FmaskError(f"{out} holds a run with another configuration; use another --out, or the same options "
                             "to resume it")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    atomic_write_json(recorded, {"kind": "experiment", "config": asdict(config)})
    timer = StepTimer(out / paths.TIMINGS_CSV)
    total = len(config.seeds) * len(config.strategies) * config.rounds
    done = 0

    def timed(step: str, strategy: str, seed: int, round_: int, action: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = action()
        if not getattr(result, "skipped", False):
            timer.record(step=step, strategy=strategy, seed=seed, round_=round_,
                         seconds=time.perf_counter() - started)
        return result

    for seed in config.seeds:
        pool_dir = paths.run_pool(out, seed)
        timed("build-pool", "-", seed, 0, lambda: build_pool(
            dataset=config.dataset, out=pool_dir, root=config.root, setting=config.setting,
            class_counts=config.class_counts, initial=config.initial, seed=seed,
            test_per_class=config.test_per_class, download=config.download))
        if any(get_strategy(name).needs_mask for name in config.strategies):
            check_mask_sparsity(config, load_pool(pool_dir))  # before any training, not at the first query
        train_config = TrainConfig(model=config.model, max_epochs=config.epochs, batch_size=config.train_batch_size,
                                   target_train_accuracy=config.target_train_accuracy, seed=seed)
        round0s = {0.0: paths.run_round0(out, seed)}
        if any(get_strategy(name).needs_mc_dropout for name in config.strategies):
            round0s[MC_DROPOUT] = paths.run_round0(out, seed, mc_dropout=True)
        for dropout, round0 in round0s.items():
            timed("train", "-", seed, 0, lambda: train(pool_dir=pool_dir, labeled=paths.pool_labeled(pool_dir),
                                                       out=round0, config=replace(train_config, mc_dropout=dropout),
                                                       device=config.device, progress=progress))
        for strategy in config.strategies:
            chain = paths.run_chain(out, seed, strategy)
            chain.mkdir(parents=True, exist_ok=True)
            chosen = get_strategy(strategy)
            dropout = MC_DROPOUT if chosen.needs_mc_dropout else 0.0
            chain_config = replace(train_config, mc_dropout=dropout)
            adopt_checkpoint(round0s[dropout], paths.chain_checkpoint(chain, 0))
            needs_mask = chosen.needs_mask
            # The variant the mask records (fmask query follows it); named variants pin theirs.
            variant = {"embedding_rows": config.embedding_rows, "m0": config.m0, **getattr(chosen, "pinned", {})}
            for round_ in range(config.rounds):
                if on_step:
                    on_step(f"seed {seed} · {strategy} · round {round_ + 1}/{config.rounds}", done, total)
                checkpoint = paths.chain_checkpoint(chain, round_)
                mask = None
                if needs_mask:
                    from fmask.fisher import run_fisher

                    mask = paths.chain_mask(chain, round_)
                    timed("fisher", strategy, seed, round_ + 1, lambda: run_fisher(
                        ckpt=checkpoint, out=mask, sparsity=config.sparsity, device=config.device, progress=progress,
                        **variant))
                query = paths.chain_query(chain, round_)
                timed("query", strategy, seed, round_ + 1, lambda: run_query(
                    ckpt=checkpoint, out=query, strategy=strategy, batch=config.batch, mask=mask, seed=seed,
                    device=config.device, options=config.query_options, progress=progress))
                labeled = paths.chain_labeled(chain, round_ + 1)
                timed("label", strategy, seed, round_ + 1, lambda: run_label(query=query, out=labeled))
                timed("train", strategy, seed, round_ + 1, lambda: train(
                    pool_dir=pool_dir, labeled=labeled, out=paths.chain_checkpoint(chain, round_ + 1),
                    config=chain_config, device=config.device, progress=progress))
                done += 1
    if on_step:
        on_step("done", done, total)
    return out


def config_from_options(*, preset: Optional[str], small: bool, config_file: Optional[Path],
                        overrides: dict[str, Any]) -> ExperimentConfig:
    """Preset, then config file, then command-line flags (later ones win)."""
    file_values = load_config_file(config_file) if config_file else {}
    preset = file_values.pop("preset", preset)
    small = bool(file_values.pop("small", small))
    flags = {k: v for k, v in overrides.items() if v is not None}
    if preset:
        return preset_config(preset, small=small, **{**file_values, **flags})
    return ExperimentConfig(**{**file_values, **flags})

