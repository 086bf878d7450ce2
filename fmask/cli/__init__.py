"""The Typer app. Each command lives in its own module here, parses options and calls one library function;
an FmaskError from the library becomes one line on stderr and exit code 2."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer
from typer.core import TyperGroup

from fmask.cpu_allocator import tune_cpu_allocator
from fmask.errors import FmaskError


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

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "ui":
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    app()
