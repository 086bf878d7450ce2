"""The step record: every artifact stores the inputs' hashes and parameters that made it under :data:`STEP_KEY`,
so a step whose inputs did not change is skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fmask.core.hashing import seal_matches, sha256_json
from fmask.core.readers import zip_is_intact

STEP_KEY = "step"  # where every artifact records the inputs' hashes and parameters that made it


def recorded_step(path: str | os.PathLike) -> dict | None:
    """The step key an existing artifact records, or None when absent, unreadable or corrupt (so the step that
    makes it runs again instead of skipping over a damaged file)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            return obj.get(STEP_KEY) if seal_matches(obj) else None
        if path.suffix == ".safetensors":
            from safetensors.torch import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(STEP_KEY)
            return json.loads(text) if text else None
        if path.suffix == ".pt":
            if not zip_is_intact(path):
                return None
            return torch.load(path, map_location="cpu", weights_only=True).get(STEP_KEY)
    except Exception:  # an unreadable output is simply not current; the step rewrites it
        return None
    return None


def step_is_current(path: str | os.PathLike, step: dict) -> bool:
    """True when ``path`` exists and was made by the same inputs and parameters (``step``)."""
    recorded = recorded_step(path)
    return recorded is not None and sha256_json(recorded) == sha256_json(step)


# ---- The output lock: one writer per directory -------------------------------------------------------------------
