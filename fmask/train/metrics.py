"""The metrics CSV beside checkpoints: one row per trained checkpoint, which `fmask plot` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from fmask.core import paths
from fmask.core.atomic import atomic_write_bytes

COLUMNS = ["checkpoint", "strategy", "seed", "train_seed", "round", "labeled", "accuracy", "balanced_accuracy",
           "train_accuracy", "epochs", "train_seconds", "per_class_accuracy", "labeled_counts", "evaluated_on"]
# evaluated_on: "test" (the pool's test split), "validation" (train --val-fraction), "none" (no test set: accuracy
# is empty); rows written before the column existed were measured on the test split.


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's metrics, typed: what ``fmask train`` measured (``TrainResult.evaluation``)."""

    accuracy: Optional[float]  # None: no test set and no --val-fraction, so nothing was measured
    balanced_accuracy: Optional[float]
    per_class_accuracy: list[Optional[float]]  # NaN for a class absent from the evaluation split
    evaluated_on: str  # "test" | "validation" | "none"
    test_samples: int
    labeled: Optional[int]  # labeled samples the checkpoint was trained on
    epochs: Optional[int]
    train_accuracy: Optional[float]
    train_seconds: Optional[float]

    @classmethod
    def from_metrics(cls, metrics: dict) -> "Evaluation":
        return cls(accuracy=metrics.get("accuracy"), balanced_accuracy=metrics.get("balanced_accuracy"),
                   per_class_accuracy=list(metrics.get("per_class_accuracy") or []),
                   evaluated_on=metrics.get("evaluated_on", "test"), test_samples=int(metrics.get("test_samples", 0)),
                   labeled=metrics.get("labeled"), epochs=metrics.get("epochs"),
                   train_accuracy=metrics.get("train_accuracy"), train_seconds=metrics.get("train_seconds"))


def test_metrics(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean over the classes present) and per-class accuracy (NaN for a class absent
    from the test split) of ``predicted`` class indices against ``truth``."""
    per_class = []
    for cls in range(num_classes):
        members = truth == cls
        per_class.append(float((predicted[members] == cls).float().mean()) if members.any() else float("nan"))
    present = [a for a in per_class if a == a]
    return {"accuracy": float((predicted == truth).float().mean()), "balanced_accuracy": sum(present) / len(present),
            "per_class_accuracy": per_class, "test_samples": int(len(truth))}


def record_metrics(checkpoint: Path, *, labeled_set, metrics: dict, train_seed: int | None = None) -> None:
    """Insert or replace the row of ``checkpoint`` in the metrics CSV of its directory."""
    csv_path = paths.metrics_csv(checkpoint)
    counts = [0] * len(metrics["per_class_accuracy"])
    for label in labeled_set.labels:
        counts[label] += 1
    row = {
        "checkpoint": Path(checkpoint).name, "strategy": labeled_set.strategy, "seed": labeled_set.seed,
        "train_seed": train_seed if train_seed is not None else "", "round": labeled_set.round,
        "labeled": len(labeled_set.ids), "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"], "train_accuracy": metrics.get("train_accuracy"),
        "epochs": metrics.get("epochs"), "train_seconds": metrics.get("train_seconds"),
        "per_class_accuracy": json.dumps(metrics["per_class_accuracy"]), "labeled_counts": json.dumps(counts),
        "evaluated_on": metrics.get("evaluated_on", "test"),
    }
    table = read_metrics(csv_path)
    if len(table) and (table["checkpoint"] == row["checkpoint"]).any():
        recorded = table[table["checkpoint"] == row["checkpoint"]].iloc[0]
        same_accuracy = (pd.isna(recorded["accuracy"]) and row["accuracy"] is None) or \
            (row["accuracy"] is not None and float(recorded["accuracy"]) == row["accuracy"])
        if same_accuracy and int(recorded["labeled"]) == row["labeled"]:
            return  # already recorded: a resumed or skipped step rewrites nothing
    table = table[table["checkpoint"] != row["checkpoint"]] if len(table) else table
    table = pd.concat([table, pd.DataFrame([row], columns=COLUMNS)], ignore_index=True) if len(table) \
        else pd.DataFrame([row], columns=COLUMNS)
    atomic_write_bytes(csv_path, table.to_csv(index=False).encode())


def read_metrics(csv_path: Path) -> pd.DataFrame:
    if not Path(csv_path).is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(csv_path)
