"""Every bad input gets exit code 2, one clear line on stderr, no traceback, and leaves the files untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmask.core import paths
from fmask.core.hashing import seal_json
from tests.conftest import TINY_COUNTS, invoke, refused_line, snapshot


def edit_json(path, **changes):
    """A well-formed but hostile artifact: edited and re-sealed, so the check under test (not the seal) refuses it."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(seal_json(data)))


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


def flip_last_digit(path, key):
    """Flip the lowest bit of the last digit of the first number after ``"key"``: still valid JSON, one value off
    by one (a label 3 that reads 2, a sample id, a normalisation mean): only a content hash can tell."""
    text = path.read_text()
    start = text.index(f'"{key}"')
    digits = re.compile(r"\d+").search(text, start)
    position = digits.end() - 1
    path.write_text(text[:position] + chr(ord(text[position]) ^ 1) + text[position + 1:])
    return path


def flipped_inside(path, needle: bytes):
    """Flip one bit inside the first occurrence of ``needle`` (e.g. a key of a checkpoint's pickled metadata)."""
    data = bytearray(path.read_bytes())
    data[data.index(needle) + 1] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def forged_checkpoint(run, name, change):
    """A checkpoint whose weights ``change(state_dict)`` edits and whose weights hash is recomputed to match, so
    only the checks after the hash (finite weights, finite outputs) stand between it and a query."""
    from fmask.train.checkpoint import weights_sha256

    state = torch.load(run / "round0.pt", weights_only=True)
    change(state["state_dict"])
    state["weights_sha256"] = weights_sha256(state["state_dict"])
    torch.save(state, run / name)
    return run / name


def set_first(key, value):
    def change(weights):
        weights[key].view(-1)[0] = value
    return change


def overflowing(weights):
    weights["fc.weight"] *= 1e30  # finite weights whose activations overflow to inf, so softmax gives NaN
    weights["head.weight"] *= 1e30


