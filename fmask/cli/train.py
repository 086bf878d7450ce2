from pathlib import Path
from typing import Optional

import typer

from fmask.core import distributed
from fmask.cli import app
from fmask.cli.options import Deterministic, Device, Force, InputSize, Mean, Std, computing
from fmask.cli.ui import done
from fmask.train.pretrained import parse_channel_values
from fmask.train.recipe import make_train_config
from fmask.train.trainer import TrainConfig, train


@app.command("train")
def train_command(
    pool: Path = typer.Option(..., help="Pool directory from `fmask build-pool`."),
    out: Path = typer.Option(..., help="Checkpoint (.pt) to write."),
    labeled: Optional[Path] = typer.Option(None, help="Labeled set JSON (default: the pool's round-0 set)."),
    model: str = typer.Option("resnet18", help="resnet18 | cnn | torchvision:NAME | timm:NAME (timm needs "
                                               "pip install 'fmask\\[timm]')."),
    weights: Optional[str] = typer.Option(None, help="Pretrained weights: a .safetensors/.pt/.pth state dict, or "
                                                     "`default` (the library's own, from its cache)."),
    finetune: str = typer.Option("full", help="full: train every weight | head: a linear head on the frozen "
                                              "backbone's cached features (needs --weights)."),
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    epochs: Optional[int] = typer.Option(None, help="Epochs, a cap while --target-accuracy is on (default: 100; "
                                                    "10 with --weights, 30 with --finetune head)."),
    target_accuracy: Optional[float] = typer.Option(None, help="Stop once an epoch reaches this training accuracy "
                                                               "(default: 0.99; off with --weights)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (the head's with --backbone-lr-scale) "
                                                  "(default: 1e-3)."),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="Backbone learning rate = lr x this (default: 1; "
                                                                 "0.1 with --weights)."),
    optimizer: Optional[str] = typer.Option(None, help="adam | adamw (default: adam; adamw with --weights)."),
    schedule: Optional[str] = typer.Option(None, help="constant | cosine (per epoch) (default: constant; cosine "
                                                      "with --weights)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default: 0; 0.01 with --weights)."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    grad_clamp: Optional[float] = typer.Option(None, help="Clamp each gradient entry to ±value, 0 disables "
                                                          "(default: 0.1; off with --weights)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment",
                                           help="Random crop + flip, flip only where the dataset allows (default: "
                                                "on; off with --finetune head)."),
    seed: int = typer.Option(0, help="Seed for initialisation, batches and augmentation."),
    device: Device = "auto",
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (autocast); auto: bf16 on GPUs that "
                                               "have it, fp32 on CPU."),
    channels_last: bool = typer.Option(True, help="Channels-last (NHWC) memory format for the model and batches."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model for the training steps."),
    stream: bool = typer.Option(False, "--stream", help="Stream batches from host memory instead of keeping the "
                                                        "images on the device (automatic when they do not fit)."),
    mc_dropout: float = typer.Option(0.0, help="Dropout rate before the head (0: none); bald and batchbald need "
                                               "it for their Monte Carlo dropout passes, e.g. 0.3."),
    val_fraction: float = typer.Option(0.0, help="Hold out this stratified share of the labeled set and measure "
                                       "accuracy on it (pools without a test set)."),
    deterministic: Deterministic = False,
    force: Force = False,
) -> None:
    """Train on the labeled set (from scratch, or from pretrained --weights), evaluate on the test split (or a
    held-out part), write a checkpoint.

    Under `torchrun --nproc-per-node K -m fmask train ...` it trains with DistributedDataParallel."""
    config = make_train_config(
        TrainConfig, model=model, weights=weights, finetune=finetune, input_size=input_size,
        mean=parse_channel_values(mean, "--mean"), std=parse_channel_values(std, "--std"), lr=lr,
        backbone_lr_scale=backbone_lr_scale, optimizer=optimizer, schedule=schedule, weight_decay=weight_decay,
        batch_size=batch_size, max_epochs=epochs, target_train_accuracy=target_accuracy, grad_clamp=grad_clamp,
        augment=augment, seed=seed, precision=precision, channels_last=channels_last, compile=compile_model,
        stream=stream, mc_dropout=mc_dropout, val_fraction=val_fraction)
    with computing(device=device, deterministic=deterministic) as progress:
        result = train(pool_dir=pool, labeled=labeled, out=out, config=config, device=device, force=force,
                       progress=progress)
    if not distributed.is_main():
        return  # rank 0 speaks for the group
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    m = result.metrics
    verb = "unchanged, skipped" if result.skipped else "written"
    measured = m.get("evaluated_on", "test")
    if m["accuracy"] is None:
        quality = "no test set, accuracy not measured (build the pool with --test, or train with --val-fraction)"
    else:
        where = f"validation ({m.get('validation_samples')} held out)" if measured == "validation" else "test"
        quality = f"{where} accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}"
    done(f"checkpoint {result.checkpoint} {verb}: {m['labeled']} labeled, {quality} ({m['epochs']} epochs, "
         f"train acc {m['train_accuracy']:.3f})")
