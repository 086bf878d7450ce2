"""`fmask plot`'s statistics: bootstrap intervals against a literal numpy resampling, Wilcoxon p-values against a
brute-force enumeration of the sign flips (and scipy), and the summary's columns against both on synthetic runs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fmask.plot.plot import bootstrap_interval, summarize, summary_for_display, summary_notes, wilcoxon_p


def literal_bootstrap(values, resamples=10_000, seed=0):
    """Resample the seeds with replacement, mean each resample, take the 2.5th and 97.5th percentiles."""
    values = np.asarray(values, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return tuple(np.percentile(values[rows].mean(axis=1), [2.5, 97.5]))


def enumerated_wilcoxon(differences):
    """Exact two-sided p by enumerating all 2^n sign assignments of the ranks (no zeros, no ties)."""
    d = np.asarray(differences, dtype=float)
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))])
    lower, upper = (sums <= observed).mean(), (sums >= observed).mean()
    return min(1.0, 2 * min(lower, upper))


@pytest.mark.parametrize("values", [[0.51, 0.48, 0.55, 0.50, 0.47, 0.53], [0.3, 0.9], list(np.linspace(0, 1, 11))])
def test_bootstrap_interval_is_the_literal_percentile_bootstrap(values):
    low, high = bootstrap_interval(np.array(values))
    assert (low, high) == pytest.approx(literal_bootstrap(values), abs=1e-12)
    assert low <= np.mean(values) <= high
    assert bootstrap_interval(np.array([0.4])) == (0.4, 0.4)


@pytest.mark.parametrize("seed,n", [(0, 6), (1, 7), (2, 8), (3, 5)])
def test_wilcoxon_p_is_the_exact_enumeration(seed, n):
    differences = np.random.default_rng(seed).normal(0.01, 0.02, size=n)
    assert wilcoxon_p(differences) == pytest.approx(enumerated_wilcoxon(differences), abs=1e-12)
    assert wilcoxon_p(np.zeros(n)) != wilcoxon_p(np.zeros(n))  # nan: nothing differs


def test_fewer_than_six_seeds_cannot_reach_p_below_005():
    assert wilcoxon_p(np.array([0.01, 0.02, 0.03, 0.04, 0.05])) == pytest.approx(2 / 2**5)
    assert wilcoxon_p(np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])) == pytest.approx(2 / 2**6)


def _runs(seeds: int) -> pd.DataFrame:
    """Three strategies × ``seeds`` seeds × three rounds of synthetic accuracies."""
    rng = np.random.default_rng(7)
    rows = []
    for strategy, lift in (("random", 0.0), ("fishermask", 0.03), ("margin", 0.02)):
        for seed in range(seeds):
            for round_, labeled in enumerate((100, 200, 400)):
                accuracy = 0.4 + 0.1 * round_ + lift * round_ + rng.normal(0, 0.01)
                rows.append({"strategy": strategy, "run": f"s{seed}|{strategy}", "seed": seed, "round": round_,
                             "labeled": labeled, "accuracy": accuracy, "balanced_accuracy": accuracy})
    return pd.DataFrame(rows)


def _literal_auc(group: pd.DataFrame) -> float:
    x, y = group["labeled"].to_numpy(float), group["accuracy"].to_numpy(float)
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)) / (x[-1] - x[0]))


def test_summary_intervals_and_paired_tests_match_the_references():
    runs = _runs(seeds=7)
    summary = summarize(runs).set_index("strategy")
    auc = {s: np.array([_literal_auc(g.sort_values("labeled")) for _, g in runs[runs["strategy"] == s].groupby("seed")])
           for s in ("random", "fishermask", "margin")}
    final = {s: runs[(runs["strategy"] == s) & (runs["labeled"] == 400)].sort_values("seed")["accuracy"].to_numpy()
             for s in auc}
    for strategy in auc:
        row = summary.loc[strategy]
        assert (row["auc_ci_low"], row["auc_ci_high"]) == pytest.approx(literal_bootstrap(auc[strategy]), abs=1e-12)
        assert (row["final_accuracy_ci_low"], row["final_accuracy_ci_high"]) == pytest.approx(
            literal_bootstrap(final[strategy]), abs=1e-12)
    for reference in ("random", "fishermask"):
        diff = auc["margin"] - auc[reference]
        row = summary.loc["margin"]
        assert row[f"auc_vs_{reference}_mean"] == pytest.approx(diff.mean())
        assert (row[f"auc_vs_{reference}_ci_low"], row[f"auc_vs_{reference}_ci_high"]) == pytest.approx(
            literal_bootstrap(diff), abs=1e-12)
        assert row[f"auc_vs_{reference}_p"] == pytest.approx(enumerated_wilcoxon(diff), abs=1e-12)
        assert row[f"auc_vs_{reference}_p"] == pytest.approx(stats.wilcoxon(diff, method="exact").pvalue)
        assert row[f"wins_vs_{reference}"] == int((diff > 0).sum()) and row[f"paired_seeds_vs_{reference}"] == 7
    assert summary.loc["random", "auc_vs_random_mean"] == 0.0 and np.isnan(summary.loc["random", "auc_vs_random_p"])
    table = summary_for_display(summarize(runs))
    assert {"AUC [95% CI]", "final accuracy [95% CI]", "AUC vs random", "AUC vs fishermask"} <= set(table.columns)
    assert len(summary_notes(summarize(runs))) == 1  # seven seeds: no warning about p


def test_the_note_says_when_too_few_seeds_make_p_meaningless():
    notes = summary_notes(summarize(_runs(seeds=3)))
    assert any("fewer than 6" in note for note in notes)


def test_the_mask_profile_uses_the_last_rounds_mask_found_by_name_not_by_mtime(tmp_path):
    import os

    from fmask.core import paths
    from fmask.plot.plot import last_mask

    assert last_mask(tmp_path) is None
    chain = paths.run_chain(tmp_path, 0, "fishermask")
    chain.mkdir(parents=True)
    newer = [paths.chain_mask(chain, 0), paths.chain_mask(chain, 2), paths.chain_mask(tmp_path / "seed0" / "bait", 1),
             paths.embeddings_cache(paths.chain_mask(chain, 11)),
             paths.feature_cache(tmp_path / "seed0" / "pool", "ab" * 8)]
    for age, path in enumerate([paths.chain_mask(chain, 10), *newer]):  # round 10's mask is the oldest file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    assert last_mask(tmp_path) == chain / "fisher10.safetensors"
    (tmp_path / "mask.safetensors").write_bytes(b"")  # a hand-named mask without a round comes before every round
    assert last_mask(tmp_path) == chain / "fisher10.safetensors"
    assert last_mask(tmp_path / "seed0" / "bait") == tmp_path / "seed0" / "bait" / "fisher1.safetensors"
