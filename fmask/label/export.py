"""``fmask export``: a query's batch as files a person can label.

The export directory holds ``images/<sample id>_<original stem>.png`` (the pool's pixels, unnormalised; pools
without source files: ``<sample id>.png``), ``manifest.csv`` (one row per image in selection order: sample id, the
original path, file, the query checkpoint's top-3 guesses with probabilities (blank for a query made without a
model), and a blank ``label`` column an annotator can fill in and hand straight to ``fmask label --answers``),
``contact_sheet.png``
(the batch in selection order, small images upscaled by nearest neighbour, sample id under each tile), a Label
Studio import file (tasks with the model's top guess as a prediction) with its labeling config, and
``export.json`` (provenance). It is built in a fresh temporary directory beside ``--out`` and renamed into place.

With ``project`` the batch goes to a running Label Studio instead of (or as well as) ``--out``: see
:mod:`fmask.label.label_studio`. The server is checked (reachable, token accepted, the project's classes) before
anything is written, here or there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import torch
from PIL import Image, ImageDraw, ImageFont

from fmask import __version__
from fmask.core import paths
from fmask.core.device import resolve_device
from fmask.core.errors import FmaskError
from fmask.core.hashing import FORMAT_VERSION, sha256_file
from fmask.core.steps import step_output
from fmask.label import label_studio
from fmask.label.label_studio import LS_CONTROL, LS_OBJECT, PushResult
from fmask.pool.pool import Pool, load_pool
from fmask.predict.predict import predict_probabilities
from fmask.core.progress import ProgressFn
from fmask.query.step import load_query
from fmask.train.checkpoint import Checkpoint, load_checkpoint

EXPORT = "fmask export"
TOP_K = 3  # guesses per image in the manifest
TILE_TARGET = 64  # px: small images are upscaled by a whole factor until their longer side reaches this
PAD = 4  # px around and between tiles of the contact sheet
CAPTION_HEIGHT = 14  # px under each tile for its sample id (PIL's default font is 10 px tall)
LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's endpoint for files under LOCAL_FILES_DOCUMENT_ROOT


@dataclass(frozen=True)
class SheetLayout:
    """Where each tile of a contact sheet goes: a grid of ``columns`` x ``rows`` cells in selection order."""

    columns: int
    rows: int
    scale: int  # whole-number nearest-neighbour upscale factor
    tile_width: int
    tile_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in pixels."""
        return (PAD + self.columns * (self.tile_width + PAD),
                PAD + self.rows * (self.tile_height + CAPTION_HEIGHT + PAD))

    def origin(self, position: int) -> tuple[int, int]:
        """Top-left pixel of the tile at ``position`` (0-based, row-major)."""
        row, column = divmod(position, self.columns)
        return PAD + column * (self.tile_width + PAD), PAD + row * (self.tile_height + CAPTION_HEIGHT + PAD)


def sheet_layout(count: int, height: int, width: int, columns: Optional[int] = None) -> SheetLayout:
    """The grid for ``count`` images of ``height`` x ``width``: ``columns`` wide (default: about square)."""
    if count <= 0:
        raise ValueError("a contact sheet needs at least one image")
    columns = min(count, columns if columns else math.ceil(math.sqrt(count)))
    scale = max(1, math.ceil(TILE_TARGET / max(height, width)))
    return SheetLayout(columns, math.ceil(count / columns), scale, width * scale, height * scale)


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as PNG file bytes."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) image -> PIL (grayscale for C=1, RGB for C=3, RGBA for C=4)."""
    channels = image.shape[0]
    if image.dtype != torch.uint8 or channels not in (1, 3, 4):
        raise FmaskError(f"cannot write a {channels}-channel {image.dtype} image as PNG; fmask exports uint8 "
                         "grayscale, RGB or RGBA pools")
    array = image.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array[:, :, 0] if channels == 1 else array)


