"""``fmask demo``: an imbalanced AL comparison of every available strategy over several seeds on scikit-learn's
bundled digits, on CPU in a few minutes, ending with the learning-curve plot and the summary table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from fmask import paths
from fmask.plot.plot import PlotResult, run_plot
from fmask.pool.pool import build_pool
from fmask.query.registry import list_strategies
from fmask.run.chain import ChainConfig, run_chain
from fmask.train.trainer import TrainConfig, train

# Nine small classes and one large one: the shape of the paper's Setting 2, scaled to the 1,348 train digits.
DEMO_CLASS_COUNTS = [25] * 9 + [130]


@dataclass
class DemoConfig:
    seeds: Sequence[int] = (0, 1, 2)
    rounds: int = 5
    batch: int = 20
    initial: int = 20
    strategies: Optional[Sequence[str]] = None  # None: every registered strategy
    model: str = "cnn"
    epochs: int = 40
    device: str = "cpu"


def run_demo(*, out: Path, config: DemoConfig, progress: Optional[Callable[[str, int, int], None]] = None,
             on_chain: Optional[Callable[[str, int, int], None]] = None) -> PlotResult:
    strategies = list(config.strategies or list_strategies())
    train_config = TrainConfig(model=config.model, batch_size=16, max_epochs=config.epochs, seed=0)
    total, finished = len(config.seeds) * len(strategies), 0
    for seed in config.seeds:
        seed_dir = out / f"seed{seed}"
        pool_dir = seed_dir / "pool"
        build_pool(dataset="digits", out=pool_dir, class_counts=DEMO_CLASS_COUNTS, initial=config.initial, seed=seed)
        seeded = TrainConfig(**{**train_config.__dict__, "seed": seed})
        round0 = seed_dir / "round0.pt"
        train(pool_dir=pool_dir, labeled=paths.pool_labeled(pool_dir), out=round0, config=seeded,
              device=config.device, progress=progress)
        for strategy in strategies:
            if on_chain:
                on_chain(f"seed {seed}, {strategy}", finished, total)
            chain = ChainConfig(strategy=strategy, rounds=config.rounds, batch=config.batch, train=seeded,
                                device=config.device, sparsity=0.01)
            run_chain(pool_dir=pool_dir, chain_dir=seed_dir / strategy, config=chain, round0=round0, seed=seed,
                      progress=progress)
            finished += 1
    if on_chain:
        on_chain("done", finished, total)
    return run_plot(results_dir=out)
