"""What the side-by-side benchmarks share: the synthetic problem's options, and running each side in a fresh
interpreter (so one side's peak memory and warm caches never count against another) that prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional

ROOT = Path(__file__).resolve().parents[1]


def side_parser(description: str, *, sides: Iterable[str], n: int, e_help: str, labeled_help: str,
                batch: int) -> argparse.ArgumentParser:
    """N candidates with E-wide features over C classes, a labeled set and a batch; --side runs one side."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=n, help="unlabeled candidates")
    parser.add_argument("--e", type=int, default=512, help=e_help)
    parser.add_argument("--c", type=int, default=10, help="classes")
    parser.add_argument("--labeled", type=int, default=1_000, help=labeled_help)
    parser.add_argument("--batch", type=int, default=batch, help="samples to select")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=list(sides), help=argparse.SUPPRESS)  # internal: one side, JSON out
    return parser


def run_side_process(module: str, side: str, args: argparse.Namespace, *, leave_out: Iterable[str] = (),
             env: Optional[Mapping[str, str]] = None) -> dict:
    """``python -m module --side side`` with the other options as given; the JSON its last line prints."""
    skipped = {"side", *leave_out}
    command = [sys.executable, "-m", module, "--side", side] + [
        f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in skipped]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT,
                            env=dict(env) if env is not None else dict(os.environ)).stdout
    return json.loads(output.strip().splitlines()[-1])


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The peak resident set size since the last reset (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


class PeakMemory:
    """Memory a side allocates beyond what it held when measuring started: on CUDA the allocator's peak, on a CPU
    the peak resident set size (VmHWM, restarted through /proc/self/clear_refs at the start)."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = current_rss_bytes()
            with open("/proc/self/clear_refs", "w") as clear:  # restart the peak (VmHWM) from the current size
                clear.write("5")

    def extra_bytes(self) -> int:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else peak_rss_bytes()
        return max(peak - self.base, 0)
