"""Reading and writing artifacts: atomic writes, content hashes, reads that turn a missing or corrupt file
into one clear FmaskError naming the step that makes it, and the advisory lock every writing step holds on
the directory it writes (:func:`output_lock`)."""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from fmask.errors import FmaskError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks; atomic writes still keep every artifact whole
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
STEP_KEY = "step"  # where every artifact records the inputs' hashes and parameters that made it
SEAL_KEY = "content_sha256"  # in JSON artifacts: hash of every other key, so a changed bit is refused on read
LOCK_NAME = ".fmask.lock"  # in a directory while an fmask command writes it (removed when the command ends)


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


def seal_json(obj: dict) -> dict:
    """``obj`` with :data:`SEAL_KEY` set to the hash of all its other keys (an earlier seal is replaced)."""
    body = {key: value for key, value in obj.items() if key != SEAL_KEY}
    return {**body, SEAL_KEY: sha256_json(body)}


def seal_matches(obj: Any) -> bool:
    """False only for a sealed JSON object whose content no longer matches its seal (unsealed ones pass)."""
    if not isinstance(obj, dict) or SEAL_KEY not in obj:
        return True
    return obj[SEAL_KEY] == sha256_json({key: value for key, value in obj.items() if key != SEAL_KEY})


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


def json_bytes(obj: Any) -> bytes:
    """How fmask writes every JSON artifact."""
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


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


def recorded_step(path: str | os.PathLike) -> dict | None:
    """The step key an existing artifact records, or None when absent, unreadable or corrupt (so the step that
    makes it runs again instead of skipping over a damaged file)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            return obj.get(STEP_KEY) if seal_matches(obj) else None
        if path.suffix == ".safetensors":
            from safetensors.torch import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(STEP_KEY)
            return json.loads(text) if text else None
        if path.suffix == ".pt":
            if not zip_is_intact(path):
                return None
            return torch.load(path, map_location="cpu", weights_only=True).get(STEP_KEY)
    except Exception:  # an unreadable output is simply not current; the step rewrites it
        return None
    return None


def step_is_current(path: str | os.PathLike, step: dict) -> bool:
    """True when ``path`` exists and was made by the same inputs and parameters (``step``)."""
    recorded = recorded_step(path)
    return recorded is not None and sha256_json(recorded) == sha256_json(step)


# ---- The output lock: one writer per directory -------------------------------------------------------------------

LOCK_GRACE_SECONDS = 0.5  # retry this long before refusing: another command may be only probing the lock
_MKSTEMP_TAIL = r"\.[a-z0-9_]{8}"  # the random part tempfile.mkstemp / mkdtemp put in fmask's temp names
_held: dict[str, bool] = {}  # directories this process holds the lock of -> whether the lock covers subdirectories
_held_guard = threading.Lock()


@dataclass
class LockHolder:
    """Who holds a directory's lock, as its lock file says."""

    pid: Optional[int]
    command: str
    tree: bool  # the holder writes the whole directory tree below (``fmask run``), not just the directory

    def describe(self) -> str:
        return f"another fmask command (pid {self.pid}: {self.command})" if self.pid else "another fmask command"


def _read_holder(lock_path: Path) -> LockHolder:
    # The holder writes its details right after taking the lock; a reader may come in between, so retry briefly.
    for _ in range(20):
        try:
            info = json.loads(lock_path.read_text() or "null")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            info = None
        if isinstance(info, dict):
            pid = info.get("pid")
            return LockHolder(pid if isinstance(pid, int) else None, str(info.get("command", "unknown")),
                              bool(info.get("tree", False)))
        time.sleep(0.01)
    return LockHolder(None, "unknown", False)


