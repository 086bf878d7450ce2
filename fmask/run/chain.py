"""One active-learning chain (a strategy, a seed) as a sequence of the staged steps, each skipped when its
output already exists with the same inputs, so an interrupted chain resumes where it stopped."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fmask import paths
from fmask.io import atomic_path
from fmask.label.labeled import load_labeled
from fmask.label.step import run_label
from fmask.pool.pool import load_pool
from fmask.query.registry import get_strategy
from fmask.query.step import run_query
from fmask.train.checkpoint import load_checkpoint
from fmask.train.metrics import record_metrics
from fmask.train.trainer import TrainConfig, train


@dataclass
class ChainConfig:
    strategy: str
    rounds: int
    batch: int
    train: TrainConfig
    device: str = "auto"
    sparsity: float = 0.002  # for strategies that need a Fisher mask
    query_options: dict[str, Any] = field(default_factory=dict)


def adopt_checkpoint(source: Path, target: Path) -> None:
    """Reuse a shared round-0 checkpoint in a chain's directory (copied, and its metrics row recorded)."""
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    checkpoint = load_checkpoint(target)
    pool = load_pool(checkpoint.pool_dir)
    labeled_set = load_labeled(checkpoint.labeled_path, pool)
    record_metrics(target, labeled_set=labeled_set, metrics=checkpoint.metrics, train_seed=checkpoint.state["config"]["seed"])


def run_chain(*, pool_dir: Path, chain_dir: Path, config: ChainConfig, round0: Optional[Path] = None,
              seed: int = 0, progress: Optional[Callable[[str, int, int], None]] = None,
              on_step: Optional[Callable[[str], None]] = None) -> Path:
    """Run rounds 0..config.rounds of one chain in ``chain_dir``; returns the last checkpoint."""
    chain_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = chain_dir / "round0.pt"
    if round0 is not None:
        adopt_checkpoint(round0, checkpoint)
    else:
        train(pool_dir=pool_dir, labeled=paths.pool_labeled(pool_dir), out=checkpoint, config=config.train,
              device=config.device, progress=progress)
    needs_mask = get_strategy(config.strategy).needs_mask
    for round_ in range(config.rounds):
        mask = None
        if needs_mask:
            from fmask.fisher import run_fisher

            mask = chain_dir / f"fisher{round_}.safetensors"
            run_fisher(ckpt=checkpoint, out=mask, sparsity=config.sparsity, device=config.device, progress=progress)
        if on_step:
            on_step(f"round {round_ + 1}: query")
        query = chain_dir / f"query{round_}.json"
        run_query(ckpt=checkpoint, out=query, strategy=config.strategy, batch=config.batch, mask=mask, seed=seed,
                  device=config.device, options=config.query_options, progress=progress)
        labeled = chain_dir / f"labeled{round_ + 1}.json"
        run_label(query=query, out=labeled)
        if on_step:
            on_step(f"round {round_ + 1}: train")
        checkpoint = chain_dir / f"round{round_ + 1}.pt"
        train(pool_dir=pool_dir, labeled=labeled, out=checkpoint, config=config.train, device=config.device,
              progress=progress)
    return checkpoint
