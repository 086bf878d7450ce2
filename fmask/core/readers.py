"""Readers that turn a missing or corrupt artifact into one clear FmaskError naming the step that makes it; .pt
files are loaded with ``weights_only=True`` (never unpickling code), safetensors optionally memory-mapped."""

from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fmask.core.errors import FmaskError
from fmask.core.hashing import SEAL_KEY, seal_matches

__all__ = ["zip_is_intact", "read_json", "read_safetensors", "safetensors_shapes", "read_safetensors_rows",
           "SAFETENSORS_DTYPES", "mmap_safetensors", "read_torch"]


def zip_is_intact(path: str | os.PathLike) -> bool:
    """For a zip file (every .pt fmask writes): True when each entry matches its CRC-32, which torch.load never
    checks, so a flipped bit in the pickled metadata or the weights is caught. Non-zip files pass."""
    try:
        if not zipfile.is_zipfile(path):
            return True
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError):
        return False

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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly nested
        raise FmaskError(f"{what} {path} is not valid JSON ({exc.__class__.__name__}); rerun `{made_by}`") from exc
    if not isinstance(obj, dict):
        raise FmaskError(f"{what} {path} is not an fmask artifact (expected a JSON object); rerun `{made_by}`")
    if not seal_matches(obj):
        raise FmaskError(f"{what} {path} was changed after fmask wrote it (its content hash does not match); rerun "
                         f"`{made_by}`, or delete its \"{SEAL_KEY}\" key if you edited it on purpose")
    return obj


def read_safetensors(path: str | os.PathLike, *, what: str, made_by: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    path = Path(path)
    with _open_safetensors(path, what, made_by) as handle:
        metadata = dict(handle.metadata() or {})
    with _safetensors_errors(path, what, made_by):
        tensors = load_file(str(path))
    return tensors, metadata


@contextmanager
def _safetensors_errors(path: Path, what: str, made_by: str) -> Iterator[None]:
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FmaskError(f"{what} {path} is corrupt or not a safetensors file; rerun `{made_by}`") from exc


def _open_safetensors(path: Path, what: str, made_by: str):
    from safetensors.torch import safe_open

    _require_file(path, what, made_by)
    with _safetensors_errors(path, what, made_by):
        return safe_open(str(path), framework="pt")


def safetensors_shapes(path: str | os.PathLike, *, what: str, made_by: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Each tensor's shape and the metadata, from the header alone (no tensor is read)."""
    path = Path(path)
    with _open_safetensors(path, what, made_by) as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}, dict(handle.metadata() or {})


def read_safetensors_rows(path: str | os.PathLike, rows: dict[str, tuple[int, int]], *, what: str,
                          made_by: str) -> dict[str, torch.Tensor]:
    """Rows start..stop of the named tensors, reading only those rows (a rank's shard of a cache, not all of it)."""
    path = Path(path)
    with _open_safetensors(path, what, made_by) as handle, _safetensors_errors(path, what, made_by):
        return {name: handle.get_slice(name)[start:stop].clone() for name, (start, stop) in rows.items()}


SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def mmap_safetensors(path: str | os.PathLike, *, what: str, made_by: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of a private memory map of it (pages are read when touched and
    never written back), and its metadata: a cache larger than RAM costs only the rows that are used."""
    import numpy as np

    path = Path(path)
    _require_file(path, what, made_by)
    with _safetensors_errors(path, what, made_by):
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, the file untouched
        metadata = dict(header.pop("__metadata__", None) or {})
        tensors = {}
        for name, entry in header.items():
            try:
                start, stop = (8 + size + int(offset) for offset in entry["data_offsets"])
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            except (KeyError, TypeError) as exc:
                raise ValueError(f"malformed header entry {name!r}") from exc
            if stop > len(data) or start > stop:
                raise ValueError(f"{name!r} lies outside the file (truncated)")
            flat = torch.from_numpy(data[start:stop]) if stop > start else torch.empty(0, dtype=torch.uint8)
            tensors[name] = flat.view(dtype).reshape(entry["shape"])
    return tensors, metadata


def read_torch(path: str | os.PathLike, *, what: str, made_by: str) -> dict:
    """Load a .pt with ``weights_only=True``: never runs code a file carries."""
    import pickle
    import zipfile

    path = Path(path)
    _require_file(path, what, made_by)
    if not zip_is_intact(path):
        raise FmaskError(f"{what} {path} is corrupt (its zip checksums do not match: truncated or changed on disk); "
                         f"rerun `{made_by}`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError,
            TypeError, KeyError, ImportError) as exc:
        raise FmaskError(f"{what} {path} is corrupt or not an fmask file (refused to unpickle it); rerun `{made_by}`") from exc
    if not isinstance(obj, dict):
        raise FmaskError(f"{what} {path} is not an fmask checkpoint; rerun `{made_by}`")
    return obj
