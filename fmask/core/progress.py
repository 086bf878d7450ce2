"""How long work reports progress: a callback the CLI turns into rich bars on a terminal and a line per step in
a log; library code calls it and prints nothing."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[str, int, int], None]  # (task description, done, total)

__all__ = ["ProgressFn"]
