from pathlib import Path
from typing import Optional

import typer

from fmask.core import paths
from fmask.cli import app
from fmask.cli.options import PoolOfQuery, QueryFile
from fmask.cli.ui import done, progress_callback
from fmask.label.export import run_export


@app.command("export")
def export_command(
    query: QueryFile = ...,
    out: Optional[Path] = typer.Option(None, help="Directory to write the batch into (must not exist, or be empty); "
                                       "optional with --project."),
    ckpt: Optional[Path] = typer.Option(None, help="Checkpoint for the model's guesses (default: the one the query "
                                        "records; its hash must match)."),
    pool: PoolOfQuery = None,
    image_root: Optional[str] = typer.Option(None, help="Label Studio local files: the export directory's path "
                                             "relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: the "
                                             "--out directory's name)."),
    url_prefix: Optional[str] = typer.Option(None, help="Serve the files yourself: the URL of the export directory "
                                             "(e.g. http://host:8000/batch1); replaces --image-root."),
    columns: Optional[int] = typer.Option(None, help="Tiles per row of the contact sheet (default: about square)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (for the model's guesses)."),
    force: bool = typer.Option(False, help="Replace an earlier export in --out."),
    label_studio: Optional[str] = typer.Option(None, "--label-studio", help="Address of a running Label Studio "
                                               "(default: $LABEL_STUDIO_URL); the token is read from "
                                               "$LABEL_STUDIO_API_KEY only."),
    project: Optional[str] = typer.Option(None, help="Push the batch into this Label Studio project (exact title; "
                                          "made if missing): images uploaded, one task per sample, the model's "
                                          "guess as a prediction. Pushing a query again adds nothing."),
) -> None:
    """Write a query's batch for annotators (PNGs, a CSV manifest, a contact sheet, Label Studio files) and/or push
    it to a running Label Studio."""
    with progress_callback() as progress:
        result = run_export(query=query, out=out, ckpt=ckpt, pool_dir=pool, image_root=image_root,
                            url_prefix=url_prefix, columns=columns, device=device, force=force,
                            label_studio_url=label_studio, project=project, progress=progress)
    if result.out is not None and result.contact_sheet_size is not None:
        width, height = result.contact_sheet_size
        done(f"exported {len(result.ids)} images to {result.out}: {paths.EXPORT_MANIFEST_CSV} (fill in its label "
             f"column), {paths.CONTACT_SHEET_PNG} ({width}x{height}), {paths.LABEL_STUDIO_TASKS}, "
             f"{paths.LABEL_STUDIO_CONFIG}")
    pushed = result.label_studio
    if pushed is not None:
        made = "made project" if pushed.created else "project"
        done(f"Label Studio {made} {pushed.project!r} (id {pushed.project_id}) at {pushed.url}: {pushed.added} new "
             f"tasks, {len(pushed.task_ids) - pushed.added} already there; label them, then run `fmask label "
             f"--query {query} --project {pushed.project!r} --out NEXT.json`")