def contact_sheet(images: torch.Tensor, ids: Sequence[int], columns: Optional[int] = None) -> Image.Image:
    """The batch as one RGB image: tiles in order, upscaled by nearest neighbour, sample id centred under each."""
    count, _, height, width = images.shape
    layout = sheet_layout(count, height, width, columns)
    sheet = Image.new("RGB", layout.size, "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for position, (image, sample_id) in enumerate(zip(images, ids)):
        tile = to_pil(image).convert("RGB").resize((layout.tile_width, layout.tile_height), Image.Resampling.NEAREST)
        x, y = layout.origin(position)
        sheet.paste(tile, (x, y))
        left, top, right, bottom = draw.textbbox((0, 0), str(sample_id), font=font)
        draw.text((x + (layout.tile_width - (right - left)) // 2 - left,
                   y + layout.tile_height + (CAPTION_HEIGHT - (bottom - top)) // 2 - top),
                  str(sample_id), fill="black", font=font)
    return sheet


def image_url(file: str, *, image_root: str, url_prefix: Optional[str] = None) -> str:
    """Where Label Studio finds ``file`` (a path relative to the export directory).

    With ``url_prefix``: that URL joined with ``file``. Otherwise Label Studio's local-files URL
    ``/data/local-files/?d=<image_root>/<file>``, ``image_root`` being the export directory's path relative to
    Label Studio's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.
    """
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + quote(file)
    relative = "/".join(part for part in (image_root.strip("/"), file) if part)
    return LOCAL_FILES_URL + quote(relative, safe="/")


def label_studio_config(classes: Sequence[str]) -> str:
    """A labeling config: the image (pixelated when zoomed, so small images stay sharp) and one class choice."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (f"<View>\n  <Header value=\"$caption\"/>\n"
            f"  <Image name=\"{LS_OBJECT}\" value=\"$image\" smoothing=\"false\" zoom=\"true\" zoomControl=\"true\"/>\n"
            f"  <Choices name=\"{LS_CONTROL}\" toName=\"{LS_OBJECT}\" choice=\"single-radio\" showInline=\"true\" "
            f"required=\"true\">\n{choices}\n  </Choices>\n</View>\n")


def label_studio_tasks(ids: Sequence[int], urls: Sequence[Optional[str]], classes: Sequence[str],
                       top_probs: Optional[torch.Tensor], top_classes: Optional[torch.Tensor],
                       model_version: Optional[str], query_sha256: str,
                       sample_paths: Optional[Sequence[Optional[str]]] = None) -> list[dict]:
    """One Label Studio task per image; the model's top guess rides along as a prediction (pre-annotation) when
    the query had a model.

    ``data`` holds the image URL (left out where ``urls`` has None: the live push fills it in after uploading),
    the sample id, the query's hash (tasks of one query are found by it) and, when the pool knows it, the sample's
    source file ``path``.
    """
    tasks = []
    for position, (sample_id, url) in enumerate(zip(ids, urls)):
        path = sample_paths[position] if sample_paths is not None else None
        data = {"image": url, "sample_id": int(sample_id), "caption": f"sample {sample_id}" + (f": {path}" if path
                                                                                              else ""),
                "query_sha256": query_sha256}
        if url is None:
            del data["image"]
        if path is not None:
            data["path"] = str(path)
        predictions = []
        if top_probs is not None and top_classes is not None:
            predictions.append({"model_version": model_version, "score": round(float(top_probs[position, 0]), 6),
                                "result": [{"from_name": LS_CONTROL, "to_name": LS_OBJECT, "type": "choices",
                                            "value": {"choices": [classes[int(top_classes[position, 0])]]}}]})
        tasks.append({"data": data, "predictions": predictions})
    return tasks


def manifest_csv(ids: Sequence[int], files: Sequence[str], classes: Sequence[str], top_probs: Optional[torch.Tensor],
                 top_classes: Optional[torch.Tensor], sample_paths: Optional[Sequence[Optional[str]]] = None) -> str:
    """``sample_id,path,file,guess_1,prob_1,...,label`` in selection order; ``path`` is the original file (blank for
    pools without source files), the guesses are blank without a model, ``label`` is left for the annotator."""
    k = top_probs.shape[1] if top_probs is not None else min(TOP_K, len(classes))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sample_id", "path", "file"] + [f"{kind}_{rank}" for rank in range(1, k + 1)
                                                     for kind in ("guess", "prob")] + ["label"])
    sample_paths = sample_paths or [None] * len(ids)
    for position, (sample_id, path, file) in enumerate(zip(ids, sample_paths, files)):
        if top_probs is not None and top_classes is not None:
            pairs = [cell for guess, prob in zip(top_classes[position].tolist(), top_probs[position].tolist())
                     for cell in (classes[guess], f"{prob:.4f}")]
        else:
            pairs = [""] * (2 * k)
        writer.writerow([sample_id, path or "", file] + pairs + [""])
    return buffer.getvalue()


@dataclass
class ExportResult:
    out: Optional[Path]  # None when the batch only went to Label Studio
    ids: list[int]  # in selection order
    contact_sheet_size: Optional[tuple[int, int]]
    image_urls: list[str]
    label_studio: Optional[PushResult] = None


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory (with --force: one that is not an export)."""
    if out.exists() and not out.is_dir():
        raise FmaskError(f"--out {out} is a file; give a directory for the export")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FmaskError(f"--out {out} exists and is not empty; choose a new directory or pass --force to "
                             "replace an earlier export")
        if not (out / paths.EXPORT_INFO).is_file():
            raise FmaskError(f"--out {out} is not an fmask export directory (no {paths.EXPORT_INFO}); --force only "
                             "replaces an earlier export, so choose a new directory")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise FmaskError(f"cannot write {out}: {probe} is not a writable directory; choose another --out")


def _move_into_place(built: Path, out: Path) -> None:
    """Rename the finished export onto ``out``; an earlier export there is swapped out first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(built, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _selected_paths(query_data: dict, query, ids: list[int]) -> Optional[list[str]]:
    """The source file of each selected sample, when the query records them (pools built from image folders)."""
    selected_paths = query_data.get("selected_paths")
    if selected_paths is None:
        return None
    if not isinstance(selected_paths, list) or len(selected_paths) != len(ids):
        raise FmaskError(f"query {query}: selected_paths does not list one path per selected sample; rerun the query")
    return selected_paths


def run_export(*, query: str | os.PathLike, out: Optional[str | os.PathLike] = None,
               ckpt: Optional[str | os.PathLike] = None, pool_dir: Optional[str | os.PathLike] = None,
               image_root: Optional[str] = None, url_prefix: Optional[str] = None, columns: Optional[int] = None,
               device: str = "auto", batch_size: int = 256, force: bool = False,
               label_studio_url: Optional[str] = None, project: Optional[str] = None,
               progress: Optional[ProgressFn] = None) -> ExportResult:
    """Write the export directory ``out`` for the batch ``query`` selected (see the module docstring), and/or push
    it to the Label Studio project titled ``project`` (at ``label_studio_url``, else ``LABEL_STUDIO_URL``)."""
    out = Path(out) if out is not None else None
    if project is None and label_studio_url is not None:
        raise FmaskError("--label-studio needs --project NAME, the Label Studio project to push the batch into")
    if project is None and out is None:
        raise FmaskError("give --out DIR to write the batch as files, or --project NAME (with --label-studio URL) to "
                         "push it to Label Studio")
    if out is None and (image_root is not None or url_prefix is not None or columns is not None):
        raise FmaskError("--image-root, --url-prefix and --columns shape the files of --out; pass --out DIR too, or "
                         "drop them")
    url = label_studio.resolve_url(label_studio_url) if project is not None else None
    if image_root is not None and url_prefix is not None:
        raise FmaskError("give either --image-root (Label Studio local files) or --url-prefix (served files), not both")
    if image_root is not None and Path(image_root).is_absolute():
        raise FmaskError(f"--image-root {image_root} must be relative to Label Studio's "
                         "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (e.g. exp/batch1), not absolute")
    if columns is not None and columns <= 0:
        raise FmaskError(f"--columns {columns} must be positive; omit it for an about square contact sheet")
    query_data = load_query(query)
    pool = load_pool(pool_dir if pool_dir is not None else query_data["pool_dir"])
    if query_data["inputs"].get("pool") != pool.hash:
        raise FmaskError(f"query {query} was made on another pool; pass the --pool it was made on")
    made_with_model = query_data["inputs"].get("checkpoint") is not None
    if ckpt is not None and not made_with_model:
        raise FmaskError(f"query {query} was made without a checkpoint, so it has no model guesses to attach; drop "
                         "--ckpt")
    ckpt = ckpt if ckpt is not None else query_data.get("checkpoint_path")
    checkpoint = None
    if made_with_model:
        if ckpt is None:
            raise FmaskError(f"query {query} records no checkpoint_path; pass --ckpt with the checkpoint it was made "
                             "with")
        checkpoint = load_checkpoint(ckpt)
        if checkpoint.hash != query_data["inputs"].get("checkpoint"):
            raise FmaskError(f"checkpoint {ckpt} is not the one query {query} was made with (its hash differs); pass "
                             "--ckpt with that checkpoint, or rerun the query")
    ids = [int(i) for i in query_data["selected"]]
    if not ids:
        raise FmaskError(f"query {query} selects no samples; rerun `fmask query` with --batch of at least 1")
    images = pool.images(ids)  # refuses ids outside the pool
    sample_paths = _selected_paths(query_data, query, ids)
    if sample_paths is None and pool.has_paths:  # a query written before queries listed the paths
        sample_paths = pool.paths(ids)
    batch = _Batch(query=query, query_sha256=sha256_file(query), query_data=query_data, pool=pool, ckpt=ckpt,
                   checkpoint=checkpoint, ids=ids, images=images, sample_paths=sample_paths)
    live = _Live(url, project) if project is not None and url is not None else None
    if out is None and live is not None:
        connection, found = label_studio.open_project(live.url, live.project, pool.classes)
        guesses = _guesses(batch, device=device, batch_size=batch_size, progress=progress)
        pushed = _push(batch, guesses, connection, found, live.project, progress)
        return ExportResult(None, ids, None, [], pushed)
    target = out.resolve()  # absolute, so that `--out .` and relative paths rename cleanly
    # No step record: an existing export is refused unless --force (_check_out, run under the lock).
    with step_output(target, command="export", step=None, writable=()):
        return _export_locked(batch, out=out, target=target, image_root=image_root, url_prefix=url_prefix,
                              columns=columns, device=device, batch_size=batch_size, force=force, live=live,
                              progress=progress)


@dataclass
class _Batch:
    """What an export reads: the query, its pool and checkpoint, and the selected images in selection order."""

    query: str | os.PathLike
    query_sha256: str
    query_data: dict
    pool: Pool
    ckpt: Optional[str | os.PathLike]
    checkpoint: Optional[Checkpoint]  # None: a query made without a model (no guesses)
    ids: list[int]
    images: torch.Tensor
    sample_paths: Optional[list[str]]


@dataclass
class _Live:
    url: str
    project: str


@dataclass
class _Guesses:
    top_probs: Optional[torch.Tensor]  # None for a query made without a model
    top_classes: Optional[torch.Tensor]
    model_version: Optional[str]


def _guesses(batch: _Batch, *, device: str, batch_size: int, progress: Optional[ProgressFn]) -> _Guesses:
    """The query checkpoint's top-k guesses with probabilities for the batch (none without a checkpoint)."""
    if batch.checkpoint is None:
        return _Guesses(None, None, None)
    probs = predict_probabilities(batch.checkpoint.model, batch.pool, batch.ids, device=resolve_device(device),
                                  batch_size=batch_size, progress=progress, task="model guesses")
    top_probs, top_classes = torch.topk(probs, k=min(TOP_K, probs.shape[1]), dim=1)
    return _Guesses(top_probs, top_classes, f"{Path(batch.ckpt).name}:{batch.checkpoint.hash[:12]}")


def _push(batch: _Batch, guesses: _Guesses, connection: label_studio.LabelStudioConnection,
          found: Optional[label_studio.ProjectRef], project: str, progress: Optional[ProgressFn]) -> PushResult:
    """Push the batch's tasks (and their images) that the project lacks."""
    classes = batch.pool.classes
    tasks = label_studio_tasks(batch.ids, [None] * len(batch.ids), classes, guesses.top_probs, guesses.top_classes,
                               guesses.model_version, batch.query_sha256, batch.sample_paths)
    names = [paths.export_image(sample_id, path).rsplit("/", 1)[1]
             for sample_id, path in zip(batch.ids, batch.sample_paths or [None] * len(batch.ids))]
    images = [(name, png_bytes(image)) for name, image in zip(names, batch.images)]
    return label_studio.push_batch(connection=connection, project=found, title=project,
                                   label_config=label_studio_config(classes), tasks=tasks, images=images,
                                   progress=progress)


def _export_locked(batch: _Batch, *, out: Path, target: Path, image_root: Optional[str], url_prefix: Optional[str],
                   columns: Optional[int], device: str, batch_size: int, force: bool, live: Optional[_Live],
                   progress: Optional[ProgressFn]) -> ExportResult:
    """run_export's work, done while holding the lock of the directory the export is renamed into."""
    _check_out(out, force)
    connection, found = (label_studio.open_project(live.url, live.project, batch.pool.classes) if live is not None
                         else (None, None))
    guesses = _guesses(batch, device=device, batch_size=batch_size, progress=progress)
    ids, classes = batch.ids, batch.pool.classes
    files = [paths.export_image(sample_id, path)
             for sample_id, path in zip(ids, batch.sample_paths or [None] * len(ids))]
    root = target.name if image_root is None else image_root
    urls = [image_url(file, image_root=root, url_prefix=url_prefix) for file in files]

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        built = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise FmaskError(f"could not create the export {out}: {exc.strerror or exc}; choose another --out") from exc
    try:
        os.chmod(built, 0o755)  # mkdtemp makes it private; Label Studio or a web server may run as another user
        (built / paths.EXPORT_IMAGES_DIR).mkdir()
        for done, (image, file) in enumerate(zip(batch.images, files), start=1):
            to_pil(image).save(built / file, format="PNG")
            if progress is not None:
                progress("writing images", done, len(ids))
        sheet = contact_sheet(batch.images, ids, columns)
        sheet.save(built / paths.CONTACT_SHEET_PNG, format="PNG")
        (built / paths.EXPORT_MANIFEST_CSV).write_text(
            manifest_csv(ids, files, classes, guesses.top_probs, guesses.top_classes, batch.sample_paths),
            encoding="utf-8")
        tasks = label_studio_tasks(ids, urls, classes, guesses.top_probs, guesses.top_classes, guesses.model_version,
                                   batch.query_sha256, batch.sample_paths)
        (built / paths.LABEL_STUDIO_TASKS).write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
        (built / paths.LABEL_STUDIO_CONFIG).write_text(label_studio_config(classes), encoding="utf-8")
        pushed = (_push(batch, guesses, connection, found, live.project, progress)
                  if live is not None and connection is not None else None)
        info = {"format": FORMAT_VERSION, "kind": "export", "fmask_version": __version__,
                "query": str(Path(batch.query).resolve()), "query_sha256": batch.query_sha256,
                "checkpoint": str(Path(batch.ckpt).resolve()) if batch.checkpoint is not None else None,
                "checkpoint_sha256": batch.checkpoint.hash if batch.checkpoint is not None else None,
                "pool": batch.pool.hash, "round": batch.query_data["round"], "strategy": batch.query_data["strategy"],
                "selected": ids, "url_prefix": url_prefix, "image_root": None if url_prefix else root,
                "contact_sheet_size": list(sheet.size),
                "label_studio": None if pushed is None else {"url": pushed.url, "project": pushed.project,
                                                             "project_id": pushed.project_id,
                                                             "task_ids": pushed.task_ids}}
        (built / paths.EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        _move_into_place(built, target)
    except OSError as exc:
        shutil.rmtree(built, ignore_errors=True)
        raise FmaskError(f"could not write the export {out}: {exc.strerror or exc}; free space or choose another "
                         "--out") from exc
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return ExportResult(out, ids, sheet.size, urls, pushed)
