"""Reliability: SIGKILL at write boundaries and at random times leaves only complete artifacts and resumes to
identical results; concurrent writers are refused with one line; a real full disk gives one line.

Commands run in processes forked from one "zygote" interpreter that has imported fmask and torch once, so each
of the many killed commands costs milliseconds to start instead of seconds. A killed child is SIGKILLed for
real: by the zygote on a timer, or by itself at a chosen ``os.replace`` (just before the rename: the temp file
is complete but not in place; just after: the artifact is in place, nothing after it has run) or at the N-th
optimiser step (mid-training).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from fmask.core.locking import LOCK_NAME, lock_holder, output_lock
from fmask.core.readers import read_json, read_safetensors
from fmask.plot.plot import read_timings
from fmask.pool.pool import load_pool
from fmask.train.checkpoint import load_checkpoint
from fmask.train.metrics import read_metrics
from tests.conftest import TINY_COUNTS, invoke, refused_line, snapshot
from tests.test_runner import RUN_ARGS, results_of

pytestmark = pytest.mark.slow  # real processes killed and rerun: `-m "not slow"` leaves them out

ZYGOTE = r'''
import importlib, json, os, signal, sys, time, traceback
from fmask.cli import app  # the expensive imports, once; every job is a fork of this process
for lazy in ("safetensors.torch", "pandas", "typer._adapters", "sklearn.datasets"):  # imported on first use:
    # once here, not in every job
    try:
        importlib.import_module(lazy)
    except ImportError:
        pass

def child(job):
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored: restore Ctrl-C's
    # KeyboardInterrupt so the tests that interrupt a job behave the same however the suite was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    torch.set_num_threads(job["threads"])  # as in the test process: the same float sums, the same weights
    kill = job.get("kill_at_replace")  # [the N-th rename of this job, or the rename onto this path, "before"|"after"]
    record = job.get("record_replaces")  # a file to list every rename's destination in
    if kill or record:
        real, seen = os.replace, [0]
        def replace(src, dst, *args, **kwargs):
            seen[0] += 1
            hit = kill and (seen[0] == kill[0] if isinstance(kill[0], int) else os.path.abspath(dst) == kill[0])
            if hit and kill[1] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *args, **kwargs)
            if record:
                with open(record, "a") as handle:
                    handle.write(os.path.abspath(dst) + "\n")
            if hit and kill[1] == "after":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace
    call = job.get("kill_at_call")  # [module, "Class.method" or "function", N]: SIGKILL at the N-th call
    if call:
        owner = importlib.import_module(call[0])
        *outer, name = call[1].split(".")
        for part in outer:
            owner = getattr(owner, part)
        original, calls = getattr(owner, name), [0]
        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call[2]:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, counted)
    code = 0
    try:
        if "python" in job:
            exec(job["python"], {"__name__": "__job__"})
        else:
            app(args=job["argv"], prog_name="fmask")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

started = {}

def wait(pid, kill_after):
    deadline = None if kill_after is None else started[pid] + kill_after
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
            done, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.monotonic() - started.pop(pid)
    code = os.waitstatus_to_exitcode(status)
    return {"pid": pid, "code": code, "killed": killed or code == -signal.SIGKILL, "seconds": seconds}

for line in sys.stdin:
    job = json.loads(line)
    if job["op"] == "wait":
        reply = wait(job["pid"], job.get("kill_after"))
    else:
        pid = os.fork()
        if pid == 0:
            child(job)
        started[pid] = time.monotonic()
        reply = {"pid": pid} if job["op"] == "start" else wait(pid, job.get("kill_after"))
    print(json.dumps(reply), flush=True)
'''


class Zygote:
    """Runs fmask commands (or Python snippets) in processes forked from one warm interpreter."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.jobs = 0
        self.running: set[int] = set()  # started and not yet waited for
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])

    def _send(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def _job(self, op: str, argv=None, python: Optional[str] = None, **extra) -> dict:
        self.jobs += 1
        job = {"op": op, "log": str(self.logs / f"job{self.jobs}.log"), "threads": torch.get_num_threads(), **extra}
        if python is not None:
            job["python"] = python
        else:
            job["argv"] = [str(a) for a in argv]
        return job

    def run(self, *argv, kill_after: Optional[float] = None, kill_at_replace: Optional[tuple] = None,
            kill_at_call: Optional[tuple] = None, record_replaces: Optional[Path] = None) -> dict:
        """Run a command to its end or its kill: ``kill_after`` seconds; ``kill_at_replace`` = (N or a path,
        "before" | "after"): at the N-th rename of this command or at the rename onto that path; ``kill_at_call``
        = (module, attribute, N): at the N-th call of that function. Returns pid, code, killed, seconds and the
        log text; ``record_replaces`` lists every rename's destination."""
        if kill_at_replace is not None and isinstance(kill_at_replace[0], Path):
            kill_at_replace = (str(kill_at_replace[0].resolve()), kill_at_replace[1])
        job = self._job("run", argv, kill_after=kill_after, kill_at_replace=kill_at_replace, kill_at_call=kill_at_call,
                        record_replaces=str(record_replaces) if record_replaces else None)
        reply = self._send(job)
        reply["log"] = Path(job["log"]).read_text()
        return reply

    def start(self, *argv, python: Optional[str] = None) -> int:
        """Start a command (or a Python snippet) in the background; returns its pid."""
        pid = self._send(self._job("start", argv, python=python))["pid"]
        self.running.add(pid)
        return pid

    def wait(self, pid: int, kill_after: Optional[float] = None) -> dict:
        """Wait for a started job (SIGKILLing it after ``kill_after`` seconds from its start)."""
        self.running.discard(pid)
        return self._send({"op": "wait", "pid": pid, "kill_after": kill_after})

    def close(self) -> None:
        for pid in list(self.running):  # jobs a failed test left running (e.g. lock holders)
            self.wait(pid, kill_after=0)
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    warm = Zygote(tmp_path_factory.mktemp("zygote_logs"))
    yield warm
    warm.close()


# ---- What "only complete artifacts" means -----------------------------------------------------------------------

TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\..+\.old\.[a-z0-9_]{8}")  # fmask's temp files and directories


def assert_only_complete_artifacts(root: Path) -> dict[str, int]:
    """Every visible file below ``root`` is a complete artifact that fmask's own loaders accept; hidden entries
    are only fmask's temp files and released lock files. Returns how many artifacts of each kind were checked."""
    checked = {"json": 0, "pt": 0, "safetensors": 0, "csv": 0, "pool": 0}
    for path in sorted(root.rglob("*")):
        hidden = [part for part in path.relative_to(root).parts if part.startswith(".")]
        if hidden:
            if path.name == LOCK_NAME:
                assert lock_holder(path.parent) is None, f"{path} is still held"
            else:
                assert TEMP_NAME.fullmatch(hidden[0]), f"stray hidden file {path}"
            continue
        if path.is_dir():
            if (path / "manifest.json").is_file():
                load_pool(path)  # manifest, image cache and their hashes agree
                checked["pool"] += 1
            continue
        if path.name == "label_studio_tasks.json":
            assert isinstance(json.loads(path.read_text()), list)
            checked["json"] += 1
        elif path.suffix == ".json":
            read_json(path, what="artifact", made_by="fmask")  # parses, and its content seal matches
            checked["json"] += 1
        elif path.suffix == ".pt":
            load_checkpoint(path)  # zip checksums, weights hash, finite weights, architecture
            checked["pt"] += 1
        elif path.suffix == ".safetensors":
            read_safetensors(path, what="artifact", made_by="fmask")
            checked["safetensors"] += 1
        elif path.name == "metrics.csv":
            assert len(read_metrics(path)) >= 1
            checked["csv"] += 1
        elif path.name == "timings.csv":
            read_timings(path.parent)
            checked["csv"] += 1
        elif path.suffix == ".npy":  # a pool's image or label cache: whole (numpy refuses a truncated file)
            np.load(path, mmap_mode="r")
        else:
            assert path.suffix in (".png", ".csv", ".xml", ".log"), f"unexpected file {path}"
    return checked


def assert_clean(root: Path) -> None:
    """After a successful rerun: no temp file and no lock file is left anywhere."""
    leftovers = [p for p in root.rglob(".*") if TEMP_NAME.fullmatch(p.name) or p.name == LOCK_NAME]
    assert not leftovers, leftovers


def fingerprint(out: Path) -> dict:
    """What must match an uninterrupted run: selections, labeled sets, metrics, and every checkpoint's weights."""
    found = results_of(out)
    for path in sorted(out.rglob("*.pt")):
        found[str(path.relative_to(out))] = load_checkpoint(path).state["weights_sha256"]
    return found


# ---- SIGKILL of `fmask run` -----------------------------------------------------------------------------------

# test_runner's tiny grid with one seed: 2 strategies x 2 rounds, 26 renames, a few seconds uninterrupted.
KILL_RUN_ARGS = [("0" if previous == "--seeds" else arg) for previous, arg in zip([None] + RUN_ARGS, RUN_ARGS)]

@pytest.fixture(scope="module")
def reference_run(zygote, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run, its length and the destinations of its renames (relative to its directory)."""
    out = tmp_path_factory.mktemp("reference") / "res"
    record = out.parent / "renames.txt"
    reply = zygote.run("run", "--out", out, *KILL_RUN_ARGS, record_replaces=record)
    assert reply["code"] == 0, reply["log"]
    reply["renames"] = [str(Path(line).relative_to(out.resolve())) for line in record.read_text().splitlines()]
    return out, reply


def kill_chain(zygote, out: Path, rng: random.Random, measured: dict, tally: dict, boundary_kills: int = 13) -> None:
    """Run `fmask run` into ``out`` again and again, SIGKILLing it, then once to completion; checks the directory
    after every kill.

    ``boundary_kills`` kills land at renames spread evenly over the uninterrupted run's artifacts (alternately just
    before and just after the rename that puts the artifact in place); between two of them one kill lands at a
    random moment 3-15% of an uninterrupted run's length into the resumed run."""
    renames = measured["renames"]
    once = [name for name in renames if renames.count(name) == 1]  # metrics.csv is rewritten: no fixed point
    targets = [once[int(i * len(once) / boundary_kills)] for i in range(boundary_kills)]
    for i, target in enumerate(targets):
        # A random-moment kill may have got past this artifact already: take the next one still missing.
        target = next((name for name in once[once.index(target):] if not (out / name).exists()), None)
        if target is not None:
            reply = zygote.run("run", "--out", out, *KILL_RUN_ARGS,
                               kill_at_replace=(out / target, "before" if i % 2 else "after"))
            if not reply["killed"]:
                assert reply["code"] == 0, reply["log"]
                return
            tally["boundary"] += 1
            tally["artifacts_checked"] += sum(assert_only_complete_artifacts(out).values())
        if i == len(targets) - 1:
            break
        delay = rng.uniform(0.03, 0.15) * measured["seconds"]
        reply = zygote.run("run", "--out", out, *KILL_RUN_ARGS, kill_after=delay)
        if not reply["killed"]:
            assert reply["code"] == 0, reply["log"]
            return
        tally["timer"] += 1
        tally["artifacts_checked"] += sum(assert_only_complete_artifacts(out).values())
    reply = zygote.run("run", "--out", out, *KILL_RUN_ARGS)
    assert reply["code"] == 0 and not reply["killed"], reply["log"]


def test_run_killed_20_times_at_renames_and_random_moments_resumes_identically(zygote, reference_run, tmp_path):
    reference, measured = reference_run
    expected = fingerprint(reference)
    rng = random.Random(6)
    tally = {"boundary": 0, "timer": 0, "artifacts_checked": 0}
    chains = 0
    while tally["boundary"] + tally["timer"] < 20:  # a fast machine finishes a chain in fewer kills: start another
        out = tmp_path / f"res{chains}"
        kill_chain(zygote, out, rng, measured, tally)
        chains += 1
        assert_clean(out)
        assert fingerprint(out) == expected
        assert chains <= 3, tally
    assert tally["boundary"] >= 10 and tally["timer"] >= 8, tally
    print(f"fmask run: {tally['boundary']} kills at renames + {tally['timer']} at random moments over {chains} "
          f"chain(s), {tally['artifacts_checked']} artifact checks, results identical")


def test_two_seed_run_killed_in_each_seed_resumes_identically(zygote, tmp_path):
    """What the one-seed chains above do not reach: a run resumed with one seed finished and the next begun
    (test_runner's two-seed grid), finished by `python -m fmask` in a new interpreter."""
    reference = tmp_path / "reference"
    record = tmp_path / "renames.txt"
    reply = zygote.run("run", "--out", reference, *RUN_ARGS, record_replaces=record)
    assert reply["code"] == 0, reply["log"]
    renames = [str(Path(line).relative_to(reference.resolve())) for line in record.read_text().splitlines()]
    once = [name for name in renames if renames.count(name) == 1]
    seed0 = [name for name in once if name.startswith("seed0/")]
    seed1 = [name for name in once if name.startswith("seed1/")]
    assert once.index(seed1[0]) > once.index(seed0[-1])  # seeds run one after the other
    # Mid seed 0; just after seed 1's first pool file (seed 0 complete, seed 1's pool half written); just before
    # a rename late in seed 1.
    targets = [(seed0[len(seed0) // 2], "after"), (seed1[0], "after"), (seed1[2 * len(seed1) // 3], "before")]
    out = tmp_path / "res"
    for target, when in targets:
        reply = zygote.run("run", "--out", out, *RUN_ARGS, kill_at_replace=(out / target, when))
        assert reply["killed"], (target, reply["log"])
        assert_only_complete_artifacts(out)
    finish = subprocess.run([sys.executable, "-m", "fmask", "run", "--out", str(out), *RUN_ARGS],
                            capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert_clean(out)
    assert fingerprint(out) == fingerprint(reference)


# ---- SIGKILL of single steps ----------------------------------------------------------------------------------

BUILD_ARGS = ["--dataset", "digits", "--class-counts", TINY_COUNTS, "--initial", "20", "--seed", "0",
              "--test-per-class", "10"]  # conftest's tiny_run pool
TRAIN_ARGS = ["--model", "cnn", "--epochs", "3", "--batch-size", "16", "--device", "cpu"]  # its round0.pt


def rerun(*args) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output


def test_single_steps_killed_at_every_rename_and_mid_training_rerun_to_identical_outputs(zygote, tiny_run, tmp_path):
    kills = {"build-pool": 0, "train": 0, "query": 0, "label": 0, "export": 0}

    # build-pool: each attempt rebuilds from scratch (no manifest yet), so one directory takes every kill.
    pool = tmp_path / "pool"
    for n in (1, 2, 3):
        for when in ("before", "after"):
            reply = zygote.run("build-pool", *BUILD_ARGS, "--out", pool, kill_at_replace=(n, when))
            assert reply["killed"], reply["log"]
            kills["build-pool"] += 1
            assert_only_complete_artifacts(tmp_path)
    rerun("build-pool", *BUILD_ARGS, "--out", pool)
    assert snapshot(pool) == snapshot(tiny_run / "pool")  # byte for byte the uninterrupted pool
    assert_clean(tmp_path)

    # train: a fresh directory per kill: at the checkpoint's rename, at its metrics row's, and at a random
    # optimiser step of the 6 that 3 epochs of 20 images in batches of 16 take (mid-training).
    rng = random.Random(6)
    trials = [{"kill_at_replace": (n, when)} for n in (1, 2) for when in ("before", "after")]
    trials += [{"kill_at_call": ("torch.optim", "Adam.step", step)} for step in sorted(rng.sample(range(1, 7), 3))]
    expected_weights = load_checkpoint(tiny_run / "round0.pt").state["weights_sha256"]
    for i, kill in enumerate(trials):
        out = tmp_path / f"train{i}" / "round0.pt"
        reply = zygote.run("train", "--pool", pool, *TRAIN_ARGS, "--out", out, **kill)
        assert reply["killed"], reply["log"]
        kills["train"] += 1
        assert_only_complete_artifacts(out.parent)
        rerun("train", "--pool", pool, *TRAIN_ARGS, "--out", out)
        assert load_checkpoint(out).state["weights_sha256"] == expected_weights
        assert len(read_metrics(out.parent / "metrics.csv")) == 1
        assert_clean(out.parent)
    ckpt = tmp_path / "train0" / "round0.pt"

    # query and label: the one rename each, before and after.
    query_args = ["query", "--ckpt", ckpt, "--strategy", "margin", "--batch", "5", "--device", "cpu"]
    rerun(*query_args, "--out", tmp_path / "reference_query.json")
    for when in ("before", "after"):
        out = tmp_path / f"query_{when}" / "q.json"
        reply = zygote.run(*query_args, "--out", out, kill_at_replace=(1, when))
        assert reply["killed"], reply["log"]
        kills["query"] += 1
        assert_only_complete_artifacts(out.parent)
        rerun(*query_args, "--out", out)
        assert json.loads(out.read_text())["selected"] == json.loads(
            (tmp_path / "reference_query.json").read_text())["selected"]
        assert_clean(out.parent)
    query = tmp_path / "query_after" / "q.json"
    rerun("label", "--query", query, "--out", tmp_path / "reference_labeled.json")
    for when in ("before", "after"):
        out = tmp_path / f"label_{when}" / "l.json"
        reply = zygote.run("label", "--query", query, "--out", out, kill_at_replace=(1, when))
        assert reply["killed"], reply["log"]
        kills["label"] += 1
        assert_only_complete_artifacts(out.parent)
        rerun("label", "--query", query, "--out", out)
        labeled, reference = (json.loads(p.read_text()) for p in (out, tmp_path / "reference_labeled.json"))
        assert (labeled["ids"], labeled["labels"]) == (reference["ids"], reference["labels"])
        assert_clean(out.parent)

    # export --force over an earlier export: the old one is renamed away (1), the new one into place (2).
    export_dir = tmp_path / "export"
    export_args = ["export", "--query", query, "--out", export_dir / "batch", "--device", "cpu", "--force"]
    rerun(*export_args)
    expected_export = snapshot(export_dir / "batch")
    for n in (1, 2):
        for when in ("before", "after"):
            reply = zygote.run(*export_args, kill_at_replace=(n, when))
            assert reply["killed"], reply["log"]
            kills["export"] += 1
            assert_only_complete_artifacts(export_dir)  # an export is whole, or (killed between the renames) absent
            rerun(*export_args)
            assert snapshot(export_dir / "batch") == expected_export
            assert_clean(export_dir)
    assert sum(kills.values()) >= 20, kills
    print(f"single steps: {sum(kills.values())} kills {kills}, every rerun identical to the uninterrupted output")


# ---- Concurrent writers ---------------------------------------------------------------------------------------

def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_second_writer_into_a_directory_being_written_is_refused_then_runs(zygote, tiny_run, tmp_path):
    busy = tmp_path / "busy"
    slow = zygote.start("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "100000",
                        "--target-accuracy", "2", "--batch-size", "16", "--device", "cpu", "--out", busy / "slow.pt")
    try:
        wait_until(lambda: lock_holder(busy) is not None)
        holder = lock_holder(busy)
        assert (holder.pid, holder.command) == (slow, "train")
        query = ["query", "--ckpt", tiny_run / "round0.pt", "--batch", "3", "--device", "cpu", "--out", busy / "q.json"]
        line = refused_line(invoke(*query))
        assert f"another fmask command (pid {slow}: train) is writing {busy}; wait for it or use another --out" in line
        line = refused_line(invoke("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "1",
                                   "--device", "cpu", "--out", busy / "slow.pt"))
        assert f"pid {slow}: train" in line
        assert not (busy / "q.json").exists()
        os.kill(slow, signal.SIGINT)  # Ctrl-C: the slow train ends (exit 130), keeping only finished artifacts
        assert zygote.wait(slow)["code"] == 130
        assert not busy.exists()  # no checkpoint, no temp file, no lock file: not even the directory it made
    finally:  # a failed assertion must not leave the 100,000-epoch training running
        if busy.exists() and lock_holder(busy) is not None:
            os.kill(slow, signal.SIGKILL)
    result = invoke(*query)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in busy.iterdir()) == ["q.csv", "q.json"]  # the query and its CSV list


HOLD = """
from pathlib import Path
import time
from fmask.core.locking import output_lock
with output_lock({directory!r}, {command!r}, tree={tree}):
    Path({ready!r}).touch()
    time.sleep(120)
"""


def hold_lock(zygote, directory: Path, command: str, tree: bool) -> int:
    """A process (pid returned) holding ``directory``'s lock until it is killed."""
    ready = directory.parent / f"{directory.name}.{command}.ready"
    pid = zygote.start(python=HOLD.format(directory=str(directory), command=command, tree=tree, ready=str(ready)))
    wait_until(ready.exists)
    ready.unlink()
    return pid


def artifacts(directory: Path) -> dict[str, str]:
    """snapshot() without lock files: a refused command may tidy away a dead holder's lock file."""
    return {name: digest for name, digest in snapshot(directory).items() if Path(name).name != LOCK_NAME}


def test_fmask_run_owns_its_tree_and_a_sigkilled_holder_leaves_no_lock(zygote, tiny_run, tmp_path):
    results = tmp_path / "res"
    runner = hold_lock(zygote, results, "run", tree=True)
    before = snapshot(tmp_path)
    line = refused_line(invoke("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "1", "--device",
                               "cpu", "--out", results / "seed0" / "round0.pt"))
    assert f"(pid {runner}: run) is writing {results}, which holds {results / 'seed0'}" in line
    refused_line(invoke("build-pool", *BUILD_ARGS, "--out", results / "seed0" / "pool"))
    assert snapshot(tmp_path) == before and not (results / "seed0").exists()
    assert zygote.wait(runner, kill_after=0)["killed"]
    assert (results / LOCK_NAME).exists() and lock_holder(results) is None  # the kernel dropped the dead lock
    rerun("train", "--pool", tiny_run / "pool", "--model", "cnn", "--epochs", "1", "--device", "cpu",
          "--out", results / "seed0" / "round0.pt")

    # The reverse: a run is refused while a command writes anywhere below its directory.
    trainer = hold_lock(zygote, results / "seed0", "train", tree=False)
    before = artifacts(tmp_path)
    line = refused_line(invoke("run", "--out", results, *KILL_RUN_ARGS))
    assert f"(pid {trainer}: train) is writing {results / 'seed0'}" in line
    assert artifacts(tmp_path) == before
    assert zygote.wait(trainer, kill_after=0)["killed"]


def test_output_lock_is_reentrant_removes_its_file_and_what_it_created_on_failure(tmp_path):
    from fmask.core.errors import FmaskError

    target = tmp_path / "a" / "b"
    with output_lock(target, "train"):
        assert lock_holder(target) is None  # this process's own lock is not "another command"
        with output_lock(target, "query"):  # a step inside a step (fmask run) takes it again
            assert (target / LOCK_NAME).is_file()
        assert json.loads((target / LOCK_NAME).read_text())["command"] == "train"
    assert list(target.iterdir()) == []
    with pytest.raises(FmaskError, match="boom"):
        with output_lock(tmp_path / "c" / "d", "train"):
            raise FmaskError("boom")
    assert not (tmp_path / "c").exists()  # directories it made for a step that failed are removed again
    (tmp_path / "file").write_text("x")
    with pytest.raises(FmaskError, match="is a file, not a directory"):
        with output_lock(tmp_path / "file" / "sub", "train"):
            pass
    stale, foreign = tmp_path / ".round1.pt.k2j4h6g8.tmp", tmp_path / ".notes.txt.k2j4h6g8.tmp"
    stale.write_text("left by a killed train")
    foreign.write_text("someone else's")
    with output_lock(tmp_path, "train", outputs=("round1.pt",)):
        pass
    assert not stale.exists() and foreign.exists()  # only the step's own outputs' temp files are removed


def test_step_output_skips_a_current_output_reruns_with_force_and_refuses_a_second_writer(zygote, tmp_path):
    from fmask.core.atomic import atomic_write_json
    from fmask.core.errors import FmaskError
    from fmask.core.hashing import SEAL_KEY, sha256_json
    from fmask.core.steps import STEP_KEY, step_output

    out, beside = tmp_path / "d" / "a.json", tmp_path / "d" / "a.csv"
    with step_output(out, command="query", step={"x": 1}, beside=(beside,)) as output:
        assert not output.current and output.writes and output.recorded is None
        assert (out.parent / LOCK_NAME).is_file() and lock_holder(out.parent) is None  # held by this process
        atomic_write_json(out, output.sealed({"kind": "test"}))
    written = read_json(out, what="test", made_by="the test")  # refuses a seal that does not match
    assert written[STEP_KEY] == {"x": 1} and list(written)[-2:] == [STEP_KEY, SEAL_KEY]
    assert written[SEAL_KEY] == sha256_json({"kind": "test", STEP_KEY: {"x": 1}})
    assert not (out.parent / LOCK_NAME).exists()

    reused = []
    stale = out.parent / ".a.csv.k2j4h6g8.tmp"  # left by a killed writer of the file beside
    stale.write_text("partial")
    with step_output(out, command="query", step={"x": 1}, beside=(beside,),
                     on_current=lambda: reused.append(1) or "recorded") as output:
        assert output.current and output.recorded == "recorded" and reused == [1]
    assert not stale.exists()
    for step, force in (({"x": 2}, False), ({"x": 1}, True), (None, False)):  # changed, --force, records no step
        with step_output(out, command="query", step=step, force=force, on_current=reused.append) as output:
            assert not output.current and output.recorded is None
    assert reused == [1]

    beside.mkdir()
    with pytest.raises(FmaskError, match="it is a directory"):  # checked before any work, the lock released
        with step_output(out, command="query", step={"x": 2}, beside=(beside,)):
            pytest.fail("a step whose output cannot be written ran")
    assert not (out.parent / LOCK_NAME).exists()
    writer = hold_lock(zygote, out.parent, "train", tree=False)
    with pytest.raises(FmaskError, match=f"pid {writer}: train"):
        with step_output(out, command="query", step={"x": 1}, on_current=reused.append):
            pytest.fail("a second writer ran")
    assert reused == [1]  # refused before deciding anything
    assert zygote.wait(writer, kill_after=0)["killed"]


# ---- A real full disk -----------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    """A tiny tmpfs filled to the last byte; skipped where mounting is not allowed (needs root and CAP_SYS_ADMIN)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; tests/test_bad_inputs.py simulates ENOSPC in-process instead")
    try:
        with open(mount / "filler", "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()
            except OSError:
                pass
    except OSError:
        pass  # the close flushes nothing more: the disk is full
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_gets_one_line_and_leaves_nothing(full_disk, tiny_run, tmp_path):
    query = tmp_path / "q.json"
    rerun("query", "--ckpt", tiny_run / "round0.pt", "--batch", "3", "--device", "cpu", "--out", query)
    commands = {
        "build-pool": ["build-pool", *BUILD_ARGS, "--out", full_disk / "pool"],
        "train": ["train", "--pool", tiny_run / "pool", *TRAIN_ARGS, "--out", full_disk / "round0.pt"],
        "query": ["query", "--ckpt", tiny_run / "round0.pt", "--batch", "3", "--device", "cpu",
                  "--out", full_disk / "q.json"],
        "label": ["label", "--query", query, "--out", full_disk / "labeled1.json"],
        "export": ["export", "--query", query, "--device", "cpu", "--out", full_disk / "batch"],
        "run": ["run", "--out", full_disk / "res", *KILL_RUN_ARGS],
    }
    before = snapshot(full_disk)
    for name, args in commands.items():
        line = refused_line(invoke(*args))
        assert "No space left on device" in line, (name, line)
        assert snapshot(full_disk) == before and sorted(os.listdir(full_disk)) == ["filler"], name