def folder_with_empty_class(run):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (run / "folder" / split / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(run / "folder" / split / "cat" / f"{i}.png")
    Image.new("RGB", (8, 8)).save(run / "folder" / "test" / "dog" / "0.png")  # train/dog/ stays empty
    return f"folder:{run / 'folder'}"


def regular_file(run):
    (run / "afile").write_text("not a directory")
    return run / "afile"


def read_only_directory(run):
    (run / "locked").mkdir()
    os.chmod(run / "locked", 0o500)
    return run / "locked"


def fisher_mask(run):
    assert invoke("fisher", "--ckpt", run / "round0.pt", "--out", run / "mask.safetensors", "--sparsity", "0.05",
                  "--no-embeddings", "--device", "cpu").exit_code == 0
    return run / "mask.safetensors"


def trained(run, name, *args, pool=None):
    assert invoke("train", "--pool", pool or run / "pool", "--model", "cnn", "--epochs", "1", "--device", "cpu",
                  "--out", run / name, *args).exit_code == 0
    return run / name


def three_class_checkpoint(run):
    """A checkpoint of another architecture instance: the small CNN with a 3-class head, on a 3-class pool."""
    assert invoke("build-pool", "--dataset", "digits", "--class-counts", "8,8,8", "--initial", "6",
                  "--out", run / "pool3").exit_code == 0
    return trained(run, "three.pt", pool=run / "pool3")


def mask_recorded_for(run, ckpt, *, rename_parameters=False):
    """round0.pt's mask, edited to record ``ckpt``'s hash (sha256 of the file) as its checkpoint, so the checkpoint
    check passes and only the architecture guards stand between it and the embeddings; ``rename_parameters``:
    every parameter renamed as well (same shapes, other names). The step key is kept: `fmask fisher` with the
    same options takes the mask as current."""
    source = fisher_mask(run)
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata["checkpoint"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if rename_parameters:
        renamed = {name: f"other_{name}" for name in json.loads(metadata["parameters"])}
        tensors = {f"{kind}.{renamed[name]}": value
                   for key, value in tensors.items() for kind, name in [key.split(".", 1)]}
        metadata["parameters"] = json.dumps(list(renamed.values()))
    target = run / ("renamed_mask.safetensors" if rename_parameters else "foreign_mask.safetensors")
    save_file(tensors, str(target), metadata=metadata)
    source.unlink()  # the refused command must leave exactly this directory
    return target


# Each case: (id, function(run) -> argv, expected word in the message)
CASES = [
    ("missing-pool", lambda r: ["train", "--pool", r / "nope", "--out", r / "x.pt"], "build-pool"),
    ("corrupt-manifest", lambda r: (r / "pool" / "manifest.json").write_text("{not json") and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], "manifest"),
    ("truncated-image-cache", lambda r: truncated(r / "pool" / paths.POOL_IMAGES) and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], paths.POOL_IMAGES),
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
    # Bits flipped on disk: caught by the image cache's hash, the JSON seals, the checkpoint's zip checksums.
    ("bit-flipped-image-cache", lambda r: bit_flipped_zip(r / "pool" / paths.POOL_IMAGES) and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], "does not match its manifest"),
    ("bit-flipped-manifest-normalization", lambda r: flip_last_digit(r / "pool" / "manifest.json", "mean") and
     ["train", "--pool", r / "pool", "--out", r / "x.pt"], "changed after fmask wrote it"),
    ("bit-flipped-labeled-set-label", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                                 flip_last_digit(make_labeled(r, "l.json"), "labels")],
     "changed after fmask wrote it"),
    ("bit-flipped-query-id", lambda r: ["label", "--query", flip_last_digit(make_query(r), "selected"),
                                        "--out", r / "l1.json"], "changed after fmask wrote it"),
    ("bit-flipped-checkpoint-metadata", lambda r: ["query", "--ckpt", flipped_inside(r / "round0.pt", b"accuracy"),
                                                   "--batch", "3", "--out", r / "q.json"], "zip checksums"),
    ("deeply-nested-json", lambda r: (r / "l.json").write_text("[" * 100000) and
     ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled", r / "l.json"], "not valid JSON"),
    # Numbers that are not numbers.
    ("nan-weights-with-matching-hash", lambda r: ["query", "--ckpt", forged_checkpoint(
        r, "nan.pt", set_first("conv1.weight", float("nan"))), "--batch", "3", "--out", r / "q.json"],
     "NaN or infinite"),
    ("inf-weights-with-matching-hash", lambda r: ["query", "--ckpt", forged_checkpoint(
        r, "inf.pt", set_first("head.bias", float("inf"))), "--batch", "3", "--out", r / "q.json"], "NaN or infinite"),
    ("nan-scores-from-overflowing-outputs", lambda r: ["query", "--ckpt", forged_checkpoint(r, "big.pt", overflowing),
                                                       "--strategy", "entropy", "--batch", "3", "--device", "cpu",
                                                       "--out", r / "q.json"], "scored candidates NaN"),
    # Empty classes, missing datasets, ids out of range.
    ("class-counts-with-zero", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", "5,0,5",
                                          "--out", r / "p2"], "positive"),
    ("folder-with-an-empty-class", lambda r: ["build-pool", "--dataset", folder_with_empty_class(r), "--initial", "1",
                                              "--out", r / "p2"], "class 1 (dog) would have no samples"),
    ("cifar10-root-missing", lambda r: ["build-pool", "--dataset", "cifar10", "--root", r / "no-data",
                                        "--out", r / "p2"], "not found"),
    ("query-ids-out-of-range", lambda r: ["label", "--query", make_query(r, selected=[10**9, -1, 5]),
                                          "--out", r / "l1.json"], "not in the pool"),
    ("labeled-negative-id", lambda r: ["train", "--pool", r / "pool", "--out", r / "x.pt", "--labeled",
                                       make_labeled(r, "l.json", ids=[-1] + json.loads(
                                           (r / "pool" / "labeled.json").read_text())["ids"][1:])], "not in the pool"),
    # Outputs that cannot be written (as root, chmod stops nothing: a path below a regular file stops everyone).
    ("train-out-below-a-file", lambda r: ["train", "--pool", r / "pool", "--out", regular_file(r) / "x.pt"],
     "is a file"),
    ("query-out-below-a-file", lambda r: ["query", "--ckpt", r / "round0.pt", "--batch", "3",
                                          "--out", regular_file(r) / "q.json"], "is a file"),
    ("pool-out-below-a-file", lambda r: ["build-pool", "--dataset", "digits", "--out", regular_file(r) / "pool"],
     "is a file"),
    pytest.param(("out-in-a-read-only-directory", lambda r: ["train", "--pool", r / "pool",
                                                             "--out", read_only_directory(r) / "x.pt"], "writable"),
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500; the "
                                          "*-out-below-a-file cases cover unwritable outputs as root")),
    # Masks that belong to another model.
    ("mask-from-another-checkpoint", lambda r: ["query", "--ckpt", trained(r, "seed1.pt", "--seed", "1"),
                                                "--strategy", "fishermask", "--mask", fisher_mask(r), "--batch", "3",
                                                "--device", "cpu", "--out", r / "q.json"], "another checkpoint"),
    # Another architecture's mask also comes from another checkpoint, and that check refuses it first ...
    ("mask-from-another-architecture-and-checkpoint", lambda r: [
        "query", "--ckpt", three_class_checkpoint(r), "--strategy", "fishermask", "--mask", fisher_mask(r),
        "--batch", "3", "--device", "cpu", "--out", r / "q.json"], "another checkpoint"),
    # ... so these masks record the checkpoint they are used with, and the architecture guards must refuse them:
    # other parameter shapes (the 3-class head), other parameter names; in `fmask query` and in `fmask fisher`
    # (which takes the mask as current and goes on to its embeddings).
    ("mask-of-other-parameter-shapes", lambda r: [
        "query", "--ckpt", three_class_checkpoint(r), "--strategy", "fishermask",
        "--mask", mask_recorded_for(r, r / "three.pt"), "--batch", "3", "--device", "cpu", "--out", r / "q.json"],
     "another architecture"),
    ("mask-of-other-parameter-names", lambda r: [
        "query", "--ckpt", r / "round0.pt", "--strategy", "fishermask",
        "--mask", mask_recorded_for(r, r / "round0.pt", rename_parameters=True), "--batch", "3", "--device", "cpu",
        "--out", r / "q.json"], "another architecture"),
    ("fisher-over-a-mask-of-other-parameter-names", lambda r: [
        "fisher", "--ckpt", r / "round0.pt", "--out", mask_recorded_for(r, r / "round0.pt", rename_parameters=True),
        "--sparsity", "0.05", "--device", "cpu"], "another architecture"),
]


