"""Shared fixtures: a tiny imbalanced digits pool and a quickly trained small-CNN checkpoint."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tiny models run faster on one thread than on two contending ones, and the suite stays deterministic. Set
# before torch starts; the CLI's thread policy then leaves the count alone (a user-set variable), as it would for
# a user who pinned it. Tests of the policy clear the variable themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from typer.testing import CliRunner

from fmask.cli import app
from fmask.cli.ui import PROGRESS_LINE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_CIFAR10 = SHARED / "datasets" / "cifar10"
TINY_COUNTS = "8,8,8,8,8,8,8,8,8,40"  # 112 pool samples, nine small classes and one large


def invoke(*args: str):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` with its content hash: 'byte-for-byte unchanged' checks."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused_line(result) -> str:
    """The one error line of a refused command (exit 2, no traceback). Progress lines of work done before the
    failure (stderr is not a terminal here, so progress is written as lines) are not error output."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_LINE.fullmatch(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def set_writable(tree: Path, writable: bool) -> None:
    """Add (the owner's) or remove (everyone's) write permission on ``tree`` and everything below it."""
    for path in [tree, *tree.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~WRITE_BITS)


# Modules whose every test is slow, marked here rather than in each file: process groups of gloo ranks.
SLOW_MODULES = {"test_distributed.py"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Iterator[Path]:
    """A pool, a round-0 checkpoint (cnn, few epochs) in a session directory, shared by every test: read-only
    (tests that write take the ``run_dir`` copy). Write permission is removed, so a write fails loudly where
    permissions hold; root writes through them, so the content is also checked at the end of the session."""
    root = tmp_path_factory.mktemp("tiny")
    result = invoke("build-pool", "--dataset", "digits", "--class-counts", TINY_COUNTS, "--initial", "20",
                    "--seed", "0", "--test-per-class", "10", "--out", root / "pool")
    assert result.exit_code == 0, result.output
    result = invoke("train", "--pool", root / "pool", "--model", "cnn", "--epochs", "3", "--batch-size", "16",
                    "--device", "cpu", "--out", root / "round0.pt")
    assert result.exit_code == 0, result.output
    built = snapshot(root)
    set_writable(root, False)
    yield root
    set_writable(root, True)
    assert snapshot(root) == built, "a test changed the shared tiny_run; write into the run_dir copy instead"


@pytest.fixture(scope="session")
def tiny_dropout_ckpt(tiny_run: Path, tmp_path_factory) -> Path:
    """A round-0 checkpoint of the tiny pool trained with dropout before the head (bald, batchbald)."""
    out = tmp_path_factory.mktemp("tiny_dropout") / "round0.pt"
    result = invoke("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "3", "--batch-size", "16",
                    "--device", "cpu", "--mc-dropout", "0.3", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_dir(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (checkpoint provenance still points at the shared pool)."""
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    set_writable(target, True)  # the copy keeps tiny_run's read-only modes
    return target


# Tiny models run faster on one thread than on two contending ones, and the suite stays deterministic.
torch.set_num_threads(1)
