"""The output lock: one writer per directory. Every writing step holds an advisory lock on the directory it
writes (:func:`output_lock`); a second command writing there is refused with the holder's name."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from fmask.core.errors import FmaskError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks; atomic writes still keep every artifact whole
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".fmask.lock"  # in a directory while an fmask command writes it (removed when the command ends)
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
