"""The Markdown tables of docs/results.md, from what `fmask plot` wrote and the per-run metrics.csv files.

    python docs/results/tables.py docs/results/setting1-low [--cap 300]

Prints the summary with intervals and paired tests (summary.csv), the query rounds whose training stopped at the
epoch cap below the target training accuracy, each strategy's share of picks outside the pool's largest class, and
the median time per query round of each step (the runs' timings.csv).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def interval(mean: float, low: float, high: float, *, signed: bool = False) -> str:
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{form.format(mean)} [{form.format(low)}, {form.format(high)}]"


def paired(row: pd.Series, against: str) -> str:
    if row["strategy"] == against or pd.isna(row.get(f"auc_vs_{against}_mean")):
        return "—"
    p = row[f"auc_vs_{against}_p"]
    return (f"{interval(row[f'auc_vs_{against}_mean'], row[f'auc_vs_{against}_ci_low'], row[f'auc_vs_{against}_ci_high'], signed=True)}"
            f", p = {p:.3f}, {int(row[f'wins_vs_{against}'])}/{int(row[f'paired_seeds_vs_{against}'])}")


def summary_table(summary: pd.DataFrame, first: int, last: int) -> list[str]:
    lines = [f"| strategy | seeds | final accuracy ({last} labels) [95% CI] | AUC ({first}–{last}) [95% CI] "
             "| AUC − random [95% CI], p, wins | AUC − fishermask [95% CI], p, wins |",
             "|---|---|---|---|---|---|"]
    for _, row in summary.sort_values("auc_mean", ascending=False).iterrows():
        lines.append(
            f"| {row['strategy']} | {int(row['runs'])} "
            f"| {interval(row['final_accuracy_mean'], row['final_accuracy_ci_low'], row['final_accuracy_ci_high'])} "
            f"| {interval(row['auc_mean'], row['auc_ci_low'], row['auc_ci_high'])} "
            f"| {paired(row, 'random')} | {paired(row, 'fishermask')} |")
    return lines


def cap_table(rounds: pd.DataFrame, cap: int) -> list[str]:
    at_cap = rounds[(rounds["epochs"] >= cap) & (rounds["train_accuracy"] < rounds["target"])]
    counts = rounds.assign(hit=rounds.index.isin(at_cap.index)).groupby("strategy")["hit"].agg(["sum", "size"])
    lines = [f"{len(at_cap)} of {len(rounds)} query-round trainings stopped at the {cap}-epoch cap; per strategy: "
             + ", ".join(f"{name} {int(r['sum'])}/{int(r['size'])}" for name, r in counts.iterrows()) + ".", "",
             "| strategy | labels | seeds (training accuracy reached) |", "|---|---|---|"]
    for (strategy, labeled), group in at_cap.groupby(["strategy", "labeled"]):
        seeds = ", ".join(f"{int(r.seed)} ({r.train_accuracy:.3f})" for r in group.sort_values("seed").itertuples())
        lines.append(f"| {strategy} | {labeled} | {seeds} |")
    return lines


def share_table(runs: list[pd.DataFrame]) -> list[str]:
    initial = [json.loads(run[run["round"] == 0].iloc[0]["labeled_counts"]) for run in runs]
    largest = max(range(len(initial[0])), key=lambda c: sum(counts[c] for counts in initial))
    shares: dict[str, list[float]] = {}
    for run, start in zip(runs, initial):
        end = json.loads(run[run["round"] == run["round"].max()].iloc[0]["labeled_counts"])
        picks = [b - a for a, b in zip(start, end)]
        shares.setdefault(run["strategy"].iloc[-1], []).append((sum(picks) - picks[largest]) / sum(picks))
    lines = ["| strategy | share of picks outside the largest class (mean over seeds) |", "|---|---|"]
    for strategy, values in sorted(shares.items(), key=lambda item: -sum(item[1]) / len(item[1])):
        lines.append(f"| {strategy} | {sum(values) / len(values):.0%} |")
    return lines


def cost_table(timings: pd.DataFrame) -> list[str]:
    """Median seconds per query round of each step, per strategy (run.py's timings.csv)."""
    rounds = timings[timings["round"] > 0]
    medians = rounds.pivot_table(index="strategy", columns="step", values="seconds", aggfunc="median")
    steps = [step for step in ("fisher", "query", "train") if step in medians.columns]
    lines = ["| strategy | " + " | ".join(f"{step} (s, median)" for step in steps) + " |",
             "|---" * (len(steps) + 1) + "|"]
    for strategy, row in medians.iterrows():
        lines.append(f"| {strategy} | " + " | ".join("—" if pd.isna(row[step]) else f"{row[step]:.1f}"
                                                    for step in steps) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the `fmask plot --out` folder, with the runs under runs/")
    parser.add_argument("--cap", type=int, default=300, help="the runs' epoch cap (--epochs)")
    parser.add_argument("--target", type=float, default=0.99, help="the runs' target training accuracy")
    args = parser.parse_args()
    summary = pd.read_csv(args.folder / "summary.csv")
    runs = [pd.read_csv(path) for path in sorted((args.folder / "runs").glob("*/seed*/*/metrics.csv"))]
    rounds = pd.concat(runs, ignore_index=True)
    labels = sorted(rounds["labeled"].unique())  # round 0 included: the AUC covers it
    rounds = rounds[rounds["round"] > 0].assign(target=args.target)
    lines = summary_table(summary, int(labels[0]), int(labels[-1])) + [""] + cap_table(rounds, args.cap)
    timings = [pd.read_csv(path) for path in sorted((args.folder / "runs").glob("*/timings.csv"))]
    lines += [""] + share_table(runs)
    if timings:
        lines += [""] + cost_table(pd.concat(timings, ignore_index=True))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