def case_id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case)[0]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(case, run_dir, tiny_run):
    _, make_args, expected = case
    args = make_args(run_dir)
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    line = refused_line(invoke(*args))
    assert expected.lower() in line.lower(), line
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before
    assert not (run_dir / "pwned").exists()


# A full disk, simulated in-process: the rename that would publish each artifact fails with ENOSPC (the real
# thing, on a tiny tmpfs, is in tests/test_reliability.py where mounting is allowed).
DISK_FULL = [
    ("build-pool", lambda r: ["build-pool", "--dataset", "digits", "--class-counts", "5,5", "--initial", "2",
                              "--out", r / "p2"]),
    ("train", lambda r: ["train", "--pool", r / "pool", "--model", "cnn", "--epochs", "1", "--device", "cpu",
                         "--out", r / "x.pt"]),
    ("query", lambda r: ["query", "--ckpt", r / "round0.pt", "--batch", "3", "--device", "cpu", "--out", r / "q.json"]),
    ("label", lambda r: ["label", "--query", make_query(r), "--out", r / "l1.json"]),
    ("export", lambda r: ["export", "--query", make_query(r), "--device", "cpu", "--out", r / "batch"]),
    ("run", lambda r: ["run", "--out", r / "res", "--dataset", "digits", "--class-counts", "5,5", "--initial", "2",
                       "--batch", "2", "--rounds", "1", "--strategies", "random", "--epochs", "1", "--device", "cpu"]),
]


@pytest.mark.parametrize("case", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_disk_full_exit_2_one_line_nothing_written(case, run_dir, tiny_run, monkeypatch):
    _, make_args = case
    args = make_args(run_dir)
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    result = invoke(*args)
    monkeypatch.undo()
    assert "No space left on device" in refused_line(result)
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted({name.split("/")[0] for name in before})
