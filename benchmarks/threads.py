"""The CPU thread policy against PyTorch's default thread count, on a quiet and on a busy machine.

    .venv/bin/python -m benchmarks.threads                      # fmask demo --seeds 1 --rounds 3, both loads
    .venv/bin/python -m benchmarks.threads --loads busy --repeats 3

Each run is a fresh ``fmask demo --seeds 1 --rounds 3`` process writing into a temporary directory, under
three thread settings, run in turn (so drift in the machine's load falls on all three alike):
  policy   no thread variable set: fmask sizes the threads to the model (one thread for the demo's small CNN)
  default  ``fmask --threads N`` with N = PyTorch's default (one per core): what fmask did before the policy
  one      ``OMP_NUM_THREADS=1``: the reference the policy is held to
and two loads:
  quiet    nothing started by the benchmark
  busy     one busy-loop process per core, started before and stopped after the load's runs
Printed: wall seconds (median over ``--repeats``) per setting and load, and the ratios to ``one``. A run that
exceeds ``--timeout`` is stopped and shown as "> timeout".
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from fmask.core.threads import USER_VARIABLES

FMASK = [sys.executable, "-m", "fmask"]
BUSY_LOOP = "while True:\n    pass\n"


def setting_command(setting: str, demo_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one thread setting."""
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    if setting == "policy":
        return FMASK + ["demo", *demo_args], env
    if setting == "default":
        return FMASK + ["--threads", str(torch.get_num_threads()), "demo", *demo_args], env
    if setting == "one":
        return FMASK + ["demo", *demo_args], {**env, "OMP_NUM_THREADS": "1"}
    raise ValueError(setting)


@contextmanager
def busy_cores(count: int) -> Iterator[list[int]]:
    """``count`` busy-loop processes for the duration of the block; each is stopped by its own pid."""
    processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield [p.pid for p in processes]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def timed_run(command: list[str], env: dict[str, str], timeout: float) -> Optional[float]:
    """Wall seconds of one run in a fresh directory, or None when it ran past ``timeout``."""
    work = Path(tempfile.mkdtemp(prefix="fmask-threads-"))
    try:
        started = time.perf_counter()
        try:
            result = subprocess.run(command + ["--out", str(work / "demo")], env=env, cwd=work, timeout=timeout,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return None
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
        return seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="Runs per setting and load (the median is shown).")
    parser.add_argument("--loads", default="quiet,busy", help="quiet, busy or both.")
    parser.add_argument("--settings", default="policy,default,one")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="Busy-loop processes (default: cores).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds before a run is stopped.")
    args = parser.parse_args(argv)
    demo_args = ["--seeds", str(args.seeds), "--rounds", str(args.rounds)]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    loads = [s.strip() for s in args.loads.split(",") if s.strip()]
    print(f"fmask demo {' '.join(demo_args)}; {os.cpu_count()} cores, PyTorch default {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; {args.repeats} repeat(s), timeout {args.timeout:.0f} s", flush=True)
    results: dict[tuple[str, str], list[Optional[float]]] = {}
    for load in loads:
        with busy_cores(args.busy if load == "busy" else 0):
            for repeat in range(args.repeats):
                for setting in settings:
                    command, env = setting_command(setting, demo_args)
                    seconds = timed_run(command, env, args.timeout)
                    results.setdefault((load, setting), []).append(seconds)
                    shown = f"{seconds:.1f} s" if seconds is not None else f"> {args.timeout:.0f} s"
                    print(f"  {load:5s} {setting:7s} run {repeat + 1}: {shown}", flush=True)

    def median(values: list[Optional[float]]) -> Optional[float]:
        return None if any(v is None for v in values) else statistics.median(values)  # type: ignore[arg-type]

    print("\n| load | " + " | ".join(settings) + " | " + " | ".join(f"{s} / one" for s in settings if s != "one")
          + " |")
    print("|---" * (1 + len(settings) + len([s for s in settings if s != "one"])) + "|")
    for load in loads:
        medians = {s: median(results[(load, s)]) for s in settings}
        cells = [f"{m:.1f} s" if m is not None else f"> {args.timeout:.0f} s" for m in medians.values()]
        ratios = []
        for s in settings:
            if s == "one":
                continue
            m, one = medians[s], medians.get("one")
            ratios.append(f"{m / one:.2f}x" if m is not None and one else (f"> {args.timeout / one:.1f}x"
                                                                           if one else "—"))
        print(f"| {load} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
