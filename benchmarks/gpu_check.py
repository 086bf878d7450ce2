"""The stages of ``benchmarks/gpu_check.sh`` (one per call; each writes ``OUT/stage_<X>.json`` when it finishes).

    python -m benchmarks.gpu_check A --out OUT [--dry-run]

A  environment: versions, the GPU, and that CUDA really runs the work
B  correctness on a small case, CPU against the GPU with TF32 off: float64 masks and selections identical;
   float32 overlaps and largest relative differences within the tolerances below; a --deterministic rerun on the
   GPU (training included) bit-identical; how far TF32, when allowed, would move the Fisher
C  paper-scale ``fmask fisher`` (ResNet-18, 5,750 unlabeled + 1,500 labeled CIFAR-shaped images, sparsity 0.002)
   against the floor of r plain backward passes over the same images
D  paper-scale Fisher-greedy selection (N = 5,750, r = 10, D = 22,348, batch 500), float32 and float64, timed
   with synchronisation; the planned memory against the measured peak
E  one real CLI round on ResNet-18: build-pool, train, fisher, query with fishermask, bait, badge, kcenter,
   entropy, then ``train --compile``; and fmask's trainer against a DataLoader loop (benchmarks.train)

``--dry-run`` runs the same stages on the CPU with tiny sizes and the small CNN (and without ``--compile``, whose
compilation alone takes minutes on a CPU), so the script cannot rot. The images are synthetic (class-coloured
noise), written once under ``OUT/work``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

# Tolerances of stage B's float32 comparison (CPU against GPU, both without TF32).
MASK_OVERLAP_MIN = 0.99  # share of the top-k entries both masks hold
SELECTION_OVERLAP_MIN = 0.90  # share of the selected ids both selections hold
FISHER_RELATIVE_MAX = 1e-4  # largest |difference| over the largest |value|, per parameter
EMBEDDING_RELATIVE_MAX = 1e-4  # largest |difference| over the largest |value|
# The targets on one H200 (stage C, D, E).
FISHER_TARGET_S = 30.0
SELECTION_TARGET_S = 20.0
TRAINING_RATIO_TARGET = 3.0

GPU = dict(model="resnet18", size=32, counts=[250] * 9 + [5000], labeled=1500, test_per_class=100, sparsity=0.002,
           small_n=256, small_sparsity=0.01, small_batch=20, select=(5750, 10, 22348, 500), epochs=5,
           query_batch=500, bench_epochs=3, workers=8)
DRY = dict(model="cnn", size=16, counts=[8] * 9 + [40], labeled=20, test_per_class=4, sparsity=0.05,
           small_n=32, small_sparsity=0.05, small_batch=5, select=(120, 10, 200, 10), epochs=1,
           query_batch=10, bench_epochs=1, workers=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - started, value


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def _python() -> list[str]:
    return [sys.executable]


def _run(args: list[str], log: list[dict], timeout: float = 600.0, env: dict | None = None) -> dict:
    """Run one command (an fmask CLI call or a benchmark), echo its output, record its wall time."""
    print("$ " + " ".join(args), flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - started
    sys.stdout.write(done.stdout[-4000:])
    sys.stdout.write(done.stderr[-4000:])
    entry = {"command": " ".join(args[2:] if args[1:2] == ["-m"] else args), "exit": done.returncode,
             "seconds": round(seconds, 2)}
    log.append(entry)
    if done.returncode != 0:
        raise RuntimeError(f"{entry['command']} exited {done.returncode}")
    return {**entry, "stdout": done.stdout}


# ----------------------------------------------------------------------------------------------------------------
# Shared inputs


def synthetic_folder(root: Path, config: dict) -> Path:
    """An image folder (train/<class>/, test/<class>/) of class-coloured noise, written once."""
    from PIL import Image

    folder = root / "images"
    done_marker = folder / ".complete"
    if done_marker.exists():
        return folder
    generator = torch.Generator().manual_seed(0)
    classes = len(config["counts"])
    colours = torch.rand(classes, 3, 1, 1, generator=generator) * 160 + 48
    for split, counts in (("train", config["counts"]), ("test", [config["test_per_class"]] * classes)):
        for cls, count in enumerate(counts):
            target = folder / split / f"class{cls}"
            target.mkdir(parents=True, exist_ok=True)
            noise = torch.randn(count, 3, config["size"], config["size"], generator=generator) * 40
            pixels = (colours[cls] + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for i, image in enumerate(pixels):
                Image.fromarray(image).save(target / f"{i:05d}.png")
    done_marker.write_text("")
    return folder


def shared_pool(root: Path, config: dict) -> Path:
    """The stage C/E pool: the Setting 2 class counts, ``labeled`` of them labeled (5,750 unlabeled at full size)."""
    from fmask.pool.pool import build_pool

    out = root / "pool"
    build_pool(dataset=f"folder:{synthetic_folder(root, config)}", out=out, class_counts=config["counts"],
               initial=config["labeled"], seed=0, test_per_class=config["test_per_class"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stages


def stage_a(device: torch.device, config: dict, work: Path) -> dict:
    import fmask

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "fmask": fmask.__version__,
        "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
        else None, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    x = torch.randn(2048, 2048, device=device)
    seconds, y = _timed(device, lambda: x @ x)
    info["matmul_device"] = str(y.device)
    info["matmul_2048_ms"] = round(1000 * seconds, 2)
    info["passed"] = y.device.type == device.type
    return info


def _small_case(device: torch.device, dtype: torch.dtype, config: dict) -> dict:
    """Fisher, mask, embeddings and a Fisher-greedy selection of a seeded small CNN, computed on ``device``."""
    from fmask.fisher import MaskColumns, fisher_diagonal, masked_embeddings, top_k_mask
    from fmask.fisher.mask import mask_size
    from fmask.query.fisher_greedy import fisher_greedy
    from fmask.train.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(3, 10)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(config["small_n"], 3, config["size"], config["size"], generator=torch.Generator().manual_seed(1),
                    dtype=dtype)
    unlabeled, labeled = x[: -config["small_n"] // 4], x[-config["small_n"] // 4:]
    fisher = fisher_diagonal(model, unlabeled, device=device)
    names = list(fisher)
    k = mask_size(config["small_sparsity"], sum(v.numel() for v in fisher.values()))
    masks = top_k_mask({n: v.float() for n, v in fisher.items()}, k, head=True, order=names)
    columns = MaskColumns.from_masks(masks, names)
    pool_embeddings = masked_embeddings(model, unlabeled, columns, dtype=dtype, device=device)
    labeled_embeddings = masked_embeddings(model, labeled, columns, dtype=dtype, device=device)
    selected = fisher_greedy(pool_embeddings.to(device), config["small_batch"], labeled_embeddings.to(device),
                             dtype=dtype, device=device)
    return {"fisher": fisher, "masks": masks, "k": k, "embeddings": pool_embeddings, "selected": list(selected)}


def _compare(cpu: dict, gpu: dict) -> dict:
    mask_shared = sum(int((cpu["masks"][n] & gpu["masks"][n]).sum()) for n in cpu["masks"])
    return {
        "masks_identical": all(torch.equal(cpu["masks"][n], gpu["masks"][n]) for n in cpu["masks"]),
        "mask_overlap": mask_shared / cpu["k"],
        "selection_identical": cpu["selected"] == gpu["selected"],
        "selection_overlap": len(set(cpu["selected"]) & set(gpu["selected"])) / len(cpu["selected"]),
        "fisher_max_relative_difference": max(_relative(gpu["fisher"][n], cpu["fisher"][n]) for n in cpu["fisher"]),
        "embedding_max_relative_difference": _relative(gpu["embeddings"], cpu["embeddings"]),
    }


def _deterministic_rerun(device: torch.device, config: dict) -> dict:
    """Train the small CNN twice and compute a Fisher twice under --deterministic: identical to the bit?"""
    from fmask.fisher import fisher_diagonal
    from fmask.core.numerics import deterministic_algorithms
    from fmask.train.models import SmallCNN
    from fmask.train.trainer import TrainConfig, TrainLoop, validate_config

    images = torch.randint(0, 256, (config["small_n"], 3, config["size"], config["size"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    labels = torch.arange(config["small_n"]) % 10
    runs = []
    with deterministic_algorithms():
        for _ in range(2):
            torch.manual_seed(0)
            model = SmallCNN(3, 10).to(device)
            train_config = validate_config(TrainConfig(model="cnn", batch_size=16, seed=0), device)
            loop = TrainLoop(model, images, labels, normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
                             augment={"crop_pad": 4, "flip": True}, config=train_config, device=device)
            loop.run_epoch()
            loop.run_epoch()
            model = model.to(memory_format=torch.contiguous_format).eval()
            fisher = fisher_diagonal(model, images[:64].float().div(255).to(device), device=device)
            runs.append(({n: p.detach().cpu().clone() for n, p in model.state_dict().items()}, fisher))
    (weights_a, fisher_a), (weights_b, fisher_b) = runs
    return {"weights_identical": all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a),
            "fisher_identical": all(torch.equal(fisher_a[n], fisher_b[n]) for n in fisher_a)}


def stage_b(device: torch.device, config: dict, work: Path) -> dict:
    from fmask.core.numerics import exact_float32

    result: dict[str, Any] = {"tolerances": {
        "mask_overlap_min": MASK_OVERLAP_MIN, "selection_overlap_min": SELECTION_OVERLAP_MIN,
        "fisher_relative_max": FISHER_RELATIVE_MAX, "embedding_relative_max": EMBEDDING_RELATIVE_MAX}}
    with exact_float32():
        for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            cpu = _small_case(torch.device("cpu"), dtype, config)
            gpu = _small_case(device, dtype, config)
            result[name] = _compare(cpu, gpu)
            if name == "float32":
                reference32 = cpu
    if device.type == "cuda":  # what TF32, when the caller allows it, does to the same float32 Fisher
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        try:
            tf32 = _small_case(device, torch.float32, config)
        finally:
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]
        result["float32_with_tf32_allowed"] = _compare(reference32, tf32)
    result["deterministic_rerun"] = _deterministic_rerun(device, config)
    f32, f64 = result["float32"], result["float64"]
    result["passed"] = bool(
        f64["masks_identical"] and f64["selection_identical"]
        and f32["mask_overlap"] >= MASK_OVERLAP_MIN and f32["selection_overlap"] >= SELECTION_OVERLAP_MIN
        and f32["fisher_max_relative_difference"] <= FISHER_RELATIVE_MAX
        and f32["embedding_max_relative_difference"] <= EMBEDDING_RELATIVE_MAX
        and all(result["deterministic_rerun"].values()))
    return result


def _checkpoint(work: Path, config: dict, device: torch.device) -> tuple[Path, Path]:
    """The stage C pool and a checkpoint trained one epoch on its labeled set (what the Fisher pass needs)."""
    from fmask.train.trainer import TrainConfig, train

    pool = shared_pool(work, config)
    checkpoint = work / "fisher_round0.pt"
    train(pool_dir=pool, labeled=None, out=checkpoint, device=device.type,
          config=TrainConfig(model=config["model"], max_epochs=1, seed=0))
    return pool, checkpoint


def _floor_seconds(checkpoint: Path, pool_dir: Path, device: torch.device, batch_size: int) -> float:
    """r plain batched backward passes over the images the Fisher pass (unlabeled) and the embeddings (all) see."""
    from fmask.core.labeled import load_labeled
    from fmask.pool.pool import load_pool
    from fmask.train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model.to(device).eval()
    pool = load_pool(pool_dir)
    labeled = set(load_labeled(pool_dir / "labeled.json", pool).ids)
    unlabeled = [i for i in pool.ids if i not in labeled]

    def passes(ids: list[int]) -> None:
        for start in range(0, len(ids), batch_size):
            x = pool.inputs(ids[start:start + batch_size]).to(device)
            log_p = torch.log_softmax(model(x), dim=-1)
            for c in range(log_p.shape[1]):
                model.zero_grad(set_to_none=True)
                log_p[:, c].sum().backward(retain_graph=c < log_p.shape[1] - 1)

    passes(unlabeled[:batch_size])  # warm-up
    seconds, _ = _timed(device, lambda: (passes(unlabeled), passes(list(pool.ids))))
    return seconds


def stage_c(device: torch.device, config: dict, work: Path) -> dict:
    from fmask.fisher import plan_fisher_pass
    from fmask.pool.pool import load_pool
    from fmask.train.checkpoint import load_checkpoint

    pool, checkpoint = _checkpoint(work, config, device)
    log: list[dict] = []
    out = work / "fisher_c.safetensors"
    run = _run(_python() + ["-m", "fmask", "--verbose", "fisher", "--ckpt", str(checkpoint), "--out", str(out),
                            "--sparsity", str(config["sparsity"]), "--device", device.type, "--force"], log)
    reported = re.search(r"written in ([0-9.]+) s", run["stdout"])
    fisher_s = float(reported.group(1)) if reported else run["seconds"]
    image_shape = load_pool(pool).image_shape
    batch = plan_fisher_pass(load_checkpoint(checkpoint).model.to(device), image_shape, device=device).batch_size
    floor_s = _floor_seconds(checkpoint, pool, device, batch)
    return {"commands": log, "fisher_and_embeddings_s": fisher_s, "command_wall_s": run["seconds"],
            "floor_s": round(floor_s, 2), "fmask_over_floor": round(fisher_s / floor_s, 2), "batch_size": batch,
            "target_s": FISHER_TARGET_S, "passed": fisher_s <= FISHER_TARGET_S or device.type != "cuda"}


def stage_d(device: torch.device, config: dict, work: Path) -> dict:
    from fmask.query.fisher_greedy import fisher_greedy_detailed

    n, r, d, batch = config["select"]
    generator = torch.Generator().manual_seed(0)
    magnitude = torch.exp(0.5 * torch.randn(n, 1, 1, generator=generator))
    data = torch.randn(n, r, d, generator=generator).mul_(magnitude / math.sqrt(d))
    result: dict[str, Any] = {"n": n, "r": r, "d": d, "batch": batch, "target_s": SELECTION_TARGET_S}
    picks = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        pool = data.to(device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
        seconds, run = _timed(device, lambda pool=pool: fisher_greedy_detailed(pool, batch, dtype=dtype, device=device))
        picks[name] = run.positions
        entry = {"seconds": round(seconds, 2), "planned_bytes": run.plan.bytes_needed,
                 "dense_fisher": run.plan.dense_fisher, "chunk_size": run.plan.chunk_size,
                 "refreshes": run.refreshes, "rebuilds": run.rebuilds}
        if device.type == "cuda":
            entry["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device) - held
            entry["plan_covers_peak"] = entry["measured_peak_bytes"] <= run.plan.bytes_needed
        result[name] = entry
        del pool
    result["float32_float64_selection_overlap"] = len(set(picks["float32"]) & set(picks["float64"])) / batch
    result["passed"] = (device.type != "cuda" or result["float32"]["seconds"] <= SELECTION_TARGET_S) and all(
        result[name].get("plan_covers_peak", True) for name in ("float32", "float64"))
    return result


def stage_e(device: torch.device, config: dict, work: Path, dry_run: bool) -> dict:
    folder = synthetic_folder(work, config)
    fmask = _python() + ["-m", "fmask"]
    exp = work / "round"
    log: list[dict] = []
    common = ["--device", device.type]
    _run(fmask + ["build-pool", "--dataset", f"folder:{folder}", "--class-counts", ",".join(map(str, config["counts"])),
                  "--initial", str(config["labeled"]), "--test-per-class", str(config["test_per_class"]),
                  "--seed", "0", "--out", str(exp / "pool")], log)
    train = fmask + ["train", "--pool", str(exp / "pool"), "--model", config["model"], "--epochs",
                     str(config["epochs"]), *common]
    _run(train + ["--out", str(exp / "round0.pt")], log)
    _run(fmask + ["fisher", "--ckpt", str(exp / "round0.pt"), "--out", str(exp / "mask0.safetensors"), "--sparsity",
                  str(config["sparsity"]), *common], log)
    for strategy in ("fishermask", "bait", "badge", "kcenter", "entropy"):
        extra = ["--mask", str(exp / "mask0.safetensors")] if strategy == "fishermask" else []
        _run(fmask + ["query", "--ckpt", str(exp / "round0.pt"), "--strategy", strategy, "--batch",
                      str(config["query_batch"]), "--out", str(exp / f"query_{strategy}.json"), *extra, *common], log)
    if dry_run:
        log.append({"command": "train --compile", "skipped": "dry run (compiling takes minutes on a CPU)"})
    else:
        _run(train + ["--compile", "--out", str(exp / "round0_compiled.pt")], log)
    bench = _run(_python() + ["-m", "benchmarks.train", "--pool", str(exp / "pool"), "--model", config["model"],
                              "--device", device.type, "--epochs", str(config["bench_epochs"]), "--eval-last", "1",
                              "--workers", str(config["workers"])], log)
    ratio = re.search(r"throughput ratio fmask/plain: ([0-9.]+)x \(all epochs incl\. setup\), ([0-9.]+)x",
                      bench["stdout"])
    training = {"throughput_ratio_all": float(ratio.group(1)), "throughput_ratio_median_epoch": float(ratio.group(2))} \
        if ratio else {}
    passed = device.type != "cuda" or (training.get("throughput_ratio_median_epoch", 0) >= TRAINING_RATIO_TARGET)
    return {"commands": log, "training": training, "training_ratio_target": TRAINING_RATIO_TARGET, "passed": passed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list("ABCDE"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the small CNN")
    args = parser.parse_args(argv)
    config = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry-run, or on a machine with a GPU", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = {"A": stage_a, "B": stage_b, "C": stage_c, "D": stage_d}
    result = stages[args.stage](device, config, work) if args.stage in stages else \
        stage_e(device, config, work, args.dry_run)
    summary = {"stage": args.stage, "status": "ok", "dry_run": args.dry_run, "device": str(device),
               "seconds": round(time.perf_counter() - started, 2), **result}
    target = args.out / f"stage_{args.stage}.json"
    partial = target.with_suffix(".json.tmp")
    partial.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(partial, target)
    print(json.dumps({k: v for k, v in summary.items() if k != "commands"}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
