"""The user's own image files: listing a folder (or reading a CSV that lists them), the labels CSV, the class set
and the test set, and the CSV files a pool built from them carries (samples, skipped, duplicates).

A sample's ``path`` is the POSIX path relative to the folder (for a CSV: as written in it); paths are compared
exactly everywhere and ordered by their UTF-8 bytes, so ids are the same on any machine and filesystem."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from fmask.core.errors import FmaskError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm"}
SIDECAR_PREFIX = "._"  # macOS AppleDouble files that hold a photo's metadata next to it


@dataclass(slots=True)  # one per file of a possibly huge folder: kept small
class ImageFile:
    """One listed file: its sample ``path`` (how the user names it), where it is on disk, and its label text from
    the images CSV or the test set, when one is given."""

    path: str
    file: str
    label: Optional[str] = None
    stat: tuple = field(default=(), repr=False)  # (size, mtime_ns): the build's step key notices changed files


@dataclass
class Skipped:
    path: str
    reason: str
    split: str = "pool"


def path_order(path: str) -> bytes:
    """Sort key of sample paths: their UTF-8 bytes."""
    return path.encode("utf-8")


def printable(path: str) -> str:
    """A path as text even when its name is not valid UTF-8 (undecodable bytes appear as \\xNN)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_image_folder(root: Path, *, exclude: Optional[Path] = None, split: str = "pool"
                      ) -> tuple[list[ImageFile], list[Skipped]]:
    """Every image file below ``root`` (recursive, symlinks to files followed, hidden folders not entered), sorted
    by path. Hidden files and other suffixes are ignored; ``._`` sidecars with an image suffix and names that are
    not UTF-8 are listed as skipped. ``exclude`` (a folder below ``root``, e.g. the pool being written) is left out."""
    files: list[ImageFile] = []
    skipped: list[Skipped] = []
    excluded = exclude.resolve() if exclude is not None else None
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise FmaskError(f"cannot list {folder} ({exc.strerror or exc}); check its permissions") from exc
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_dir():
                if not entry.name.startswith(".") and (excluded is None or Path(entry.path).resolve() != excluded):
                    stack.append((Path(entry.path), relative + "/"))
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix not in IMAGE_SUFFIXES or not entry.is_file():
                continue
            if entry.name.startswith(SIDECAR_PREFIX):
                skipped.append(Skipped(printable(relative), "macOS metadata sidecar (._ file), not an image", split))
            elif entry.name.startswith("."):
                continue  # a hidden file
            elif not _is_utf8(relative):
                skipped.append(Skipped(printable(relative), "file name is not valid UTF-8; rename the file", split))
            else:
                status = entry.stat()
                files.append(ImageFile(relative, entry.path, stat=(status.st_size, status.st_mtime_ns)))
    files.sort(key=lambda f: path_order(f.path))
    skipped.sort(key=lambda s: path_order(s.path))
    return files, skipped


def read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # utf-8-sig: spreadsheets save a byte-order mark
    except UnicodeDecodeError as exc:
        raise FmaskError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise FmaskError(f"cannot read {what} {path} ({exc.strerror or exc})") from exc


def read_csv_table(path: Path, *, what: str, required: Sequence[str], optional: Sequence[str] = ()
                   ) -> list[tuple[int, dict[str, str]]]:
    """(row number, {column: stripped text}) for each non-blank row of a CSV whose header names ``required`` (and
    maybe ``optional``) columns, case-insensitively; other columns are ignored (and not kept: the file is read row
    by row). Malformed files are refused."""
    if not path.is_file():
        raise FmaskError(f"{what} {path} does not exist; give a CSV file with a header row "
                         f"'{','.join(required)}'")
    table: list[tuple[int, dict[str, str]]] = []
    header: Optional[list[str]] = None
    try:
        # utf-8-sig: spreadsheets save a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.reader(handle, strict=True), start=1):
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [cell.strip().lower() for cell in row]
                    missing = [name for name in required if name not in header]
                    if missing:
                        raise FmaskError(f"{what} {path} needs a header row naming the column(s) "
                                         f"{', '.join(missing)} (its first row is {','.join(row)[:60]!r})")
                    columns = {name: header.index(name) for name in (*required, *optional) if name in header}
                    continue
                if len(row) != len(header):
                    raise FmaskError(f"{what} {path}: row {number} has {len(row)} fields but the header has "
                                     f"{len(header)}; quote fields that hold commas")
                table.append((number, {name: row[index].strip() for name, index in columns.items()}))
    except UnicodeDecodeError as exc:
        raise FmaskError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from exc
    except csv.Error as exc:
        raise FmaskError(f"{what} {path} is not a well-formed CSV ({exc}); quote fields that hold commas or "
                         "quotes") from exc
    except OSError as exc:
        raise FmaskError(f"cannot read {what} {path} ({exc.strerror or exc})") from exc
    if header is None:
        raise FmaskError(f"{what} {path} is empty; give a header row '{','.join(required)}' and one row per image")
    return table


