"""Reading and writing artifacts: atomic writes, content hashes, and reads that turn a missing or corrupt
file into one clear FmaskError naming the step that makes it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from fmask.errors import FmaskError

FORMAT_VERSION = 1
STEP_KEY = "step"  # where every artifact records the inputs' hashes and parameters that made it


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise FmaskError(f"cannot write {path}: {probe} is not a writable directory; choose another --out")
    if path.exists() and path.is_dir():
        raise FmaskError(f"cannot write {path}: it is a directory; give a file path to --out")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # durable before it becomes visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FmaskError(f"could not write {path}: {exc.strerror or exc}; free space or choose another --out") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _require_file(path: Path, what: str, made_by: str) -> None:
    if not path.exists():
        raise FmaskError(f"{what} {path} does not exist; run `{made_by}` first")
    if not path.is_file():
        raise FmaskError(f"{what} {path} is not a file; pass the file `{made_by}` wrote")


def read_json(path: str | os.PathLike, *, what: str, made_by: str) -> dict:
    path = Path(path)
    _require_file(path, what, made_by)
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FmaskError(f"{what} {path} is not valid JSON ({exc.__class__.__name__}); rerun `{made_by}`") from exc
    if not isinstance(obj, dict):
        raise FmaskError(f"{what} {path} is not an fmask artifact (expected a JSON object); rerun `{made_by}`")
    return obj


def read_safetensors(path: str | os.PathLike, *, what: str, made_by: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    _require_file(path, what, made_by)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FmaskError(f"{what} {path} is corrupt or not a safetensors file; rerun `{made_by}`") from exc
    return tensors, metadata


def read_torch(path: str | os.PathLike, *, what: str, made_by: str) -> dict:
    """Load a .pt with ``weights_only=True``: never runs code a file carries."""
    import pickle
    import zipfile

    path = Path(path)
    _require_file(path, what, made_by)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            TypeError, KeyError, ImportError) as exc:
        raise FmaskError(f"{what} {path} is corrupt or not an fmask file (refused to unpickle it); rerun `{made_by}`") from exc
    if not isinstance(obj, dict):
        raise FmaskError(f"{what} {path} is not an fmask checkpoint; rerun `{made_by}`")
    return obj


def recorded_step(path: str | os.PathLike) -> dict | None:
    """The step key an existing artifact records, or None when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get(STEP_KEY)
        if path.suffix == ".safetensors":
            from safetensors.torch import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(STEP_KEY)
            return json.loads(text) if text else None
        if path.suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True).get(STEP_KEY)
    except Exception:  # an unreadable output is simply not current; the step rewrites it
        return None
    return None


def step_is_current(path: str | os.PathLike, step: dict) -> bool:
    """True when ``path`` exists and was made by the same inputs and parameters (``step``)."""
    recorded = recorded_step(path)
    return recorded is not None and sha256_json(recorded) == sha256_json(step)