def lock_holder(directory: str | os.PathLike) -> Optional[LockHolder]:
    """The holder of ``directory``'s lock when another process holds it now; None when it is free (or POSIX
    locks are unavailable). Locks this process holds are not reported."""
    directory = Path(directory)
    if fcntl is None or str(directory.resolve()) in _held:
        return None
    lock_path = directory / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared probe: it fails only while a writer holds it
        except BlockingIOError:
            return _read_holder(lock_path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy(holder: LockHolder, held_dir: Path, directory: Path) -> FmaskError:
    where = f"{held_dir}" if held_dir == directory else f"{held_dir}, which holds {directory}"
    return FmaskError(f"{holder.describe()} is writing {where}; wait for it or use another --out")


def _make_directory(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; returns the ones created (outermost first)."""
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise FmaskError(f"cannot write {directory}: {probe} is a file, not a directory; choose another --out")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            if not path.is_dir():
                _remove_empty(created)
                raise FmaskError(f"cannot write {directory}: {path} is a file, not a directory; choose another --out")
        except OSError as exc:
            _remove_empty(created)
            raise FmaskError(f"cannot write {directory}: {exc.strerror or exc}; choose another --out") from exc
    return created


def _remove_empty(created: Sequence[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def remove_stale_temps(directory: Path, outputs: Sequence[str]) -> int:
    """Temp files (and export temp directories) of ``outputs`` that a killed command left in ``directory``.

    Call only while holding ``directory``'s lock: then no other fmask command is writing them."""
    removed = 0
    for name in outputs:
        pattern = re.compile(rf"\.{re.escape(name)}(?:{_MKSTEMP_TAIL}\.tmp|\.old{_MKSTEMP_TAIL})")
        for path in directory.glob(f".{glob.escape(name)}.*"):
            if not pattern.fullmatch(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def _open_and_lock(lock_path: Path, directory: Path, command: str, tree: bool) -> Optional[int]:
    """The fd of ``lock_path`` locked exclusively, its holder details written; None when the directory cannot
    hold a lock file (read-only: nothing can be written there, so no writer can interleave)."""
    deadline = time.monotonic() + LOCK_GRACE_SECONDS
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise FmaskError(f"cannot write {directory}: {exc.strerror or exc}; choose another --out") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise _busy(_read_holder(lock_path), directory, directory) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file as we opened it: lock the current one instead
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "tree": tree,
                                     "host": socket.gethostname()}).encode())
        except OSError:
            pass  # a full disk: the lock still holds; others just cannot name its holder (the step reports ENOSPC)
        return fd


@contextmanager
def output_lock(directory: str | os.PathLike, command: str, *, tree: bool = False,
                outputs: Sequence[str] = ()) -> Iterator[None]:
    """Hold the advisory lock of ``directory`` (created if missing) while a step writes in it.

    Another fmask command holding it gets one FmaskError line naming its pid and command; so does a command
    writing below a directory whose holder passed ``tree=True`` (``fmask run`` owns its whole results tree), and
    a ``tree`` lock is refused while any directory below is being written. The lock is a ``fcntl.flock`` on
    ``directory/.fmask.lock`` (pid and command inside); the kernel drops it when the process dies, even by
    SIGKILL, and the file is removed on release. Re-entrant within a process. Holding it, temp files of
    ``outputs`` (file names in ``directory``) left by a killed command are removed. When the block fails,
    directories this call created and that stayed empty are removed again.
    """
    directory = Path(directory)
    key = str(directory.resolve())
    if fcntl is None:
        yield
        return
    if key in _held:  # a step inside a step of this process (``fmask run``): the outer block holds the lock
        yield
        return
    resolved = Path(key)
    for ancestor in resolved.parents:
        if _held.get(str(ancestor)):
            break  # this process writes the tree above: nobody else can hold a lock inside it
        if (ancestor / LOCK_NAME).is_file():
            holder = lock_holder(ancestor)
            if holder is not None and holder.tree:
                raise _busy(holder, ancestor, resolved)
    created = _make_directory(directory)
    lock_path = directory / LOCK_NAME
    try:
        fd = _open_and_lock(lock_path, directory, command, tree)
    except BaseException:
        _remove_empty(created)
        raise
    failed = False
    try:
        if fd is not None:
            with _held_guard:
                _held[key] = tree
            if tree:
                for inner in sorted(directory.rglob(LOCK_NAME)):
                    holder = lock_holder(inner.parent) if inner.parent != directory else None
                    if holder is not None:
                        raise _busy(holder, inner.parent, inner.parent)
            remove_stale_temps(directory, outputs)
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if fd is not None:
            with _held_guard:
                _held.pop(key, None)
            lock_path.unlink(missing_ok=True)  # while still locked: a waiter then sees the inode vanish and retries
            os.close(fd)
        if failed:
            _remove_empty(created)
