"""Numerics on accelerators: exact float32 for the steps that rank by small differences, and deterministic runs.

PyTorch lets cuDNN convolutions use TF32 by default (about 1e-3 relative precision), and matmuls too under
``torch.set_float32_matmul_precision("high")`` (oneDNN even bf16 on CPUs under ``"medium"``). ``fmask fisher``
and ``fmask query`` rank parameters and candidates by small differences, so they run inside
:func:`exact_float32`; training keeps whatever the caller chose, for speed.

Since PyTorch 2.9 these settings exist twice: the legacy switches (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``, ``torch.set_float32_matmul_precision``) and the per-backend, per-operation
``fp32_precision`` properties; PyTorch refuses to run a matmul while the two disagree. :func:`exact_float32`
therefore sets both, and restores both to exactly what they were.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from contextlib import contextmanager
from typing import Any, ContextManager, Iterator, Optional

import torch

from fmask.core.errors import FmaskError

# (backend path, operation) of the fp32_precision properties, parents before children: setting a parent
# rewrites its children, so restoring in this order leaves every one as it was.
_PRECISION_PATHS = (
    ("", None), ("cuda", None), ("cudnn", None), ("mkldnn", None),
    ("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)
_REDUCED = ("tf32", "bf16")  # fp32_precision values that are not full float32
CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results


def _precision_owner(backend: str, op: Optional[str]):
    owner: Any = torch.backends
    for part in [p for p in (backend, op) if p]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    try:
        getattr(owner, "fp32_precision")
    except (AttributeError, RuntimeError):
        return None  # PyTorch before 2.9: only the legacy switches exist
    return owner


def _legacy(getter):
    try:
        return getter()
    except RuntimeError:
        return None


def float32_settings() -> dict[str, object]:
    """Every float32 precision setting PyTorch has, by name (legacy switches, and fp32_precision where present)."""
    settings: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy getters warn that they are deprecated
        # None: the caller set the two APIs apart, and PyTorch refuses to read the legacy value
        settings["float32_matmul_precision"] = _legacy(torch.get_float32_matmul_precision)
        settings["cudnn.allow_tf32"] = _legacy(lambda: bool(torch.backends.cudnn.allow_tf32))
    for backend, op in _PRECISION_PATHS:
        owner = _precision_owner(backend, op)
        if owner is not None:
            settings[".".join(p for p in (backend, op, "fp32_precision") if p)] = owner.fp32_precision
    return settings


def is_exact_float32() -> bool:
    """No matmul or convolution may use TF32 or bf16 for float32 work, on any backend."""
    settings = float32_settings()
    if settings["float32_matmul_precision"] != "highest" or settings["cudnn.allow_tf32"] is not False:
        return False
    return not any(value in _REDUCED for key, value in settings.items() if key.endswith("fp32_precision")
                   and key.count(".") == 2)  # the per-operation ones decide; parents only pass values down


def _set_precisions(values: dict[str, object]) -> None:
    for backend, op in _PRECISION_PATHS:
        key = ".".join(p for p in (backend, op, "fp32_precision") if p)
        owner = _precision_owner(backend, op)
        if owner is not None and key in values and values[key] != owner.fp32_precision:
            owner.fp32_precision = values[key]


@contextmanager
def exact_float32() -> Iterator[None]:
    """Run the block in full float32 on every backend (no TF32 matmuls or convolutions, no bf16 oneDNN matmuls),
    then restore the caller's settings exactly."""
    saved = float32_settings()
    try:
        # Legacy switches first (they keep the legacy and per-operation states in agreement), then any
        # per-operation setting still reduced (one inherited from a parent set to tf32, say) to full float32.
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        _set_precisions({key: "ieee" for key, value in float32_settings().items()
                         if key.endswith("fp32_precision") and key.count(".") == 2 and value in _REDUCED})
        yield
    finally:
        # A legacy value PyTorch would not read cannot be put back; the fp32_precision values below still are.
        if saved["float32_matmul_precision"] is not None:
            torch.set_float32_matmul_precision(str(saved["float32_matmul_precision"]))
        if saved["cudnn.allow_tf32"] is not None:
            torch.backends.cudnn.allow_tf32 = bool(saved["cudnn.allow_tf32"])
        _set_precisions(saved)


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Within the block (when ``enabled``) PyTorch uses deterministic algorithms only, cuDNN included, so a rerun
    on the same GPU and software gives identical results; an operation that has none becomes an FmaskError.
    Restores the previous mode afterwards. ``CUBLAS_WORKSPACE_CONFIG`` is set (unless the user set it) for
    cuBLAS; it takes effect when cuBLAS starts, so enter this before the first CUDA matmul of the process."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    except RuntimeError as exc:
        if "deterministic" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmaskError(f"--deterministic: {first.split(', but you set')[0]}; drop --deterministic or use "
                         "another model") from exc
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


def deterministic_enabled() -> bool:
    """Whether deterministic algorithms are on (steps record it in their keys when they are)."""
    return torch.are_deterministic_algorithms_enabled()


# ---- Training and inference precision (autocast) --------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs with native bf16 (compute capability 8.0+), else fp32; other names are checked."""
    if name not in PRECISIONS:
        raise FmaskError(f"unknown precision {name!r}; use one of: {', '.join(PRECISIONS)}")
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if name == "auto":
        return "bf16" if native_bf16 else "fp32"
    if name == "bf16" and device.type == "cuda" and not native_bf16:
        raise FmaskError("this GPU has no native bf16 (needs compute capability 8.0+); use --precision fp16 or fp32")
    return name


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
