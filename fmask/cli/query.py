from pathlib import Path
from typing import Optional

import typer

from fmask.core import distributed
from fmask.cli import app
from fmask.core.device import parse_memory_size
from fmask.cli.options import (Deterministic, Device, Force, InputSize, Mean, MemoryLimit, PoolOfCheckpoint, Std,
                               computing)
from fmask.cli.ui import done
from fmask.query.registry import list_strategies
from fmask.query.step import run_query
from fmask.train.pretrained import parse_channel_values


@app.command("query")
def query_command(
    ckpt: Optional[Path] = typer.Option(None, help="Checkpoint from `fmask train` (without one: random needs only "
                                        "--pool; a cold start gives --pool --model --weights, strategies random and "
                                        "kcenter)."),
    out: Path = typer.Option(..., help="Selected-index JSON to write (the same list as CSV goes beside it)."),
    strategy: str = typer.Option("random", help=f"One of: {', '.join(list_strategies())}."),
    batch: int = typer.Option(..., help="How many samples to select."),
    pool: PoolOfCheckpoint = None,
    labeled: Optional[Path] = typer.Option(None, help="Labeled set (default: the one the checkpoint was trained on, "
                                           "or the pool's labeled.json without --ckpt)."),
    mask: Optional[Path] = typer.Option(None, help="Fisher mask from `fmask fisher` (fishermask)."),
    seed: int = typer.Option(0, help="Seed for randomised strategies."),
    lamb: float = typer.Option(1.0, help="Fisher-greedy prior strength λ (fishermask, bait)."),
    backward_steps: bool = typer.Option(False, help="Oversample 2x then prune greedily (fishermask, bait)."),
    float64: bool = typer.Option(False, help="Run the Fisher-greedy engine in float64."),
    chunk_size: Optional[int] = typer.Option(None, help="Candidates per chunk in the selection engines (memory bound)."),
    precision: str = typer.Option("fp32", help="Forward-pass precision: fp32 | auto | bf16 | fp16."),
    mc_samples: Optional[int] = typer.Option(None, help="MC dropout passes (bald, batchbald; default 20)."),
    joint_samples: Optional[int] = typer.Option(None, help="Label configurations BatchBALD keeps; sampled beyond "
                                                           "(default 1000)."),
    radius: Optional[float] = typer.Option(None, help="Ball radius on normalised features (probcover; default: "
                                                      "the purity rule)."),
    clusters: Optional[int] = typer.Option(None, help="Average-linkage clusters (cluster-margin; default: --batch)."),
    oversample: Optional[int] = typer.Option(None, help="Margin pool = oversample x batch (cluster-margin; "
                                                        "default 10)."),
    cluster_cap: Optional[int] = typer.Option(None, help="Most points clustered (cluster-margin; default 20000)."),
    model: Optional[str] = typer.Option(None, help="Cold start: the pretrained backbone (torchvision:NAME, "
                                                   "timm:NAME, resnet18, cnn)."),
    weights: Optional[str] = typer.Option(None, help="Cold start: its weights file or `default`; with a "
                                                     "--finetune head checkpoint: its backbone file, if moved."),
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    embedding_rows: Optional[str] = typer.Option(None, help="fishermask: scaled | unscaled embedding rows "
                                                            "(default: what the mask records)."),
    m0: Optional[str] = typer.Option(None, help="fishermask: identity | fisher start of the greedy (lamb I or lamb F; "
                                                "default: what the mask records)."),
    device: Device = "auto",
    memory_limit: MemoryLimit = None,
    deterministic: Deterministic = False,
    force: Force = False,
) -> None:
    """Select the next batch from the unlabeled pool with a registered strategy.

    Under `torchrun --nproc-per-node K -m fmask query ...` fishermask and bait shard the pool over the processes."""
    options = {"lamb": lamb, "backward_steps": backward_steps, "float64": float64, "chunk_size": chunk_size,
               "precision": precision, "mc_samples": mc_samples, "joint_samples": joint_samples, "radius": radius,
               "clusters": clusters, "oversample": oversample, "cluster_cap": cluster_cap,
               "embedding_rows": embedding_rows, "m0": m0,
               "memory_limit": parse_memory_size(memory_limit) if memory_limit else None}
    with computing(device=device, deterministic=deterministic) as progress:
        result = run_query(ckpt=ckpt, out=out, strategy=strategy, batch=batch, pool_dir=pool, labeled=labeled,
                           mask=mask, seed=seed, device=device, options=options, force=force, progress=progress,
                           model=model, weights=weights, input_size=input_size,
                           mean=parse_channel_values(mean, "--mean"), std=parse_channel_values(std, "--std"))
    if not distributed.is_main():
        return  # rank 0 speaks for the group
    verb = "unchanged, skipped" if result.skipped else f"written in {result.data['seconds']:.2f} s"
    done(f"query {result.out} {verb}: {len(result.data['selected'])} ids by {result.data['strategy']}")
