from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.options import Force, Workers
from fmask.cli.ui import done, progress_callback
from fmask.pool.pool import build_pool, parse_class_counts


@app.command("build-pool")
def build_pool_command(
    out: Path = typer.Option(..., help="Pool directory to write."),
    images: Optional[Path] = typer.Option(None, help="Your own images: a folder (searched recursively) or a CSV with "
                                          "a path column (and optionally label). Replaces --dataset."),
    labels: Optional[Path] = typer.Option(None, help="With --images: a CSV with path,label columns, the labeled set "
                                          "to start from (label = class name or index)."),
    classes: Optional[str] = typer.Option(None, help="With --images: the classes, a,b,c or a file with one name a "
                                          "line (default: the names the labels use, sorted)."),
    test: Optional[Path] = typer.Option(None, help="With --images: a test set, a folder of <class>/ subfolders or "
                                        "a CSV with path,label columns."),
    image_size: Optional[int] = typer.Option(None, help="With --images: bring every image to S x S pixels (needed "
                                             "unless all images have one size)."),
    resize: Optional[str] = typer.Option(None, help="With --image-size: crop (default: shorter side to S, centre "
                                         "crop) | pad (longer side to S, black borders) | stretch."),
    channels: int = typer.Option(3, help="With --images: 3 (RGB) or 1 (grayscale)."),
    workers: Workers = None,
    strict: bool = typer.Option(False, help="With --images: refuse a bad file instead of skipping and listing it."),
    dataset: Optional[str] = typer.Option(None, help="A benchmark: digits (default) | cifar10 | fashionmnist | "
                                          "mnist | folder:PATH"),
    root: Path = typer.Option(Path("data"), help="Where torchvision datasets live (or are downloaded to)."),
    setting: Optional[str] = typer.Option(None, help="balanced | setting1 | setting2 (the paper's imbalance settings)."),
    class_counts: Optional[str] = typer.Option(None, help="Samples per class, e.g. 250,5000,250,250 (overrides --setting)."),
    initial: Optional[int] = typer.Option(None, help="Random labeled samples in round 0 (default 100; benchmarks)."),
    seed: int = typer.Option(0, help="Seed for the pool and initial draws."),
    test_per_class: Optional[int] = typer.Option(None, help="Subsample the test split per class (default: all)."),
    download: bool = typer.Option(False, help="Download torchvision datasets into --root."),
    force: Force = False,
) -> None:
    """Build a pool: your own images (--images), or a class-imbalanced pool from a benchmark dataset, with its
    images decoded once into a memory-mapped cache and the round-0 labeled set."""
    with progress_callback() as progress:
        result = build_pool(dataset=dataset, images=images, out=out, root=root, setting=setting,
                            class_counts=parse_class_counts(class_counts) if class_counts else None, initial=initial,
                            seed=seed, test_per_class=test_per_class, download=download, labels=labels,
                            classes=classes, test=test, image_size=image_size, resize=resize, channels=channels,
                            workers=workers, strict=strict, force=force, progress=progress)
    verb = "unchanged, skipped" if result.skipped else "written"
    if images is not None:
        test_text = f"{result.n_test} test" if result.n_test else "no test set"
        done(f"pool {result.pool_dir} {verb}: {result.n_pool} images, {result.n_initial} labeled "
             f"(per class {result.class_counts}), {test_text}")
    else:
        done(f"pool {result.pool_dir} {verb}: {result.n_pool} pool samples (per class {result.class_counts}), "
             f"{result.n_test} test, {result.n_initial} labeled")
    for note in result.notes:
        done(note)
