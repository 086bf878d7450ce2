"""Terminal output: a shared rich console on stderr for progress, stdout for results."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


@contextmanager
def progress_callback() -> Iterator:
    """Yield ``progress(task, done, total)`` drawing one rich bar per task description."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            key = task.split(" (")[0]  # "training (train acc 0.91)" keeps one bar
            if key not in tasks:
                tasks[key] = bars.add_task(task, total=total)
            bars.update(tasks[key], completed=done, total=total, description=task)

        yield update


def print_table(frame: pd.DataFrame, title: str, float_format: str = "{:.4f}") -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "fiu" else "left")
    for _, row in frame.iterrows():
        table.add_row(*[float_format.format(v) if isinstance(v, float) else str(v) for v in row])
    console.print(table)


def done(message: str) -> None:
    console.print(message)
