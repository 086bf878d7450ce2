from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.ui import done
from fmask.pool.pool import build_pool, parse_class_counts


@app.command("build-pool")
def build_pool_command(
    dataset: str = typer.Option("digits", help="digits | cifar10 | fashionmnist | mnist | folder:PATH"),
    out: Path = typer.Option(..., help="Pool directory to write."),
    root: Path = typer.Option(Path("data"), help="Where torchvision datasets live (or are downloaded to)."),
    setting: str = typer.Option("balanced", help="balanced | setting1 | setting2 (the paper's imbalance settings)."),
    class_counts: Optional[str] = typer.Option(None, help="Samples per class, e.g. 250,5000,250,250 (overrides --setting)."),
    initial: int = typer.Option(100, help="Random labeled samples in round 0."),
    seed: int = typer.Option(0, help="Seed for the pool and initial draws."),
    test_per_class: Optional[int] = typer.Option(None, help="Subsample the test split per class (default: all)."),
    download: bool = typer.Option(False, help="Download torchvision datasets into --root."),
    force: bool = typer.Option(False, help="Rebuild even if the pool exists with the same inputs."),
) -> None:
    """Pick a (class-imbalanced) pool, cache its images and draw the round-0 labeled set."""
    result = build_pool(dataset=dataset, out=out, root=root, setting=setting,
                        class_counts=parse_class_counts(class_counts) if class_counts else None, initial=initial,
                        seed=seed, test_per_class=test_per_class, download=download, force=force)
    verb = "unchanged, skipped" if result.skipped else "written"
    done(f"pool {result.pool_dir} {verb}: {result.n_pool} pool samples (per class {result.class_counts}), "
         f"{result.n_test} test, {result.n_initial} labeled")
