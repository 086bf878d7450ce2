"""Terminal output: a shared rich console on stderr for progress, stdout for results.

On a terminal, progress is drawn as transient bars. When stderr is not a terminal (a log file, CI, a pipe) bars
would vanish, so each task writes plain lines instead: one whenever its description changes (training names
every epoch with its loss and accuracy; ``fmask run`` every step), one when it finishes, and otherwise one at
most every ``LINE_INTERVAL`` seconds, so a log shows where a long run is. Tables are printed at the width of
their content when stdout is not a terminal (no truncated headers in a log).
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

LINE_INTERVAL = 30.0  # seconds between two lines of an unchanged task when stderr is not a terminal
PROGRESS_LINE = re.compile(r".+: \d+/\d+ \(\d+ s\)")  # what ProgressLines writes: "TASK: DONE/TOTAL (SECONDS s)"


def _task_key(task: str) -> str:
    return task.split(" (")[0]  # "training (epoch 3, loss 0.41, train acc 0.91)" is one task


class ProgressLines:
    """``progress(task, done, total)`` writing plain lines to ``write``: a line when a task's description changes
    (its first update included), when it finishes, and otherwise at most every ``interval`` seconds."""

    def __init__(self, write: Callable[[str], None], interval: float = LINE_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self.started: dict[str, float] = {}
        self.last: dict[str, tuple[str, float]] = {}  # task key -> (description, time) of its last line

    def __call__(self, task: str, done: int, total: int) -> None:
        key, now = _task_key(task), self.clock()
        started = self.started.setdefault(key, now)
        finished = done >= total
        previous = self.last.get(key)
        if previous is not None and previous[0] == task and not finished and now - previous[1] < self.interval:
            return
        self.write(f"{task}: {done}/{total} ({now - started:.0f} s)")
        self.last[key] = (task, now)
        if finished:  # the same task may run again (the next round's training): it starts afresh
            del self.started[key], self.last[key]


@contextmanager
def progress_callback() -> Iterator:
    """Yield ``progress(task, done, total)``: one rich bar per task on a terminal, plain lines otherwise."""
    if not err_console.is_terminal:
        yield ProgressLines(lambda line: print(line, file=sys.stderr, flush=True))
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            key = _task_key(task)
            if key not in tasks:
                tasks[key] = bars.add_task(task, total=total)
            bars.update(tasks[key], completed=done, total=total, description=task)

        yield update


def show(renderable) -> None:
    """Print a table (or any rich renderable) on stdout: at the terminal's width on a terminal, else at the
    width of its content, so nothing is cut off in a log."""
    if console.is_terminal:
        console.print(renderable)
        return
    if isinstance(renderable, Table) and renderable.title:  # a title wraps at the table's width otherwise
        renderable.min_width = max(renderable.min_width or 0, len(str(renderable.title)))
    width = console.measure(renderable, options=console.options.update(width=10_000)).maximum
    Console(width=width, file=sys.stdout).print(renderable)


def print_table(frame: pd.DataFrame, title: str, float_format: str = "{:.4f}") -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "fiu" else "left")
    for _, row in frame.iterrows():
        table.add_row(*[float_format.format(v) if isinstance(v, float) else str(v) for v in row])
    show(table)


def done(message: str) -> None:
    # Long paths stay on one line in a log (no wrapping at 80 columns); brackets in paths are not markup.
    console.print(message, soft_wrap=True, markup=False)


