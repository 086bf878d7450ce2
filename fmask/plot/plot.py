"""``fmask plot``: find every run below a directory (metrics.csv files written by `fmask train`), draw learning
curves with mean ± std bands over seeds, and summarise final accuracy and area under the learning curve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from fmask import paths
from fmask.errors import FmaskError
from fmask.io import atomic_path, atomic_write_bytes
from fmask.train.metrics import read_metrics


@dataclass
class PlotResult:
    runs: pd.DataFrame  # one row per (run, round)
    summary: pd.DataFrame  # one row per strategy
    figures: list[Path]
    summary_csv: Path


def collect_runs(results_dir: Path) -> pd.DataFrame:
    """All metric rows below ``results_dir``, each tagged with its run (directory, strategy, seed).

    A directory holds one chain per strategy; its round-0 rows ("initial") start every chain in it."""
    frames = []
    for csv_path in sorted(results_dir.rglob(paths.METRICS_CSV)):
        table = read_metrics(csv_path)
        if table.empty:
            continue
        table["dir"] = str(csv_path.parent.relative_to(results_dir))
        strategies = sorted(set(table["strategy"]) - {"initial"}) or ["initial"]
        for strategy in strategies:
            rows = table[table["strategy"].isin([strategy, "initial"])].copy()
            rows["strategy"] = strategy
            frames.append(rows)
    if not frames:
        return pd.DataFrame()
    runs = pd.concat(frames, ignore_index=True)
    if (runs["strategy"] != "initial").any():  # a shared round-0 checkpoint alone is no run
        runs = runs[runs["strategy"] != "initial"]
    runs["run"] = runs["dir"] + "|" + runs["strategy"] + "|" + runs["seed"].astype(str) + "|" + runs["train_seed"].astype(str)
    return runs.sort_values(["strategy", "run", "labeled"]).reset_index(drop=True)


def area_under_curve(labeled: np.ndarray, accuracy: np.ndarray) -> float:
    """Mean accuracy over the labeled-count range (trapezoids), comparable across budgets of one experiment."""
    if len(labeled) < 2 or labeled[-1] == labeled[0]:
        return float(accuracy[-1]) if len(accuracy) else float("nan")
    return float(np.trapezoid(accuracy, labeled) / (labeled[-1] - labeled[0]))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    per_run = []
    for (strategy, run), rows in runs.groupby(["strategy", "run"], sort=True):
        rows = rows.sort_values("labeled")
        per_run.append({"strategy": strategy, "run": run, "final_accuracy": rows["accuracy"].iloc[-1],
                        "final_balanced_accuracy": rows["balanced_accuracy"].iloc[-1],
                        "auc": area_under_curve(rows["labeled"].to_numpy(float), rows["accuracy"].to_numpy(float)),
                        "final_labeled": rows["labeled"].iloc[-1], "rounds": len(rows)})
    table = pd.DataFrame(per_run)
    summary = table.groupby("strategy").agg(
        runs=("run", "count"), final_labeled=("final_labeled", "max"),
        final_accuracy_mean=("final_accuracy", "mean"), final_accuracy_std=("final_accuracy", "std"),
        balanced_accuracy_mean=("final_balanced_accuracy", "mean"),
        balanced_accuracy_std=("final_balanced_accuracy", "std"),
        auc_mean=("auc", "mean"), auc_std=("auc", "std"))
    return summary.fillna(0.0).sort_values("auc_mean", ascending=False).reset_index()


def summary_for_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with "mean ± std" cells, for a table people read at a glance."""
    def pm(mean: pd.Series, std: pd.Series) -> list[str]:
        return [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std)]

    return pd.DataFrame({
        "strategy": summary["strategy"], "runs": summary["runs"], "labels": summary["final_labeled"],
        "final accuracy": pm(summary["final_accuracy_mean"], summary["final_accuracy_std"]),
        "balanced accuracy": pm(summary["balanced_accuracy_mean"], summary["balanced_accuracy_std"]),
        "AUC": pm(summary["auc_mean"], summary["auc_std"]),
    })


def plot_learning_curves(runs: pd.DataFrame, path: Path, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy, rows in runs.groupby("strategy", sort=True):
        stats = rows.groupby("labeled")[metric].agg(["mean", "std", "count"]).fillna(0.0)
        x = stats.index.to_numpy(float)
        n_runs = rows["run"].nunique()
        ax.plot(x, stats["mean"], marker="o", markersize=3, label=f"{strategy} (n={n_runs})")
        ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
    ax.set_xlabel("labeled samples")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title("Learning curves (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run_plot(*, results_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None) -> PlotResult:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FmaskError(f"results directory {results_dir} does not exist; pass the directory your runs write to")
    runs = collect_runs(results_dir)
    if runs.empty:
        raise FmaskError(f"no {paths.METRICS_CSV} found below {results_dir}; run `fmask train` into it first")
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    figures = [out_dir / paths.LEARNING_CURVES_PNG]
    plot_learning_curves(runs, figures[0])
    summary = summarize(runs)
    summary_csv = out_dir / paths.SUMMARY_CSV
    atomic_write_bytes(summary_csv, summary.to_csv(index=False).encode())
    return PlotResult(runs, summary, figures, summary_csv)
