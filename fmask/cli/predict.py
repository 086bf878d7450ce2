from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.options import Checkpoint, Device, Workers
from fmask.cli.ui import done, progress_callback
from fmask.predict.predict import run_predict


@app.command("predict")
def predict_command(
    ckpt: Checkpoint = ...,
    out: Path = typer.Option(..., help="CSV to write: path, predicted class, probability (and sample_id for a pool)."),
    pool: Optional[Path] = typer.Option(None, help="Predict every sample of this pool (default: the checkpoint's)."),
    images: Optional[Path] = typer.Option(None, help="Predict the image files in this folder (or listed in this CSV), "
                                          "decoded the way the checkpoint's pool was."),
    workers: Workers = None,
    device: Device = "auto",
) -> None:
    """The model's class and probability for every image: the rest of the pool labeled by the model."""
    with progress_callback() as progress:
        result = run_predict(ckpt=ckpt, out=out, pool_dir=pool, images=images, workers=workers, device=device,
                             progress=progress)
    done(f"predictions {result.out} written: {result.rows} images")
    if result.skipped:
        done(f"skipped {result.skipped} files that could not be read; see {result.skipped_csv}")
