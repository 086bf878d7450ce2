from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.options import Force, PoolOfQuery, QueryFile
from fmask.cli.ui import done
from fmask.label.step import run_label


@app.command("label")
def label_command(
    query: QueryFile = ...,
    out: Path = typer.Option(..., help="The next labeled set (JSON) to write."),
    labeled: Optional[Path] = typer.Option(None, help="Labeled set to extend (default: the one the query used)."),
    answers: Optional[Path] = typer.Option(None, help="Human answers: a CSV with sample_id,label or path,label columns "
                                           "(e.g. the filled-in manifest.csv of `fmask export`) or a Label Studio "
                                           "JSON export (default: the pool's ground truth, the simulated oracle; "
                                           "pools from your own images need answers)."),
    pool: PoolOfQuery = None,
    force: Force = False,
    allow_mixed_sources: bool = typer.Option(False, help="Allow oracle labels after human ones (or the reverse) "
                                             "in one run."),
    label_studio: Optional[str] = typer.Option(None, "--label-studio", help="Address of a running Label Studio "
                                               "(default: $LABEL_STUDIO_URL); the token is read from "
                                               "$LABEL_STUDIO_API_KEY only."),
    project: Optional[str] = typer.Option(None, help="Pull the answers from this Label Studio project (exact "
                                          "title): the annotations of the query's tasks, read as --answers is."),
) -> None:
    """Add a query's selection to the labeled set, with oracle or human labels."""
    result = run_label(query=query, out=out, labeled=labeled, answers=answers, pool_dir=pool, force=force,
                       allow_mixed_sources=allow_mixed_sources, label_studio_url=label_studio, project=project)
    if result.skipped:
        done(f"labeled set {result.out} unchanged, skipped")
        return
    origin = ""
    if result.label_studio is not None:
        pulled = result.label_studio
        origin = (f" from Label Studio project {pulled.project!r} (id {pulled.project_id}, {pulled.tasks_found} tasks "
                  "of this query)")
    done(f"labeled set {result.out} written: +{result.added} {result.source} labels{origin}, "
         f"{len(result.data['ids'])} in all")
    if result.unanswered:
        done(f"{len(result.unanswered)} queried ids were not answered and stay unlabeled: {result.unanswered[:10]}")
