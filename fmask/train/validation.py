"""What `fmask train` measures a model on: the pool's test split, a stratified part of the labeled set held out
with ``--val-fraction`` (pools without a test set), or nothing (then accuracy is null)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fmask.core.errors import FmaskError

TEST, VALIDATION, NONE = "test", "validation", "none"  # metrics["evaluated_on"]


def validation_split(ids: Sequence[int], labels: Sequence[int], fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """(train ids, validation ids), stratified: from each class of n labeled samples, round(fraction * n) are
    held out (halves round up), but at least one stays for training; drawn with ``seed``, both lists ascending."""
    if not 0.0 <= fraction < 1.0:
        raise FmaskError(f"--val-fraction {fraction} must be at least 0 and below 1, e.g. 0.2")
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if fraction == 0.0:
        return sorted(ids.tolist()), []
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.sort(ids[labels == cls])
        count = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        if count > 0:
            held.append(rng.choice(members, size=count, replace=False))
    validation = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if len(validation) == 0:
        raise FmaskError(f"--val-fraction {fraction} holds out no sample of the {len(ids)} labeled ones (each class "
                         "keeps at least one for training); raise it or label more samples")
    return sorted(set(ids.tolist()) - set(validation.tolist())), validation.tolist()


def not_measured(num_classes: int) -> dict:
    """The metrics of a model trained without a test set or a validation part: accuracy unknown (null)."""
    return {"accuracy": None, "balanced_accuracy": None, "per_class_accuracy": [None] * num_classes,
            "test_samples": 0, "evaluated_on": NONE}
