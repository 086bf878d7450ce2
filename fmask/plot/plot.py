"""``fmask plot``: find every run below a directory (metrics.csv files written by `fmask train`), draw learning
curves with mean ± std bands over seeds, and summarise final accuracy and area under the learning curve, with
95% percentile-bootstrap intervals over seeds and paired comparisons (bootstrap interval of the mean difference,
exact Wilcoxon signed-rank p-value) against random and fishermask."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from fmask.core import paths
from fmask.core.errors import FmaskError
from fmask.core.atomic import atomic_path, atomic_write_bytes
from fmask.train.metrics import read_metrics


@dataclass
class PlotResult:
    runs: pd.DataFrame  # one row per (run, round)
    summary: pd.DataFrame  # one row per strategy
    figures: list[Path]
    summary_csv: Path
    notes: list[str] = field(default_factory=list)  # which curves have no test set (and what they show instead)


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
    if "evaluated_on" not in runs.columns:
        runs["evaluated_on"] = "test"
    # Rows written before the column existed, or with an accuracy, were measured on a test split.
    runs["evaluated_on"] = runs["evaluated_on"].fillna("test")
    return runs.sort_values(["strategy", "run", "labeled"]).reset_index(drop=True)


def evaluation_notes(runs: pd.DataFrame) -> list[str]:
    """One line per directory whose curves have no test set: not measured at all, or measured on a held-out part
    of the labeled set (train --val-fraction)."""
    notes = []
    for directory, rows in runs.groupby("dir", sort=True):
        kinds = set(rows["evaluated_on"])
        name = directory if directory != "." else "(the results directory)"
        strategies = ", ".join(sorted(rows["strategy"].unique()))
        if kinds == {"none"}:
            notes.append(f"no test set: {name} ({strategies}): accuracy not measured, no curve drawn; build the pool "
                         "with --test or train with --val-fraction")
        elif "none" in kinds:
            notes.append(f"no test set for some rounds of {name} ({strategies}): those rounds are left out of the curves")
        if "validation" in kinds:
            notes.append(f"no test set: {name} ({strategies}): accuracy is a validation estimate (train "
                         "--val-fraction), marked 'validation' in the legend")
    return notes


def area_under_curve(labeled: np.ndarray, accuracy: np.ndarray) -> float:
    """Mean accuracy over the labeled-count range (trapezoids), comparable across budgets of one experiment."""
    if len(labeled) < 2 or labeled[-1] == labeled[0]:
        return float(accuracy[-1]) if len(accuracy) else float("nan")
    from scipy.integrate import trapezoid  # numpy's own is np.trapz before 2.0 and np.trapezoid from 2.0 on

    return float(trapezoid(accuracy, labeled) / (labeled[-1] - labeled[0]))


def labels_to_reach(labeled: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """The first labeled count whose accuracy reaches ``target`` (NaN when never reached)."""
    reached = np.flatnonzero(accuracy >= target)
    return float(labeled[reached[0]]) if len(reached) else float("nan")


def per_run_table(runs: pd.DataFrame, target: float) -> pd.DataFrame:
    rows = []
    for (strategy, run), group in runs.groupby(["strategy", "run"], sort=True):
        group = group.sort_values("labeled")
        labeled, accuracy = group["labeled"].to_numpy(float), group["accuracy"].to_numpy(float)
        rows.append({"strategy": strategy, "run": run, "seed": group["seed"].iloc[0],
                     "final_accuracy": accuracy[-1], "final_balanced_accuracy": group["balanced_accuracy"].iloc[-1],
                     "auc": area_under_curve(labeled, accuracy), "final_labeled": labeled[-1],
                     "labels_to_target": labels_to_reach(labeled, accuracy, target), "rounds": len(group)})
    return pd.DataFrame(rows)


def default_target(per_run: pd.DataFrame) -> float:
    """What random sampling reaches at the end (mean over seeds): "labels to match random's final accuracy"."""
    reference = per_run[per_run["strategy"] == "random"]
    reference = reference if len(reference) else per_run
    return float(reference["final_accuracy"].mean())


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
REFERENCES = ("random", "fishermask")  # the strategies every other is compared with, seed by seed
# The exact two-sided Wilcoxon p-value is at least 2 / 2^n: below 0.05 only from n = 6 paired seeds on.
WILCOXON_MIN_SEEDS = 6


def bootstrap_interval(values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampling the seeds with replacement);
    (v, v) for a single value, (nan, nan) for none."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, n_resamples=resamples, method="percentile", confidence_level=confidence,
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Exact two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped); nan when none differ."""
    from scipy.stats import wilcoxon

    differences = np.asarray(differences, dtype=float)
    if not np.any(differences != 0):
        return float("nan")
    return float(wilcoxon(differences, method="exact").pvalue)


