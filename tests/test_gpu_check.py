"""benchmarks/gpu_check.sh --dry-run: every stage of the prepared GPU check runs on the CPU with tiny sizes and
writes its summary, so the script cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "gpu_check.log").read_text()
    for stage in "ABCDE":
        summary = json.loads((out / f"stage_{stage}.json").read_text())
        assert summary["stage"] == stage and summary["status"] == "ok" and summary["passed"] is True
        assert summary["dry_run"] is True and summary["device"] == "cpu"
        assert f"== stage {stage} ok" in log
    b = json.loads((out / "stage_B.json").read_text())
    assert b["float64"]["masks_identical"] and b["float64"]["selection_identical"]
    assert all(b["deterministic_rerun"].values())
    e = json.loads((out / "stage_E.json").read_text())
    ran = [c["command"] for c in e["commands"] if "exit" in c]
    for step in ("build-pool", "train", "fisher", "--strategy fishermask", "--strategy bait", "--strategy badge",
                 "--strategy kcenter", "--strategy entropy", "benchmarks.train"):
        assert any(step in command for command in ran), step
    assert all(c["exit"] == 0 for c in e["commands"] if "exit" in c)


def test_a_failed_stage_still_gets_its_summary(tmp_path):
    # A stage that cannot run (here: an interpreter that fails at once) is recorded as failed, and the run goes on.
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": "false"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    for stage in "ABCDE":
        summary = json.loads((out / f"stage_{stage}.json").read_text())
        assert summary == {"stage": stage, "status": "failed", "reason": "exit code 1",
                           "seconds": summary["seconds"]}
