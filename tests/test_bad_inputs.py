"""Every bad input gets exit code 2, one clear line on stderr, no traceback, and leaves the files untouched."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch

from tests.conftest import TINY_COUNTS, invoke, snapshot


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def make_labeled(run, name, **changes):
    target = run / name
    shutil.copyfile(run / "pool" / "labeled.json", target)
    edit_json(target, **changes)
    return target


def make_query(run, name="q.json", **changes):
    assert invoke("query", "--ckpt", run / "round0.pt", "--strategy", "random", "--batch", "3", "--device", "cpu",
                  "--out", run / name).exit_code == 0
    if changes:
        edit_json(run / name, **changes)
    return run / name


def answers(run, text):
    path = run / "answers.csv"
    path.write_text(text)
    return path


def pickle_bomb_checkpoint(run):
    """A .pt whose pickle would run code when unpickled without weights_only."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {run / 'pwned'}",))

    torch.save({"kind": "checkpoint", "payload": Payload()}, run / "evil.pt")
    return run / "evil.pt"


def other_pool(run):
    assert invoke("build-pool", "--dataset", "digits", "--class-counts", TINY_COUNTS, "--initial", "20", "--seed", "9",
                  "--out", run / "pool9").exit_code == 0
    return run / "pool9"


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bit_flipped_zip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# Each case: (id, function(run) -> argv, expected word in the message)
CASES = [
    ("missing-pool", lambda r: ["train", "--pool", r / "nope", "--out", r / "x.pt"], "build-pool"),
    ("corrupt-manifest", lambda r: (r / "pool" / "manifest.json").write_text("{not json") and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], "manifest"),
    ("truncated-image-cache", lambda r: truncated(r / "pool" / "images.safetensors") and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], "images.safetensors"),
    ("unknown-model", lambda r: ["train", "--pool", r / "pool", "--model", "vgg99", "--out", r / "x.pt"], "model"),
    ("unknown-torchvision-model", lambda r: ["train", "--pool", r / "pool", "--model", "torchvision:nope",
                                             "--out", r / "x.pt"], "torchvision"),
    ("labels-outside-classes", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                          make_labeled(r, "l.json", labels=[12] * 20)], "label 12"),
    ("duplicate-ids", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                 make_labeled(r, "l.json", ids=[json.loads((r / "pool" / "labeled.json").read_text())["ids"][0]] * 20)],
     "twice"),
    ("labeled-from-another-pool", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                             make_labeled(r, "l.json", pool="0" * 64)], "another pool"),
    ("ids-outside-pool", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                    make_labeled(r, "l.json", ids=list(range(100000, 100020)))], "not in the pool"),
    ("missing-checkpoint", lambda r: ["query", "--ckpt", r / "none.pt", "--batch", "3", "--out", r / "q.json"], "train"),
    ("truncated-checkpoint", lambda r: ["query", "--ckpt", truncated(r / "round0.pt"), "--batch", "3",
                                        "--out", r / "q.json"], "checkpoint"),
    ("bit-flipped-checkpoint", lambda r: ["query", "--ckpt", bit_flipped_zip(r / "round0.pt"), "--batch", "3",
                                          "--out", r / "q.json"], "checkpoint"),
    ("pickle-payload-checkpoint", lambda r: ["query", "--ckpt", pickle_bomb_checkpoint(r), "--batch", "3",
                                             "--out", r / "q.json"], "unpickle"),
    ("checkpoint-from-another-pool", lambda r: ["query", "--ckpt", r / "round0.pt", "--pool", other_pool(r),
                                                "--batch", "3", "--out", r / "q.json"], "another pool"),
    ("batch-larger-than-pool", lambda r: ["query", "--ckpt", r / "round0.pt", "--batch", "1000",
                                          "--out", r / "q.json"], "--batch"),
    ("batch-zero", lambda r: ["query", "--ckpt", r / "round0.pt", "--batch", "0", "--out", r / "q.json"], "--batch"),
    ("unknown-strategy", lambda r: ["query", "--ckpt", r / "round0.pt", "--strategy", "oracle", "--batch", "3",
                                    "--out", r / "q.json"], "strategy"),
    ("unknown-dataset", lambda r: ["build-pool", "--dataset", "imagenet", "--out", r / "p2"], "dataset"),
    ("dataset-folder-missing", lambda r: ["build-pool", "--dataset", f"folder:{r / 'nowhere'}", "--out", r / "p2"],
     "does not exist"),
    ("class-counts-too-large", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", "500,10",
                                          "--out", r / "p2"], "class 0"),
    ("class-counts-malformed", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", "ten,5",
                                          "--out", r / "p2"], "class-counts"),
    ("too-many-classes", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", ",".join(["5"] * 11),
                                    "--out", r / "p2"], "classes"),
    ("initial-larger-than-pool", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", "5,5",
                                            "--initial", "50", "--out", r / "p2"], "--initial"),
    ("missing-query", lambda r: ["label", "--query", r / "none.json", "--out", r / "l1.json"], "query"),
    ("query-with-duplicate-ids", lambda r: ["label", "--query", make_query(r, selected=[1, 1, 2]),
                                            "--out", r / "l1.json"], "twice"),
    ("answer-unknown-class", lambda r: ["label", "--query", (q := make_query(r)), "--out", r / "l1.json", "--answers",
                                        answers(r, f"sample_id,label\n{json.loads(q.read_text())['selected'][0]},giraffe\n")],
     "unknown label"),
    ("answer-id-not-in-query", lambda r: ["label", "--query", make_query(r), "--out", r / "l1.json", "--answers",
                                          answers(r, "sample_id,label\n999999,1\n")], "not in the query"),
    ("answer-conflicting-duplicates", lambda r: ["label", "--query", (q := make_query(r)), "--out", r / "l1.json",
                                                 "--answers", answers(r, "sample_id,label\n{0},1\n{0},2\n".format(
                                                     json.loads(q.read_text())["selected"][0]))], "conflicting"),
    ("plot-nothing", lambda r: ["plot", r / "pool"], "metrics.csv"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(case, run_dir, tiny_run):
    _, make_args, expected = case
    args = make_args(run_dir)
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before
    assert not (run_dir / "pwned").exists()