def _csv_file(csv_path: Path, path: str) -> str:
    """Where a path written in a CSV is on disk: absolute, or relative to the CSV's folder."""
    return str(Path(path) if os.path.isabs(path) else csv_path.parent / path)


def read_images_csv(csv_path: Path, *, split: str = "pool", label_required: bool = False) -> list[ImageFile]:
    """The files a CSV lists (column ``path``; ``label`` optional, or required for a test set), sorted by path;
    a path listed twice is refused."""
    what = "test CSV" if split == "test" else "images CSV"
    required = ("path", "label") if label_required else ("path",)
    table = read_csv_table(csv_path, what=what, required=required, optional=("label",))
    files: list[ImageFile] = []
    seen: dict[str, int] = {}
    for number, row in table:
        path = row["path"]
        if not path:
            raise FmaskError(f"{what} {csv_path}: row {number} has an empty path; give every row a file path")
        if path in seen:
            raise FmaskError(f"{what} {csv_path}: row {number} lists {path!r} again (first on row {seen[path]}); "
                             "list each file once")
        seen[path] = number
        label = row.get("label") or None
        if label_required and label is None:
            raise FmaskError(f"{what} {csv_path}: row {number} has no label; every test image needs one")
        file = _csv_file(csv_path, path)
        try:
            status = os.stat(file)
            stat = (status.st_size, status.st_mtime_ns)
        except OSError:
            stat = (-1, -1)  # missing: skipped when decoded, and listed
        files.append(ImageFile(path, file, label, stat))
    files.sort(key=lambda f: path_order(f.path))
    return files


def read_labels_csv(csv_path: Path) -> dict[str, tuple[str, str]]:
    """``path,label`` rows -> {path: (label text, where)}; blank labels are left out; a path given two different
    labels is refused."""
    labels: dict[str, tuple[str, str]] = {}
    for number, row in read_csv_table(csv_path, what="labels CSV", required=("path", "label")):
        where = f"labels CSV {csv_path}: row {number}"
        if not row["label"]:
            continue
        if row["path"] in labels and labels[row["path"]][0] != row["label"]:
            raise FmaskError(f"{where} labels {row['path']!r} {row['label']!r} but an earlier row says "
                             f"{labels[row['path']][0]!r}; keep one label per path")
        labels[row["path"]] = (row["label"], where)
    return labels


def list_test_set(test: Path, *, exclude: Optional[Path] = None) -> tuple[list[ImageFile], list[Skipped]]:
    """A test set: a folder with one subfolder per class (paths relative to the folder, e.g. ``cat/001.jpg``) or
    a CSV with ``path,label`` columns."""
    if not test.exists():
        raise FmaskError(f"--test {test} does not exist; give a folder with one subfolder per class or a CSV with "
                         "path,label columns")
    if test.is_file():
        return read_images_csv(test, split="test", label_required=True), []
    files, skipped = list_image_folder(test, exclude=exclude, split="test")
    loose = [f.path for f in files if "/" not in f.path]
    if loose:
        raise FmaskError(f"--test {test} holds {loose[0]!r} outside a class folder; put every test image in "
                         "<class>/ below it")
    for image in files:
        image.label = image.path.split("/", 1)[0]
    return files, skipped


def parse_classes(text: str) -> list[str]:
    """``--classes a,b,c``, or the name of a file with one class a line."""
    candidate = Path(text).expanduser()
    if candidate.is_file():
        names = [line.strip() for line in read_text(candidate, "classes file").splitlines()]
        names = [name for name in names if name]
        where = f"classes file {candidate}"
    else:
        names = [part.strip() for part in text.split(",") if part.strip()]
        where = f"--classes {text!r}"
    if not names:
        raise FmaskError(f"{where} names no class; give --classes a,b,c or a file with one class name a line")
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise FmaskError(f"{where} names class {duplicate!r} twice; list each class once")
    return names


def listing_sha256(files: Iterable[ImageFile]) -> str:
    """A fingerprint of a listing: paths, sizes and modification times (a changed file rebuilds the pool)."""
    digest = hashlib.sha256()
    for image in files:
        digest.update(f"{image.path}\0{image.file}\0{image.label}\0{image.stat}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
