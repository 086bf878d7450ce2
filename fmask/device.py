"""Device selection."""

from __future__ import annotations

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
