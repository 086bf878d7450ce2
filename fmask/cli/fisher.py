from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from fmask.core import distributed
from fmask.cli import app
from fmask.cli.options import Checkpoint, Deterministic, Device, Force, MemoryLimit, PoolOfCheckpoint, computing
from fmask.cli.ui import done, show
from fmask.fisher.profile import mask_profile_from_file
from fmask.fisher.step import EMBED_DTYPES, run_fisher


@app.command("fisher")
def fisher_command(
    ckpt: Checkpoint = ...,
    out: Path = typer.Option(..., help="Mask file (.safetensors) to write; embeddings are cached beside it."),
    pool: PoolOfCheckpoint = None,
    labeled: Optional[Path] = typer.Option(None, help="Labeled set (default: the one the checkpoint was trained on)."),
    sparsity: float = typer.Option(0.002, help="Share of all parameters to keep: k = round(sparsity x parameters)."),
    samples: Optional[int] = typer.Option(None, help="Average the Fisher over N unlabeled samples, stratified by "
                                                     "predicted class (default: all of them)."),
    head: bool = typer.Option(True, "--head/--no-head", help="Always keep the classifier layer (head.*) in the "
                                                             "mask, counting toward k; --no-head: plain top-k."),
    seed: int = typer.Option(0, help="Seed for --samples."),
    embed_dtype: str = typer.Option("float32", help=f"Embedding cache dtype: {' | '.join(EMBED_DTYPES)}."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings",
                                    help="Also compute the masked gradient embeddings `fmask query` uses."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per forward/backward chunk (default: 64 on a CPU; "
                                                        "on a GPU as many as half the usable memory holds, at most "
                                                        "1024)."),
    embedding_rows: str = typer.Option("scaled", help="Embedding rows: scaled (sqrt(p_y) grad log p_y, the paper's "
                                                      "text) | unscaled (grad log p_y, the authors' code)."),
    m0: str = typer.Option("identity", help="Recorded for `fmask query`: the greedy starts from lamb I (identity, "
                                            "the authors' code) or lamb F (fisher, the paper's eq. 2)."),
    profile: bool = typer.Option(False, "--profile", help="Print the share of masked parameters per layer."),
    device: Device = "auto",
    memory_limit: MemoryLimit = None,
    deterministic: Deterministic = False,
    force: Force = False,
) -> None:
    """Rank every parameter by its exact diagonal Fisher on the unlabeled pool and keep the top k (FisherMask)."""
    # under torchrun: the pool is sharded; rank 0 alone writes and prints
    with computing(device=device, deterministic=deterministic, memory_limit=memory_limit) as progress:
        result = run_fisher(ckpt=ckpt, out=out, pool_dir=pool, labeled=labeled, sparsity=sparsity, samples=samples,
                            head=head, seed=seed, device=device, embed_dtype=embed_dtype, embeddings=embeddings,
                            batch_size=batch_size, embedding_rows=embedding_rows, m0=m0, force=force,
                            progress=progress)
    if not distributed.is_main():
        return
    if result.head_fills_mask:
        typer.echo(f"note: the backbone is frozen and k={result.k} is no more than the classifier layer's size, so "
                   f"the mask is the head's top {result.k} entries", err=True)
    if profile:
        table = Table(title=f"Masked parameters per layer ({result.out.name})")
        for column in ("layer", "parameters", "masked", "share"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in mask_profile_from_file(result.out):
            table.add_row(row.layer, f"{row.parameters:,}", f"{row.masked:,}", f"{100 * row.share:.3f}%")
        show(table)
    verb = "unchanged, skipped" if result.skipped else f"written in {result.seconds:.1f} s"
    where = f"; embeddings cached in {result.embeddings}" if result.embeddings else ""
    done(f"mask {result.out} {verb}: k={result.k:,} of {result.num_parameters:,} parameters "
         f"({'head kept' if result.head else 'plain top-k'}), Fisher over {result.samples} unlabeled samples{where}")
