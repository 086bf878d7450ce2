"""The Typer app. Each command lives in its own module here, parses options and calls one library function;
an FmaskError from the library becomes one line on stderr and exit code 2. Global options (before the command):
``--threads N``, ``--verbose``, ``--version``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from fmask import __version__
from fmask.core.cpu_allocator import tune_cpu_allocator
from fmask.core.errors import FmaskError


class FmaskGroup(TyperGroup):
    def invoke(self, ctx):  # type: ignore[override]
        tune_cpu_allocator()
        try:
            return super().invoke(ctx)
        except FmaskError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished artifacts are kept; rerun the same command to resume", err=True)
            sys.exit(130)


app = typer.Typer(cls=FmaskGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pool-based batch active learning for image classifiers, built around FisherMask.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"fmask {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for PyTorch (default: sized to the "
                                          "model, or what OMP_NUM_THREADS / MKL_NUM_THREADS say when set)."),
    verbose: bool = typer.Option(False, "--verbose", help="Say which thread count was chosen and why."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    """Pool-based batch active learning for image classifiers, built around FisherMask."""
    from fmask.core.threads import configure_threads

    configure_threads(requested=threads, notify=(lambda line: typer.echo(line, err=True)) if verbose else None)


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "ui":
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    app()
