from pathlib import Path
from typing import Optional

import typer

from fmask.cli import app
from fmask.cli.ui import done, print_table, progress_callback
from fmask.plot.plot import summary_for_display
from fmask.run.demo import demo_config, run_demo


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("results/demo"), help="Results directory."),
    seeds: int = typer.Option(3, help="Number of seeds (0..N-1)."),
    rounds: int = typer.Option(5, help="Query rounds per run."),
    batch: int = typer.Option(20, help="Samples per query."),
    strategies: Optional[str] = typer.Option(None, help="Comma-separated strategies (default: all registered)."),
    device: str = typer.Option("cpu", help="auto | cpu | cuda"),
) -> None:
    """Imbalanced AL comparison of the strategies on the bundled digits, ending with plot and table."""
    config = demo_config(seeds=seeds, rounds=rounds, batch=batch, device=device,
                         strategies=[s.strip() for s in strategies.split(",")] if strategies else None)
    with progress_callback() as progress:
        result = run_demo(out=out, config=config, progress=progress,
                          on_step=lambda what, done_, total: progress(f"demo: {what}", done_, total))
    print_table(summary_for_display(result.summary), "Demo: digits, 9 small classes + 1 large (mean ± std over seeds)")
    for figure in result.figures:
        done(f"figure {figure}")
    done(f"summary {result.summary_csv}")
