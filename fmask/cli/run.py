from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.options import Deterministic
from fmask.core.numerics import deterministic_algorithms
from fmask.cli.ui import done, progress_callback
from fmask.run.experiment import PRESETS, config_from_options, run_experiment


def _list(text: Optional[str], kind=str):
    return [kind(part.strip()) for part in text.split(",") if part.strip()] if text else None


@app.command("run")
def run_command(
    out: Path = typer.Option(..., help="Results directory (rerun the same command to resume)."),
    preset: Optional[str] = typer.Option(None, help=f"The paper's settings: {', '.join(PRESETS)}."),
    small: bool = typer.Option(False, help="With --preset: small CNN, fewer rounds, CPU-sized."),
    config: Optional[Path] = typer.Option(None, help="TOML file of experiment settings (flags override it)."),
    dataset: Optional[str] = typer.Option(None, help="digits | cifar10 | fashionmnist | mnist | folder:PATH"),
    root: Optional[str] = typer.Option(None, help="Root of torchvision datasets."),
    download: Optional[bool] = typer.Option(None, help="Download torchvision datasets into --root."),
    setting: Optional[str] = typer.Option(None, help="balanced | setting1 | setting2"),
    class_counts: Optional[str] = typer.Option(None, help="Samples per class, e.g. 250,5000,250,250."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated strategies."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
    initial: Optional[int] = typer.Option(None, help="Round-0 labeled samples."),
    batch: Optional[int] = typer.Option(None, help="Samples per query."),
    rounds: Optional[int] = typer.Option(None, help="Query rounds."),
    model: Optional[str] = typer.Option(None, help="resnet18 | cnn | torchvision:NAME"),
    epochs: Optional[int] = typer.Option(None, help="Epoch cap per training."),
    sparsity: Optional[float] = typer.Option(None, help="Fisher mask sparsity (fishermask)."),
    embedding_rows: Optional[str] = typer.Option(None, help="fishermask's embedding rows: scaled | unscaled."),
    m0: Optional[str] = typer.Option(None, help="fishermask's greedy start: identity (lamb I) | fisher (lamb F)."),
    test_per_class: Optional[int] = typer.Option(None, help="Subsample the test split per class."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    deterministic: Deterministic = False,
) -> None:
    """Run (or resume) strategies × seeds × rounds of the staged steps under one results directory."""
    overrides = dict(dataset=dataset, root=root, download=download, setting=setting,
                     class_counts=_list(class_counts, int), strategies=_list(strategies), seeds=_list(seeds, int),
                     initial=initial, batch=batch, rounds=rounds, model=model, epochs=epochs, sparsity=sparsity,
                     embedding_rows=embedding_rows, m0=m0,
                     test_per_class=test_per_class, device=device)
    experiment = config_from_options(preset=preset, small=small, config_file=config, overrides=overrides)
    with deterministic_algorithms(deterministic), progress_callback() as progress:
        run_experiment(out=out, config=experiment, progress=progress,
                       on_step=lambda what, done_, total: progress(f"run: {what}", done_, total))
    done(f"results in {out}: {len(experiment.strategies)} strategies × {len(experiment.seeds)} seeds × "
         f"{experiment.rounds} rounds; `fmask plot {out}` draws them")
