"""The report stage: the cross-architecture table, printed, written and logged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moedd._atomic import write_text
from moedd.config import ConfigError

from ._common import ParamsOpt, SetOpt, _params, _user_errors
from .progress import console


@_user_errors
def report(
    metrics_dir: Annotated[Path, typer.Option(help="Directory of evaluate metrics JSON files.")] = Path("metrics/evaluate"),
    out: Annotated[Path | None, typer.Option(help="Write the table as Markdown here too.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write every cell as CSV here too.")] = None,
    latex_out: Annotated[Path | None, typer.Option("--latex", help="Write the tables as LaTeX here too.")] = None,
    figure: Annotated[Path | None, typer.Option(help="Write a PNG here: mixture vs single per network, ours beside the paper's.")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Print the cross-architecture table (ours beside the paper's where the setting matches)."""
    from rich.console import Console

    from moedd.report import collect, protocol_line, render_csv, render_latex, render_markdown, render_tables, run_metrics

    params = _params(params_path, sets)
    rows = collect(sorted(metrics_dir.rglob("*.json")))  # <dataset>/b<budget>/<method>-noe<N>.json in the grid
    if not rows:
        raise ConfigError(f"no evaluation metrics in {metrics_dir}; run `moedd evaluate` (or `dvc repro`) first")
    wide = Console(width=max(console.width, 160))
    for table in render_tables(rows):
        wide.print(table)
    typer.echo(protocol_line(rows))
    md = render_markdown(rows)
    for path, render in ((out, lambda: md), (csv_out, lambda: render_csv(rows)), (latex_out, lambda: render_latex(rows))):
        if path is not None:
            write_text(path, render())
    if figure is not None:
        from moedd.report_figure import render_figure

        render_figure(rows, figure)
    try:
        from moedd.tracking import log_report

        log_report(params, md, run_metrics(rows))
    except Exception as err:  # the table is printed either way; MLflow is a bonus here
        console.log(f"could not log the report to MLflow: {err}")
