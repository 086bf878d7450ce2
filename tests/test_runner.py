"""`fmask run`: reruns, configurations and presets; `fmask plot` on it. Resuming after SIGKILL is tested in
tests/test_reliability.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fmask.run.experiment import preset_config
from tests.conftest import invoke

RUN_ARGS = ["--dataset", "digits", "--class-counts", "8,8,8,8,8,8,8,8,8,40", "--initial", "10", "--batch", "6",
            "--rounds", "2", "--strategies", "random,margin", "--seeds", "0,1", "--model", "cnn", "--epochs", "2",
            "--test-per-class", "5", "--device", "cpu"]


def results_of(out: Path) -> dict:
    """Everything that must match between runs: selections, labeled sets, metrics without timings."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.name.startswith("query") and path.suffix == ".json":
            found[rel] = json.loads(path.read_text())["selected"]
        elif path.name.startswith("labeled") and path.suffix == ".json":
            data = json.loads(path.read_text())
            found[rel] = (data["ids"], data["labels"], data["rounds"])
        elif path.name == "metrics.csv":
            table = pd.read_csv(path).sort_values("checkpoint")
            found[rel] = table[["checkpoint", "strategy", "round", "labeled", "accuracy"]].values.tolist()
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "res"
    result = invoke("run", "--out", out, *RUN_ARGS)
    assert result.exit_code == 0, result.output
    return out


def test_rerun_of_a_finished_run_executes_nothing(uninterrupted):
    timings = (uninterrupted / "timings.csv").read_text()
    result = invoke("run", "--out", uninterrupted, *RUN_ARGS)
    assert result.exit_code == 0, result.output
    assert (uninterrupted / "timings.csv").read_text() == timings


def test_other_configuration_in_the_same_directory_is_refused(uninterrupted):
    result = invoke("run", "--out", uninterrupted, *RUN_ARGS[:-2], "--device", "cpu", "--batch", "7")
    assert result.exit_code == 2 and "another configuration" in result.stderr


def test_plot_of_a_run_writes_figures_and_summary(uninterrupted, tmp_path):
    result = invoke("plot", uninterrupted, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    for name in ("learning_curves.png", "class_picks.png", "step_times.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("strategy")
    assert set(summary.index) == {"random", "margin"}
    assert (summary["runs"] == 2).all() and (summary["final_labeled"] == 22).all()
    assert summary.loc["random", "auc_vs_random_mean"] == 0.0 and summary.loc["margin", "paired_seeds"] == 2
    for column in ("final_accuracy_std", "auc_std", "labels_to_target_mean", "target_accuracy"):
        assert column in summary.columns
    assert "margin" in result.output and "won)" in result.output


def test_config_file_and_presets(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text('preset = "setting2"\nsmall = true\nseeds = [0, 1, 2]\nstrategies = ["random"]\n')
    from fmask.run.experiment import config_from_options

    experiment = config_from_options(preset=None, small=False, config_file=config, overrides={"rounds": 2})
    assert experiment.model == "cnn" and experiment.seeds == [0, 1, 2] and experiment.rounds == 2
    assert experiment.setting == "setting2" and experiment.initial == 500 and experiment.batch == 500
    full = preset_config("setting1-high")
    assert full.model == "resnet18" and full.initial + full.rounds * full.batch == 5750
    assert preset_config("setting2").initial + 12 * 500 == 6500
    config.write_text("speed = 3\n")
    result = invoke("run", "--out", tmp_path / "r", "--config", config)
    assert result.exit_code == 2 and "unknown key 'speed'" in result.stderr


def test_run_refuses_a_sparsity_the_head_would_fill_before_training(tmp_path):
    from tests.conftest import refused_line

    out = tmp_path / "r"
    line = refused_line(invoke("run", "--out", out, "--dataset", "digits", "--class-counts", "8,8,8,8,8,8,8,8,8,40",
                               "--initial", "20", "--batch", "5", "--rounds", "1", "--strategies", "fishermask",
                               "--sparsity", "0.002", "--model", "cnn", "--device", "cpu"))
    assert "--sparsity 0.049 or more" in line and "--no-head" in line
    assert not (out / "seed0" / "round0.pt").exists()


@pytest.mark.slow
def test_run_records_the_fishermask_variants_under_their_own_names(tmp_path):
    from fmask.fisher import load_mask

    out = tmp_path / "variants"
    args = ["--dataset", "digits", "--class-counts", "8,8,8,8,8,8,8,8,8,40", "--initial", "10", "--batch", "4",
            "--rounds", "1", "--strategies", "fishermask,fishermask-unscaled,fishermask-m0fisher", "--seeds", "0",
            "--model", "cnn", "--epochs", "1", "--test-per-class", "3", "--sparsity", "0.05", "--device", "cpu"]
    result = invoke("run", "--out", out, *args, "--m0", "identity")
    assert result.exit_code == 0, result.output
    expected = {"fishermask": ("scaled", "identity"), "fishermask-unscaled": ("unscaled", "identity"),
                "fishermask-m0fisher": ("scaled", "fisher")}
    for strategy, (rows, m0) in expected.items():
        mask = load_mask(out / "seed0" / strategy / "fisher0.safetensors", checkpoint_hash=None)
        assert (mask.embedding_rows, mask.m0) == (rows, m0), strategy
        query = json.loads((out / "seed0" / strategy / "query0.json").read_text())
        assert query["details"] == {"embedding_rows": rows, "m0": m0}, strategy
    assert json.loads((out / "experiment.json").read_text())["config"]["embedding_rows"] == "scaled"
    result = invoke("plot", out, "--out", tmp_path / "figures")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "figures" / "summary.csv")
    assert set(summary["strategy"]) == set(expected)
