"""Options that several commands share, declared once (Typer reads the help from the annotation, the default from
the signature), and the context every computing command runs in."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from fmask.cli.ui import progress_callback
from fmask.core import distributed
from fmask.core.device import memory_budget, parse_memory_size
from fmask.core.numerics import deterministic_algorithms
from fmask.core.progress import ProgressFn

Device = Annotated[str, typer.Option(help="auto | cpu | cuda")]
MemoryLimit = Annotated[Optional[str], typer.Option("--memory-limit", help="Memory to plan with, in bytes or e.g. "
                                                    "20GB / 16GiB (default: 60% of available RAM, 80% of free GPU "
                                                    "memory).")]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="Deterministic algorithms only (cuDNN "
                                             "included), so a GPU rerun gives identical results; slower.")]
Force = Annotated[bool, typer.Option(help="Rerun even if the output exists with the same inputs.")]
Checkpoint = Annotated[Path, typer.Option(help="Checkpoint from `fmask train`.")]
QueryFile = Annotated[Path, typer.Option(help="Selected-index JSON from `fmask query`.")]
PoolOfCheckpoint = Annotated[Optional[Path], typer.Option(help="Pool directory (default: the one the checkpoint "
                                                                "records).")]
PoolOfQuery = Annotated[Optional[Path], typer.Option(help="Pool directory (default: the one the query records).")]
Workers = Annotated[Optional[int], typer.Option(help="With --images: decoding processes (default: the CPU count).")]
InputSize = Annotated[Optional[int], typer.Option(help="Resize inputs on the device to this size (default: the "
                                                       "weights' config; the pool's size for resnet18/cnn).")]
Mean = Annotated[Optional[str], typer.Option(help="The backbone's normalisation mean, e.g. 0.485,0.456,0.406 "
                                                  "(default: the weights' config, ImageNet's for a plain file).")]
Std = Annotated[Optional[str], typer.Option(help="The backbone's normalisation std (default: as --mean).")]


@contextmanager
def computing(*, device: str, deterministic: bool = False, memory_limit: Optional[str] = None
              ) -> Iterator[Optional[ProgressFn]]:
    """Join a torchrun group when launched by one, apply --deterministic and --memory-limit, and show progress on
    rank 0 (the other ranks stay silent: rank 0 speaks for the group). Yields the progress callback."""
    distributed.init_from_env(device)
    budget = parse_memory_size(memory_limit) if memory_limit else None
    with ExitStack() as stack:
        stack.enter_context(deterministic_algorithms(deterministic))
        stack.enter_context(memory_budget(budget))
        yield stack.enter_context(progress_callback()) if distributed.is_main() else None
