"""Pools from your own files: build-pool throughput, and memory while building and querying a pool whose cache is
bigger than what a step may hold.

    .venv/bin/python -m benchmarks.build_pool                    # both parts (the synthetic one: 200,000 images)
    .venv/bin/python -m benchmarks.build_pool --n 50000          # a smaller synthetic pool
    .venv/bin/python -m benchmarks.build_pool --skip-synthetic   # throughput only

1. Throughput: `fmask build-pool --images` on the 60,000 JPEGs of ../shared/datasets/cifar10 (train/ and test/,
   32x32, one size) with 1 and with 2 worker processes, alternating, ``--repeats`` times each; images/s from the
   wall time of the whole command (listing, decoding, hashing, writing the cache and the tables).
2. Memory: a synthetic pool of ``--n`` smooth random 64x64 JPEGs (``--n`` 200,000: a 2.4 GB cache) with 100
   labeled, built, then a small CNN trained for one epoch on the labeled images and two queries (entropy, kcenter)
   over the whole pool. For each command the peak anonymous memory (RssAnon: the memory-mapped cache's file pages
   are not counted) of its process and of its whole process tree (with the decode workers), sampled every 20 ms.
   The target: every step under 1.5 GB.

Every command runs as `python -m fmask ...` in a fresh process, with OMP_NUM_THREADS=--threads.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"
CIFAR10_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
SYNTHETIC_CLASSES = ",".join(f"c{i}" for i in range(10))


def rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def run_measured(args: list[str], threads: int) -> dict:
    """Run ``python -m fmask *args``; wall seconds and the peak RssAnon (MiB) of its process and of its tree."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fmask", *map(str, args)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"main": 0, "tree": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree = descendants(process.pid)
            peak["main"] = max(peak["main"], rss_anon_kib(process.pid))
            peak["tree"] = max(peak["tree"], sum(rss_anon_kib(pid) for pid in tree))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and the workers it waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if process.returncode != 0:
        raise SystemExit(f"fmask {' '.join(map(str, args))} failed:\n{output}")
    return {"seconds": seconds, "cpu": cpu, "main_mib": peak["main"] / 1024, "tree_mib": peak["tree"] / 1024,
            "output": output}


def throughput(args, work: Path) -> None:
    files = sum(1 for _ in SHARED_CIFAR10.rglob("*.jpg"))
    print(f"1. build-pool --images {SHARED_CIFAR10} ({files:,} JPEGs, 32x32), {args.repeats} builds per worker count, "
          "alternating")
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    memory: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for workers in (1, 2):
            result = run_measured(["build-pool", "--images", SHARED_CIFAR10, "--classes", CIFAR10_CLASSES,
                                   "--workers", workers, "--force", "--out", work / f"cifar_w{workers}"], args.threads)
            times[workers].append(result["seconds"])
            cpu[workers].append(result["cpu"])
            memory[workers].append(result["tree_mib"])
            print(f"   workers {workers}: {result['seconds']:.1f} s wall, {result['cpu']:.1f} s CPU, "
                  f"{files / result['seconds']:,.0f} images/s, peak RssAnon {result['tree_mib']:.0f} MiB (tree), "
                  f"{result['main_mib']:.0f} MiB (main)", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"   median: 1 worker {files / one:,.0f} images/s ({one:.1f} s wall, {statistics.median(cpu[1]):.1f} s CPU), "
          f"2 workers {files / two:,.0f} images/s ({two:.1f} s wall, {statistics.median(cpu[2]):.1f} s CPU), "
          f"speed-up {one / two:.2f}x; peak RssAnon {max(memory[1]):.0f} / {max(memory[2]):.0f} MiB")
    print("   " + " ".join(result["output"].split())[:300])


def smooth_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour image (an 8x8 grid of random colours, upscaled), JPEG quality 90."""
    from PIL import Image

    grid = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    grid.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_synthetic(folder: Path, n: int, size: int) -> Path:
    """``n`` JPEGs in 100 subfolders, 100 of them labeled in a CSV; reused when already complete."""
    marker = folder / f".complete-{n}-{size}"
    labels = folder.parent / f"labels-{n}.csv"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for index in range(n):
            sub = folder / f"{index % 100:02d}"
            if index < 100:
                sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{index:07d}.jpg").write_bytes(smooth_jpeg(rng, size))
        marker.touch()
        print(f"   wrote {n:,} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for index in range(100):
            writer.writerow([f"{index % 100:02d}/{index:07d}.jpg", f"c{index % 10}"])
    return labels


def synthetic(args, work: Path) -> None:
    cache_gb = args.n * 3 * args.size * args.size / 1e9
    print(f"2. synthetic pool: {args.n:,} images {args.size}x{args.size} (a {cache_gb:.2f} GB cache), "
          f"{args.workers} workers, {args.threads} thread(s)")
    folder = work / "synthetic"
    labels = make_synthetic(folder, args.n, args.size)
    pool, exp = work / "synthetic_pool", work / "synthetic_exp"
    steps = [
        ("build-pool", ["build-pool", "--images", folder, "--labels", labels, "--classes", SYNTHETIC_CLASSES,
                        "--workers", args.workers, "--force", "--out", pool]),
        ("train (cnn, 1 epoch)", ["train", "--pool", pool, "--model", "cnn", "--epochs", 1, "--device", "cpu",
                                  "--force", "--out", exp / "round0.pt"]),
        ("query entropy", ["query", "--ckpt", exp / "round0.pt", "--strategy", "entropy", "--batch", 100,
                           "--device", "cpu", "--force", "--out", exp / "entropy.json"]),
        ("query kcenter", ["query", "--ckpt", exp / "round0.pt", "--strategy", "kcenter", "--batch", 100,
                           "--device", "cpu", "--force", "--out", exp / "kcenter.json"]),
    ]
    print("   | step | wall | CPU | peak RssAnon, process | peak RssAnon, with workers |")
    print("   |---|---|---|---|---|")
    worst = 0.0
    for name, command in steps:
        result = run_measured(command, args.threads)
        worst = max(worst, result["tree_mib"])
        print(f"   | {name} | {result['seconds']:.0f} s | {result['cpu']:.0f} s | {result['main_mib']:.0f} MiB | "
              f"{result['tree_mib']:.0f} MiB |", flush=True)
    size = (pool / "images.npy").stat().st_size / 1e9
    verdict = "under" if worst < 1.5 * 1024 else "OVER"
    print(f"   cache {size:.2f} GB on disk; the largest peak {worst:.0f} MiB is {verdict} the 1.5 GB target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="images in the synthetic pool")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic images")
    parser.add_argument("--repeats", type=int, default=2, help="builds per worker count (throughput)")
    parser.add_argument("--workers", type=int, default=2, help="decode workers for the synthetic build")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--skip-cifar", action="store_true", help="skip the throughput part")
    parser.add_argument("--skip-synthetic", action="store_true", help="skip the memory part")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fmask-build-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_cifar:
            if not SHARED_CIFAR10.is_dir():
                raise SystemExit(f"{SHARED_CIFAR10} is absent; pass --skip-cifar")
            throughput(args, work)
        if not args.skip_synthetic:
            synthetic(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
