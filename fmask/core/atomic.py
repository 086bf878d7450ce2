"""Atomic writes: a temp file beside the target, fsynced, then one ``os.replace``, so a killed command never leaves
a half-written artifact under a name fmask reads."""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from fmask.core.errors import FmaskError
from fmask.core.hashing import json_bytes

__all__ = ["check_writable", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save",
           "atomic_save_safetensors", "sorted_safetensors_header"]


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


_UMASK = os.umask(0)
os.umask(_UMASK)


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
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
    atomic_write_bytes(path, json_bytes(obj))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    # Serialised in memory first: torch.save reports a full disk as an opaque RuntimeError ("unexpected pos"),
    # while a plain write raises OSError(ENOSPC), which atomic_path turns into one clear line.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # In memory first, like atomic_torch_save: safetensors' own save_file raises SafetensorError on a full disk and
    # renames its own temp file into place, which a kill can leave behind under a name fmask does not know.
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    header, data_start = sorted_safetensors_header(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header)
        handle.write(memoryview(data)[data_start:])  # no copy of the (possibly GB-sized) tensor data


def sorted_safetensors_header(data: bytes) -> tuple[bytes, int]:
    """The length prefix and JSON header of the safetensors file ``data`` with the header's keys sorted, and where
    the tensor data starts in ``data``.

    safetensors writes the header from a hash map whose order changes from one process (or call) to the next, so
    equal tensors and metadata gave different bytes, and a file hash recorded downstream (a query's record of its
    mask) changed on every rewrite. Data offsets are relative to the data buffer, so only the header changes.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces so the data stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text, 8 + size
