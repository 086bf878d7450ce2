"""Device selection and free memory."""

from __future__ import annotations

import os

import torch

from fmask.errors import FmaskError


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
