"""``fmask demo``: an imbalanced AL comparison of every available strategy over several seeds on scikit-learn's
bundled digits, on CPU in a few minutes, ending with the learning-curve plot and the summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from fmask.plot.plot import PlotResult, run_plot
from fmask.query.registry import list_strategies
from fmask.run.experiment import DEMO, ExperimentConfig, run_experiment


def demo_config(*, seeds: int = 3, rounds: int = 5, batch: int = 20, strategies: Optional[Sequence[str]] = None,
                device: str = "cpu") -> ExperimentConfig:
    values = {**DEMO, "rounds": rounds, "batch": batch, "device": device}
    return ExperimentConfig(**values, seeds=list(range(seeds)), strategies=list(strategies or list_strategies()))


def run_demo(*, out: Path, config: ExperimentConfig, progress: Optional[Callable[[str, int, int], None]] = None,
             on_step: Optional[Callable[[str, int, int], None]] = None) -> PlotResult:
    run_experiment(out=out, config=config, progress=progress, on_step=on_step)
    return run_plot(results_dir=out)
