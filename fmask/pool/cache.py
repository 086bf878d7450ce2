"""The pool's decoded image cache: uint8 arrays in ``.npy`` files, written row by row into a memory-mapped file and
read back memory-mapped, so neither building nor any later step holds the whole pool in memory.

Only numpy is imported here: the decode worker processes (fmask.pool.decode) write rows through these helpers
and must start without torch."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib import format as npy_format

ROWS_PER_COPY = 1024  # rows moved at a time when a cache is compacted in place


def create_rows(path: str | os.PathLike, shape: Sequence[int], dtype=np.uint8) -> np.memmap:
    """A new ``.npy`` file of ``shape`` mapped for writing. Its blocks are reserved up front, so a full disk is an
    OSError here rather than a SIGBUS at some later row."""
    rows = npy_format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape))
    nbytes = rows.offset + rows.nbytes
    if rows.nbytes and hasattr(os, "posix_fallocate"):
        with open(path, "rb+") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, nbytes)
            except OSError as exc:
                if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot reserve; write as we go
                    raise
    return rows


def open_rows(path: str | os.PathLike, *, writable: bool = False) -> np.ndarray:
    """A ``.npy`` file memory-mapped: ``writable`` maps it shared (writes reach the file, as decode workers need);
    otherwise copy-on-write, so the array is writable for torch.from_numpy but the file is never changed."""
    header = read_header(path)
    shape, dtype = header["shape"], np.dtype(header["descr"])
    if int(np.prod(shape)) == 0:  # an empty file region cannot be mapped
        return np.zeros(shape, dtype=dtype)
    return npy_format.open_memmap(path, mode="r+" if writable else "c")


def read_header(path: str | os.PathLike) -> dict:
    """The ``.npy`` header (shape, descr, fortran_order) and where the data starts (``offset``)."""
    with open(path, "rb") as handle:
        version = npy_format.read_magic(handle)
        reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran_order, dtype = reader(handle)
        return {"shape": tuple(shape), "fortran_order": fortran_order, "descr": npy_format.dtype_to_descr(dtype),
                "offset": handle.tell()}


def keep_rows(path: str | os.PathLike, keep: np.ndarray) -> None:
    """Keep only rows ``keep`` (ascending) of the ``.npy`` file at ``path``, in place: rows move forward in blocks,
    the file is truncated and its header rewritten with the new length. No more than a block is held in memory."""
    keep = np.asarray(keep, dtype=np.int64)
    header = read_header(path)
    shape = header["shape"]
    if len(keep) == shape[0] and (len(keep) == 0 or keep[-1] == len(keep) - 1):
        return
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(header["descr"]).itemsize
    if len(keep) and shape[0]:
        rows = np.memmap(path, dtype=np.uint8, mode="r+", offset=header["offset"], shape=(shape[0], row_bytes))
        # Runs of consecutive kept rows move as one slice (forward, so a move never overwrites a row still to come).
        breaks = np.flatnonzero(np.diff(keep) != 1) + 1
        target = 0
        for run in np.split(keep, breaks):
            for start in range(0, len(run), ROWS_PER_COPY):
                source = run[start:start + ROWS_PER_COPY]
                if source[0] != target:
                    rows[target:target + len(source)] = rows[source[0]:source[0] + len(source)]
                target += len(source)
        rows.flush()
        del rows
    new_header = _header_bytes({**header, "shape": (len(keep), *shape[1:])})
    if len(new_header) != header["offset"]:  # numpy leaves room for the length to change; if not, copy the rows
        _rewrite_with_header(path, new_header, header["offset"], len(keep) * row_bytes)
        return
    with open(path, "rb+") as handle:
        handle.write(new_header)
        handle.truncate(header["offset"] + len(keep) * row_bytes)


def _header_bytes(header: dict) -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, {key: header[key] for key in ("descr", "fortran_order", "shape")})
    return buffer.getvalue()


def _rewrite_with_header(path: str | os.PathLike, new_header: bytes, old_offset: int, nbytes: int) -> None:
    tmp = Path(str(path) + ".rewrite")
    with open(path, "rb") as source, open(tmp, "wb") as target:
        target.write(new_header)
        source.seek(old_offset)
        remaining = nbytes
        while remaining:
            block = source.read(min(remaining, 1 << 24))
            target.write(block)
            remaining -= len(block)
    os.replace(tmp, path)


def channel_sums(image: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-channel sum and sum of squares of a uint8 image (C, H, W), as exact integers."""
    flat = image.reshape(image.shape[0], -1).astype(np.int64)
    return flat.sum(axis=1).tolist(), np.einsum("ij,ij->i", flat, flat).tolist()


class PixelStats:
    """Per-channel mean and standard deviation of pixels / 255 over many images, from exact integer sums (so the
    result does not depend on the order or the batching of the images)."""

    def __init__(self, channels: int) -> None:
        self.sums = [0] * channels
        self.squares = [0] * channels
        self.pixels = 0  # pixels per channel seen

    def add(self, sums: Sequence[int], squares: Sequence[int], pixels: int) -> None:
        self.sums = [a + int(b) for a, b in zip(self.sums, sums)]
        self.squares = [a + int(b) for a, b in zip(self.squares, squares)]
        self.pixels += int(pixels)

    def add_images(self, images: np.ndarray) -> None:
        """Add a batch of uint8 images (n, C, H, W)."""
        if len(images):
            flat = np.moveaxis(images, 1, 0).reshape(images.shape[1], -1).astype(np.int64)
            self.add(flat.sum(axis=1).tolist(), np.einsum("ij,ij->i", flat, flat).tolist(), flat.shape[1])

    def mean_std(self) -> tuple[list[float], list[float]]:
        if not self.pixels:
            return [0.5] * len(self.sums), [0.25] * len(self.sums)
        n = self.pixels
        mean = [s / (255.0 * n) for s in self.sums]
        # Var = E[x^2] - E[x]^2 from exact integer sums: (n * S2 - S1^2) / (255 n)^2, no cancellation error.
        std = [max(((n * q - s * s) ** 0.5) / (255.0 * n), 1e-3) for s, q in zip(self.sums, self.squares)]
        return mean, std
