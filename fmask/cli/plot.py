from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.ui import done, print_table
from fmask.plot.plot import run_plot, summary_for_display, summary_notes


@app.command("plot")
def plot_command(
    results: Path = typer.Argument(..., help="Directory holding runs (searched recursively for metrics.csv)."),
    out: Optional[Path] = typer.Option(None, help="Where to write the figures and summary (default: RESULTS)."),
    target_accuracy: Optional[float] = typer.Option(None, help="Accuracy for 'labels to reach' (default: random's final)."),
) -> None:
    """Learning curves (mean ± std over seeds) and a summary table for every run below RESULTS."""
    result = run_plot(results_dir=results, out_dir=out, target_accuracy=target_accuracy)
    print_table(summary_for_display(result.summary), "Final accuracy and area under the learning curve (mean over runs)")
    for note in [*summary_notes(result.summary), *result.notes]:
        done(f"note: {note}")
    for figure in result.figures:
        done(f"figure {figure}")
    done(f"summary {result.summary_csv}")
