"""CLI round trips through every staged command on tiny data."""

from __future__ import annotations

import json

import pandas as pd
import torch

from fmask import load_model, load_pool
from fmask.core.hashing import sha256_file
from tests.conftest import invoke


def test_round_trip_build_train_query_label_train_plot(run_dir):
    pool = load_pool(run_dir / "pool")
    assert len(pool.ids) == 112 and pool.num_classes == 10
    manifest = json.loads((run_dir / "pool" / "manifest.json").read_text())
    assert manifest["class_counts"] == [8] * 9 + [40]

    result = invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "entropy", "--batch", "10",
                    "--out", run_dir / "query0.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    query = json.loads((run_dir / "query0.json").read_text())
    for key in ("strategy", "batch", "selected", "scores", "seconds", "inputs"):
        assert key in query
    assert query["inputs"]["checkpoint"] == sha256_file(run_dir / "round0.pt")
    labeled0 = json.loads((run_dir / "pool" / "labeled.json").read_text())
    assert len(query["selected"]) == 10 and not set(query["selected"]) & set(labeled0["ids"])
    assert query["scores"] == sorted(query["scores"], reverse=True)  # entropy: most uncertain first

    result = invoke("label", "--query", run_dir / "query0.json", "--out", run_dir / "labeled1.json")
    assert result.exit_code == 0, result.output
    labeled1 = json.loads((run_dir / "labeled1.json").read_text())
    assert labeled1["ids"] == labeled0["ids"] + query["selected"]
    assert labeled1["labels"][20:] == pool.labels(query["selected"]).tolist()
    assert labeled1["rounds"] == [0] * 20 + [1] * 10 and labeled1["sources"][20:] == ["oracle"] * 10

    result = invoke("train", "--pool", run_dir / "pool", "--labeled", run_dir / "labeled1.json", "--model", "cnn",
                    "--epochs", "2", "--device", "cpu", "--out", run_dir / "round1.pt")
    assert result.exit_code == 0, result.output
    checkpoint = torch.load(run_dir / "round1.pt", weights_only=True)
    for key in ("accuracy", "balanced_accuracy", "per_class_accuracy"):
        assert key in checkpoint["metrics"]
    assert len(checkpoint["metrics"]["per_class_accuracy"]) == 10
    assert checkpoint["pool_hash"] == pool.hash and checkpoint["arch"] == "cnn"
    assert checkpoint["labeled_hash"] == sha256_file(run_dir / "labeled1.json")
    model = load_model(run_dir / "round1.pt")
    assert not model.training and model(pool.inputs(pool.ids[:3])).shape == (3, 10)

    result = invoke("plot", run_dir)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["strategy"].tolist() == ["entropy"]
    png = (run_dir / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_unchanged_step_is_skipped_and_force_reruns(run_dir):
    args = ["query", "--ckpt", run_dir / "round0.pt", "--strategy", "random", "--batch", "5", "--out",
            run_dir / "q.json", "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    first = (run_dir / "q.json").read_bytes()
    again = invoke(*args)
    assert "unchanged, skipped" in again.output and (run_dir / "q.json").read_bytes() == first
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0 and "unchanged, skipped" not in forced.output
    # Another seed is another input: the step runs and picks other ids.
    assert invoke(*args[:-2], "--out", run_dir / "q.json", "--device", "cpu", "--seed", "1").exit_code == 0
    assert json.loads((run_dir / "q.json").read_text())["selected"] != json.loads(first)["selected"]


def test_training_is_reproducible_under_a_seed(tiny_run, tmp_path):
    outs = []
    for name in ("a.pt", "b.pt"):
        result = invoke("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "2", "--seed", "3",
                        "--device", "cpu", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        outs.append(torch.load(tmp_path / name, weights_only=True))
    for key, value in outs[0]["state_dict"].items():
        assert torch.equal(value, outs[1]["state_dict"][key]), key
    assert outs[0]["metrics"]["accuracy"] == outs[1]["metrics"]["accuracy"]


def test_human_answers_csv_labels_by_name_or_index(run_dir):
    invoke("query", "--ckpt", run_dir / "round0.pt", "--strategy", "margin", "--batch", "4", "--out",
           run_dir / "q.json", "--device", "cpu")
    selected = json.loads((run_dir / "q.json").read_text())["selected"]
    answers = run_dir / "answers.csv"
    answers.write_text(f"sample_id,label\n{selected[0]},3\n{selected[1]},7\n{selected[2]},7\n")
    result = invoke("label", "--query", run_dir / "q.json", "--answers", answers, "--out", run_dir / "l1.json")
    assert result.exit_code == 0, result.output
    labeled = json.loads((run_dir / "l1.json").read_text())
    assert labeled["ids"][-3:] == selected[:3] and labeled["labels"][-3:] == [3, 7, 7]
    assert labeled["sources"][-3:] == ["human"] * 3
    assert "stay unlabeled" in result.output and str(selected[3]) in result.output


def test_build_pool_settings_and_provenance(tmp_path):
    result = invoke("build-pool", "--dataset", "digits", "--setting", "balanced", "--initial", "10",
                    "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    pool = load_pool(tmp_path / "p")
    assert len(pool.ids) == 1348 and len(pool.test_labels) == 449
    x = pool.inputs(pool.ids[:50])
    assert x.dtype == torch.float32 and x.shape == (50, 1, 8, 8)
    # Normalisation uses the pool's own statistics.
    assert abs(float(pool.inputs(pool.ids).mean())) < 1e-3
    # Same seed, same pool; another seed, another initial set.
    invoke("build-pool", "--dataset", "digits", "--initial", "10", "--seed", "1", "--out", tmp_path / "q")
    a = json.loads((tmp_path / "p" / "labeled.json").read_text())["ids"]
    b = json.loads((tmp_path / "q" / "labeled.json").read_text())["ids"]
    assert a != b
