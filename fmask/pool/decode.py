"""Decoding the user's image files into the pool's uint8 cache, in worker processes.

Every file is read once: its bytes are hashed (duplicates are found by hash), decoded with EXIF orientation applied,
converted to RGB (or one channel), resized to the cache's size and written straight into its row of the
memory-mapped cache; only a few numbers per file travel back to the parent. A file that cannot be read or decoded
is reported with the reason and its row is left for the caller to drop.

This module imports only numpy and PIL (no torch), so worker processes start in a fraction of a second."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import types
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from fmask.core.errors import FmaskError
from fmask.pool.cache import channel_sums, create_rows, open_rows
from fmask.core.progress import ProgressFn

RESIZE_MODES = ("crop", "pad", "stretch")
FILES_PER_TASK = 32  # files a worker decodes per task: large enough to amortise the messages, small for balance
OK, BAD, SIZE = "ok", "bad", "size"  # what decoding a file gave



@dataclass(frozen=True)
class DecodeOptions:
    """How every file becomes a cache row: ``size`` (height, width); ``resize`` one of RESIZE_MODES, or None when
    every image must already have ``size``; ``channels`` 3 (RGB) or 1 (grayscale)."""

    size: tuple[int, int]
    resize: Optional[str]
    channels: int = 3


@dataclass(slots=True)  # one per file of a possibly huge folder: kept small
class FileResult:
    """What decoding one file gave; ``status`` is OK, BAD (``reason`` says why) or SIZE (another size than the
    cache's, with ``resize`` None)."""

    status: str
    reason: str = ""
    sha256: str = ""
    width: int = 0  # as displayed: after EXIF orientation, before resizing
    height: int = 0
    sums: Optional[tuple[int, ...]] = None  # per channel, of the cache row
    squares: Optional[tuple[int, ...]] = None


class BadImage(Exception):
    """A file that is not a decodable image; the message is the reason listed in skipped.csv."""


def _to_8bit(image):
    """Images with 16- or 32-bit integer or float pixels -> 8-bit grayscale ("L"): 16-bit values are scaled by
    255/65535, floats are clipped to 0..255."""
    from PIL import Image

    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(np.rint(array), 0, 255)
    else:
        scaled = (np.clip(array.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _to_channels(image, channels: int):
    """Any PIL mode -> "RGB" (channels 3) or "L" (channels 1); transparency is composited on white."""
    from PIL import Image

    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")  # keeps a palette's transparent index
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def _resized(image, options: DecodeOptions):
    from PIL import Image, ImageOps

    height, width = options.size
    if image.size == (width, height):
        return image
    method = Image.Resampling.BICUBIC
    if options.resize == "crop":  # shorter side to the size, centre crop
        return ImageOps.fit(image, (width, height), method=method, centering=(0.5, 0.5))
    if options.resize == "pad":  # longer side to the size, centred on black
        return ImageOps.pad(image, (width, height), method=method, color=0, centering=(0.5, 0.5))
    return image.resize((width, height), method)


def decode_bytes(data: bytes, options: DecodeOptions) -> tuple[Optional[np.ndarray], int, int]:
    """(the cache row (C, H, W) uint8, or None when the image's size differs and ``options.resize`` is None;
    displayed width; displayed height). Raises BadImage with the reason."""
    from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big photos are fine; bombs still fail
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            try:
                orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
            except Exception:  # malformed EXIF: show the pixels as stored
                orientation = 1
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the displayed image is transposed
                width, height = height, width
            if options.resize is not None:
                # JPEG: decode at the smallest 1/2^k scale that is still at least the cache's size (much faster
                # for large photos); other formats ignore this.
                image.draft("RGB" if options.channels == 3 else "L", (max(options.size), max(options.size)))
            image.load()
            if orientation != 1:
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # malformed EXIF: keep the stored orientation
                    pass
            image = _to_channels(image, options.channels)
            if options.resize is None and image.size != (options.size[1], options.size[0]):
                return None, width, height
            image = _resized(image, options)
            array = np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError:
        raise BadImage("not an image, or a format PIL cannot read") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large to decode safely ({exc})") from None
    except Exception as exc:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError, ...
        raise BadImage(f"corrupt or truncated image data ({exc.__class__.__name__}: {exc})"[:200]) from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), width, height


def decode_file(path: str, options: DecodeOptions) -> tuple[FileResult, Optional[np.ndarray]]:
    """Read, hash and decode one file; (its result, its cache row or None)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return FileResult(BAD, f"cannot read the file ({exc.strerror or exc})"), None
    digest = hashlib.sha256(data).hexdigest()
    try:
        row, width, height = decode_bytes(data, options)
    except BadImage as exc:
        return FileResult(BAD, str(exc), digest), None
    if row is None:
        return FileResult(SIZE, f"{width}x{height}", digest, width, height), None
    sums, squares = channel_sums(row)
    return FileResult(OK, "", digest, width, height, tuple(sums), tuple(squares)), row


# ---- Worker processes ----------------------------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(cache_path: str, options: DecodeOptions) -> None:
    _worker["rows"] = open_rows(cache_path, writable=True)
    _worker["options"] = options


def _decode_task(tasks: Sequence[tuple[int, str]]) -> list[tuple[int, FileResult]]:
    """Decode (row, path) pairs into the shared cache; the results travel back, the pixels do not."""
    rows, options = _worker["rows"], _worker["options"]
    results = []
    for row, path in tasks:
        result, image = decode_file(path, options)
        if image is not None:
            rows[row] = image
        results.append((row, result))
    return results


@contextmanager
def _light_spawn() -> Iterator[None]:
    """Spawned workers re-import the parent's ``__main__``; for the ``fmask`` command that is the whole CLI with
    torch (about 2 s and 300 MB each). Workers need only this module, so ``__main__`` is hidden while they start."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def probe_size(files: Sequence[str], channels: int) -> Optional[tuple[int, int, int]]:
    """(index, height, width) of the first decodable file, in order: the one size a pool without --image-size
    must have; None when no file decodes."""
    for index, path in enumerate(files):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            _, width, height = decode_bytes(data, DecodeOptions((1, 1), "stretch", channels))
        except (OSError, BadImage):
            continue
        return index, height, width
    return None


def decode_into_cache(files: Sequence[str], cache_path: str | os.PathLike, options: DecodeOptions, *,
                      workers: int, stop_on_bad: bool = False, progress: Optional[ProgressFn] = None,
                      what: str = "decoding images") -> list[Optional[FileResult]]:
    """Decode ``files`` into a new cache file at ``cache_path`` (row i = file i; rows of bad files stay zero).

    Returns one result per file. With ``stop_on_bad`` a bad file ends the work early, and so does an image of
    another size when ``options.resize`` is None: files not decoded by then have None."""
    count = len(files)
    rows = create_rows(cache_path, (count, options.channels, *options.size))
    results: list[Optional[FileResult]] = [None] * count

    def stop_at(result: FileResult) -> bool:
        return result.status == SIZE or (stop_on_bad and result.status == BAD)

    if workers <= 1 or count <= 2 * FILES_PER_TASK:
        for index, path in enumerate(files):
            result, image = decode_file(path, options)
            if image is not None:
                rows[index] = image
            results[index] = result
            if progress is not None:
                progress(what, index + 1, count)
            if stop_at(result):
                break
        rows.flush()
        del rows
    else:
        rows.flush()
        del rows  # the workers map the file themselves
        _decode_in_workers(files, str(cache_path), options, workers, results, stop_at, progress, what)
    return results


def _decode_in_workers(files: Sequence[str], cache_path: str, options: DecodeOptions, workers: int,
                       results: list, stop_at: Callable[[FileResult], bool], progress: Optional[ProgressFn],
                       what: str) -> None:
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    tasks = ([(i, files[i]) for i in range(start, min(start + FILES_PER_TASK, len(files)))]
             for start in range(0, len(files), FILES_PER_TASK))
    workers = min(workers, -(-len(files) // FILES_PER_TASK))
    done_files = 0
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=(cache_path, options))
    try:
        # A few tasks per worker in flight: the work stays balanced, and neither the tasks nor their results pile
        # up in memory for a huge folder.
        with _light_spawn():  # the workers start during these first submits
            pending: set[Future] = {executor.submit(_decode_task, task) for task in islice(tasks, 4 * workers)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            stop = False
            for future in finished:
                for index, result in future.result():
                    results[index] = result
                    stop = stop or stop_at(result)
                    done_files += 1
            if progress is not None:
                progress(what, done_files, len(files))
            if stop:
                for future in pending:
                    future.cancel()
                break
            pending |= {executor.submit(_decode_task, task) for task in islice(tasks, len(finished))}
    except BrokenProcessPool as exc:
        raise FmaskError("an image decoder process crashed on one of the files; rerun with --workers 1 to find the "
                         "file, then remove it") from exc
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