def paired_comparison(per_run: pd.DataFrame, strategy: str, reference: str, metric: str = "auc") -> dict:
    """``metric`` of ``strategy`` minus ``reference`` on the seeds both ran: mean, std, bootstrap interval, exact
    Wilcoxon p, wins, seeds. No common seed: every value nan (seeds 0); a strategy against itself: zeros, p nan."""
    mine = per_run[per_run["strategy"] == strategy].groupby("seed")[metric].mean()
    theirs = per_run[per_run["strategy"] == reference].groupby("seed")[metric].mean()
    common = mine.index.intersection(theirs.index)
    diff = (mine[common] - theirs[common]).to_numpy(float)
    if not len(diff):
        return {"mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan, "wins": 0,
                "seeds": 0}
    if strategy == reference:
        return {"mean": 0.0, "std": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": np.nan, "wins": 0, "seeds": len(diff)}
    low, high = bootstrap_interval(diff)
    return {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else np.nan,
            "ci_low": low, "ci_high": high, "p": wilcoxon_p(diff), "wins": int((diff > 0).sum()), "seeds": len(diff)}


def summarize(runs: pd.DataFrame, target: Optional[float] = None) -> pd.DataFrame:
    """Per strategy: final accuracy, AUC and labels to reach ``target``, each mean and std over runs, 95%
    bootstrap intervals of the mean final accuracy and AUC, and the paired AUC difference against random and
    against fishermask on the same seeds (mean, std, bootstrap interval, exact Wilcoxon p, wins)."""
    per_run = per_run_table(runs, target if target is not None else 0.0)
    target = default_target(per_run) if target is None else target
    per_run = per_run_table(runs, target)
    summary = per_run.groupby("strategy").agg(
        runs=("run", "count"), final_labeled=("final_labeled", "max"),
        final_accuracy_mean=("final_accuracy", "mean"), final_accuracy_std=("final_accuracy", "std"),
        balanced_accuracy_mean=("final_balanced_accuracy", "mean"),
        balanced_accuracy_std=("final_balanced_accuracy", "std"),
        auc_mean=("auc", "mean"), auc_std=("auc", "std"),
        labels_to_target_mean=("labels_to_target", "mean"), labels_to_target_std=("labels_to_target", "std"),
        reached_target=("labels_to_target", lambda v: int(v.notna().sum())))
    summary["target_accuracy"] = target
    for metric in ("final_accuracy", "auc"):
        intervals = [bootstrap_interval(per_run.loc[per_run["strategy"] == strategy, metric].to_numpy(float))
                     for strategy in summary.index]
        summary[f"{metric}_ci_low"] = [low for low, _ in intervals]
        summary[f"{metric}_ci_high"] = [high for _, high in intervals]
    for reference in REFERENCES:
        compared = [paired_comparison(per_run, strategy, reference) for strategy in summary.index]
        for key in ("mean", "std", "ci_low", "ci_high", "p"):
            summary[f"auc_vs_{reference}_{key}"] = [c[key] for c in compared]
        summary[f"wins_vs_{reference}"] = [c["wins"] for c in compared]
        summary[f"paired_seeds_vs_{reference}"] = [c["seeds"] for c in compared]
    summary["paired_seeds"] = summary["paired_seeds_vs_random"]
    stds = [c for c in summary.columns if c.endswith("_std")]
    summary[stds] = summary[stds].fillna(0.0)
    return summary.sort_values("auc_mean", ascending=False).reset_index()


def summary_for_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with "mean [95% interval]" cells, for a table people read at a glance."""
    def pm(mean: pd.Series, std: pd.Series, fmt: str = "{:.3f}") -> list[str]:
        return [("—" if m != m else f"{fmt.format(m)} ± {fmt.format(s)}") for m, s in zip(mean, std)]

    def ci(mean: pd.Series, low: pd.Series, high: pd.Series) -> list[str]:
        return [("—" if m != m else f"{m:.3f} [{lo:.3f}, {hi:.3f}]") for m, lo, hi in zip(mean, low, high)]

    def versus(reference: str) -> list[str]:
        cells = []
        for strategy, row in summary.set_index("strategy").iterrows():
            m = row[f"auc_vs_{reference}_mean"]
            if m != m or strategy == reference:
                cells.append("—")
                continue
            p = row[f"auc_vs_{reference}_p"]
            p_text = "" if p != p else f" p={p:.3f}"
            cells.append(f"{m:+.3f} [{row[f'auc_vs_{reference}_ci_low']:+.3f}, {row[f'auc_vs_{reference}_ci_high']:+.3f}]"
                         f"{p_text} ({int(row[f'wins_vs_{reference}'])}/{int(row[f'paired_seeds_vs_{reference}'])} won)")
        return cells

    target = summary["target_accuracy"].iloc[0] if len(summary) else float("nan")
    table = pd.DataFrame({
        "strategy": summary["strategy"], "runs": summary["runs"], "labels": summary["final_labeled"].astype(int),
        "final accuracy [95% CI]": ci(summary["final_accuracy_mean"], summary["final_accuracy_ci_low"],
                                      summary["final_accuracy_ci_high"]),
        "balanced": pm(summary["balanced_accuracy_mean"], summary["balanced_accuracy_std"]),
        "AUC [95% CI]": ci(summary["auc_mean"], summary["auc_ci_low"], summary["auc_ci_high"]),
        f"labels to {target:.3f}": [f"{t} ({r}/{n})" for t, r, n in zip(
            pm(summary["labels_to_target_mean"], summary["labels_to_target_std"], "{:.0f}"),
            summary["reached_target"], summary["runs"])],
    })
    for reference in REFERENCES:
        if (summary[f"paired_seeds_vs_{reference}"] > 0).any():
            table[f"AUC vs {reference}"] = versus(reference)
    return table


def summary_notes(summary: pd.DataFrame) -> list[str]:
    """Caveats the numbers need beside them."""
    notes = [f"intervals: {CONFIDENCE:.0%} percentile bootstrap over seeds ({BOOTSTRAP_RESAMPLES:,} resamples, seed "
             f"{BOOTSTRAP_SEED}); p: exact two-sided Wilcoxon signed-rank test of the paired AUC differences"]
    seeds = [int(n) for reference in REFERENCES for strategy, n in zip(summary["strategy"],
                                                                        summary[f"paired_seeds_vs_{reference}"])
             if strategy != reference and n > 0]
    if seeds and min(seeds) < WILCOXON_MIN_SEEDS:
        notes.append(f"only {min(seeds)} paired seeds: with fewer than {WILCOXON_MIN_SEEDS} no two-sided Wilcoxon "
                     "p-value can fall below 0.05 (the smallest possible is 2 / 2^n), so p says little here")
    return notes


def plot_learning_curves(runs: pd.DataFrame, path: Path, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = runs[runs["evaluated_on"] != "none"] if "evaluated_on" in runs.columns else runs
    groups = list(measured.groupby("strategy", sort=True))
    many = len(groups) > 6  # then the legend goes beside the axes, where it hides no curve, and bands fade
    fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.5), dpi=120)
    # The default cycle repeats after ten colours; more strategies than that each get one of tab20's twenty, its
    # ten dark shades first (tab20 pairs a dark and a light shade of each hue).
    tab20 = plt.get_cmap("tab20").colors
    colors = list(tab20[0::2] + tab20[1::2]) if len(groups) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last_means: list[float] = []
    for (strategy, rows), color in zip(groups, colors * (len(groups) // len(colors) + 1)):
        stats = rows.groupby("labeled")[metric].agg(["mean", "std", "count"]).fillna(0.0)
        x = stats.index.to_numpy(float)
        n_runs = rows["run"].nunique()
        where = ", validation" if "evaluated_on" in rows.columns and (rows["evaluated_on"] == "validation").all() else ""
        # As floats: pandas 2.0 can hand these back as object arrays, which matplotlib refuses.
        mean, std = stats["mean"].to_numpy(float), stats["std"].to_numpy(float)
        ax.plot(x, mean, marker="o", markersize=3, color=color, label=f"{strategy} (n={n_runs}{where})")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.08 if many else 0.2)
        last_means.append(float(mean[-1]) if len(mean) else float("-inf"))
    if measured.empty:
        ax.text(0.5, 0.5, "no test set: accuracy was not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("labeled samples")
    validation = "evaluated_on" in measured.columns and (measured["evaluated_on"] == "validation").any()
    ax.set_ylabel(("test or validation " if validation else "test ") + metric.replace('_', ' '))
    ax.set_title("Learning curves (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if not measured.empty:
        # Highest last point first: the legend reads as the ranking at the largest labeled count.
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: -last_means[i])
        placement = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, **placement)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_class_picks(runs: pd.DataFrame, classes: Optional[list[str]], path: Path) -> None:
    """Per strategy, the samples of each class picked in each round (mean over seeds): the imbalance story."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted(runs["strategy"].unique())
    n_cols = min(3, len(strategies))
    n_rows = (len(strategies) + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), dpi=110, squeeze=False,
                             sharey=True)
    for ax, strategy in zip(axes.flat, strategies):
        picks = []
        for _, group in runs[runs["strategy"] == strategy].groupby("run"):
            counts = np.array([json.loads(c) for c in group.sort_values("round")["labeled_counts"]], dtype=float)
            rounds = group.sort_values("round")["round"].to_numpy()
            picks.append(pd.DataFrame(np.diff(counts, axis=0), index=rounds[1:]))
        if not picks or all(p.empty for p in picks):
            ax.set_title(f"{strategy}: no query rounds")
            continue
        mean_picks = pd.concat(picks).groupby(level=0).mean()
        bottom = np.zeros(len(mean_picks))
        cmap = plt.get_cmap("tab10")
        for cls in mean_picks.columns:
            label = classes[cls] if classes and cls < len(classes) else str(cls)
            ax.bar(mean_picks.index, mean_picks[cls], bottom=bottom, color=cmap(cls % 10), label=label)
            bottom += mean_picks[cls].to_numpy()
        ax.set_title(strategy)
        ax.set_xticks(mean_picks.index)
        ax.set_xlabel("round")
        ax.set_ylabel("samples picked per class")
    for ax in list(axes.flat)[len(strategies):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(10, len(labels)), fontsize=7)
    fig.suptitle("Class of every picked sample, per round (mean over seeds)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_step_times(timings: pd.DataFrame, path: Path) -> None:
    """Mean seconds per step (fisher, query, label, train) for every strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = timings[timings["strategy"] != "-"].pivot_table(index="strategy", columns="step", values="seconds",
                                                           aggfunc="mean").fillna(0.0)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(table) + 1.8), dpi=110)
    left = np.zeros(len(table))
    for step in [s for s in ("fisher", "query", "label", "train") if s in table.columns]:
        ax.barh(table.index, table[step], left=left, label=step)
        left += table[step].to_numpy()
    ax.set_xlabel("seconds per round (mean)")
    ax.set_title("Time per step per strategy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def read_timings(results_dir: Path) -> pd.DataFrame:
    frames = []
    for csv_path in sorted(results_dir.rglob(paths.TIMINGS_CSV)):
        try:
            frames.append(pd.read_csv(csv_path, on_bad_lines="skip"))
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
    return pd.concat(frames, ignore_index=True).dropna() if frames else pd.DataFrame()


def pool_classes(results_dir: Path) -> Optional[list[str]]:
    for manifest in sorted(results_dir.rglob(paths.POOL_MANIFEST)):
        try:
            return json.loads(manifest.read_text())["classes"]
        except (ValueError, KeyError):
            continue
    return None


def last_mask(results_dir: Path) -> Optional[Path]:
    """The Fisher mask of the last round below ``results_dir``, found by its name (:func:`fmask.core.paths.chain_mask`
    names them by round; of several chains, the last in path order); a mask whose name gives no round counts as
    round -1. None when no mask is there."""
    masks = [path for path in results_dir.rglob("*" + paths.SAFETENSORS_SUFFIX) if paths.is_mask(path)]
    if not masks:
        return None
    round_of = {path: paths.mask_round(path) for path in masks}
    return max(masks, key=lambda path: (-1 if round_of[path] is None else round_of[path], path.parts))


def plot_mask_profiles(results_dir: Path, path: Path) -> bool:
    """The last round's Fisher mask's per-layer profile (the paper's Fig. 2), when a run made masks."""
    mask = last_mask(results_dir)
    if mask is None:
        return False
    from fmask.fisher import mask_profile_from_file, plot_mask_profile

    plot_mask_profile(mask_profile_from_file(mask), path)
    return True


def run_plot(*, results_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
             target_accuracy: Optional[float] = None) -> PlotResult:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FmaskError(f"results directory {results_dir} does not exist; pass the directory your runs write to")
    runs = collect_runs(results_dir)
    if runs.empty:
        raise FmaskError(f"no {paths.METRICS_CSV} found below {results_dir}; run `fmask train` into it first")
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    figures = [out_dir / paths.LEARNING_CURVES_PNG, out_dir / paths.CLASS_PICKS_PNG]
    plot_learning_curves(runs, figures[0])
    plot_class_picks(runs, pool_classes(results_dir), figures[1])
    timings = read_timings(results_dir)
    if not timings.empty and (timings["strategy"] != "-").any():
        figures.append(out_dir / paths.STEP_TIMES_PNG)
        plot_step_times(timings, figures[-1])
    if plot_mask_profiles(results_dir, out_dir / paths.MASK_PROFILE_PNG):
        figures.append(out_dir / paths.MASK_PROFILE_PNG)
    summary = summarize(runs, target_accuracy)
    summary_csv = out_dir / paths.SUMMARY_CSV
    atomic_write_bytes(summary_csv, summary.to_csv(index=False).encode())
    return PlotResult(runs, summary, figures, summary_csv, evaluation_notes(runs))
