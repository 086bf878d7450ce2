"""Device selection, free memory, and the memory budget fmask plans with (``--memory-limit``)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

from fmask.core.errors import FmaskError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FmaskError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
        return torch.device(name)
    raise FmaskError(f"unknown device {name!r}; use auto, cpu or cuda")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the host's available RAM for CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown (not Linux, no sysconf): assume it fits, as before this check existed


# Share of what is free that fmask plans with when no --memory-limit is given: the rest is for the allocator's
# slack, the framework and other processes.
FREE_SHARE = {"cuda": 0.8, "cpu": 0.6}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_memory_limit: ContextVar[Optional[int]] = ContextVar("fmask_memory_limit", default=None)


def parse_memory_size(text: str) -> int:
    """Bytes from ``123456``, ``20GB`` (powers of 1000: KB, MB, GB, TB) or ``16GiB`` (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise FmaskError(f"--memory-limit {text!r} is not a size; give bytes or a number with a unit: KB, MB, GB, TB "
                         "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 20GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise FmaskError(f"--memory-limit {text!r} must be at least one byte")
    return size


@contextmanager
def memory_budget(limit: Optional[int]) -> Iterator[None]:
    """Within the block every memory plan uses ``limit`` bytes instead of a share of the free memory (None: no
    change). The plans are the Fisher pass's batches, the embeddings' RAM check and the Fisher-greedy engine's."""
    token = _memory_limit.set(limit if limit is not None else _memory_limit.get())
    try:
        yield
    finally:
        _memory_limit.reset(token)


def usable_memory_bytes(device: torch.device | str) -> int:
    """The memory fmask plans with on ``device``: the ``--memory-limit`` in force, else FREE_SHARE of its free
    memory (free GPU memory from torch.cuda.mem_get_info; available RAM for the CPU)."""
    limit = _memory_limit.get()
    if limit is not None:
        return limit
    device = torch.device(device)
    return int(FREE_SHARE.get(device.type, FREE_SHARE["cpu"]) * free_memory_bytes(device))


def format_bytes(size: float) -> str:
    """``1.5 GiB``, ``12.0 MiB``, ``512 B``: binary units, readable at any size."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"
