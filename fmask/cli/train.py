from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from fmask import distributed
from fmask.cli import app
from fmask.numerics import deterministic_algorithms
from fmask.cli.ui import done, progress_callback
from fmask.train.trainer import TrainConfig, train


@app.command("train")
def train_command(
    pool: Path = typer.Option(..., help="Pool directory from `fmask build-pool`."),
    out: Path = typer.Option(..., help="Checkpoint (.pt) to write."),
    labeled: Optional[Path] = typer.Option(None, help="Labeled set JSON (default: the pool's round-0 set)."),
    model: str = typer.Option("resnet18", help="resnet18 | cnn | torchvision:NAME"),
    epochs: int = typer.Option(100, help="Epoch cap."),
    target_accuracy: float = typer.Option(0.99, help="Stop once an epoch reaches this training accuracy."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    grad_clamp: float = typer.Option(0.1, help="Clamp each gradient entry to ±value (0 disables)."),
    augment: bool = typer.Option(True, help="Random crop + flip (flip only where the dataset allows)."),
    seed: int = typer.Option(0, help="Seed for initialisation, batches and augmentation."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (autocast); auto: bf16 on GPUs that "
                                               "have it, fp32 on CPU."),
    channels_last: bool = typer.Option(True, help="Channels-last (NHWC) memory format for the model and batches."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model for the training steps."),
    stream: bool = typer.Option(False, "--stream", help="Stream batches from host memory instead of keeping the "
                                                        "images on the device (automatic when they do not fit)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic algorithms only (cuDNN "
                                       "included), so a GPU rerun gives identical results; slower."),
    force: bool = typer.Option(False, help="Retrain even if the checkpoint exists with the same inputs."),
) -> None:
    """Train from scratch on the labeled set, evaluate on the test split, write a checkpoint.

    Under `torchrun --nproc-per-node K -m fmask train ...` it trains with DistributedDataParallel."""
    distributed.init_from_env(device)
    config = TrainConfig(model=model, lr=lr, batch_size=batch_size, max_epochs=epochs,
                         target_train_accuracy=target_accuracy, grad_clamp=grad_clamp or None, augment=augment,
                         seed=seed, precision=precision, channels_last=channels_last, compile=compile_model,
                         stream=stream)
    with deterministic_algorithms(deterministic), \
            progress_callback() if distributed.is_main() else nullcontext(None) as progress:
        result = train(pool_dir=pool, labeled=labeled, out=out, config=config, device=device, force=force,
                       progress=progress)
    if not distributed.is_main():
        return  # rank 0 speaks for the group
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    m = result.metrics
    verb = "unchanged, skipped" if result.skipped else "written"
    done(f"checkpoint {result.checkpoint} {verb}: {m['labeled']} labeled, test accuracy {m['accuracy']:.4f}, "
         f"balanced {m['balanced_accuracy']:.4f} ({m['epochs']} epochs, train acc {m['train_accuracy']:.3f})")
