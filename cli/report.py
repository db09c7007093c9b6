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
    reference_dir: Annotated[Path, typer.Option(help="Directory of `moedd full-data` metrics (the full-data reference).")] = Path("metrics/full"),
    experiments: Annotated[bool, typer.Option(help="Also read the metrics of every DVC experiment of this repository "
                                                   "(`dvc exp run --queue` results), the workspace's winning ties.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the table as Markdown here too.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write every cell as CSV here too.")] = None,
    latex_out: Annotated[Path | None, typer.Option("--latex", help="Write the tables as LaTeX here too.")] = None,
    figure: Annotated[Path | None, typer.Option(help="Write a PNG here: mixture vs single per network, ours beside the paper's.")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Print the cross-architecture table (ours beside the paper's where the setting matches)."""
    from rich.console import Console

    from moedd.report import protocol_line, render_csv, render_latex, render_markdown, render_tables, run_metrics

    params = _params(params_path, sets)
    rows = _cells(metrics_dir, reference_dir, experiments)
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

        log_report(params, md, run_metrics(rows), over_experiments=experiments)
    except Exception as err:  # the table is printed either way; MLflow is a bonus here
        console.log(f"could not log the report to MLflow: {err}")


def _cells(metrics_dir: Path, reference_dir: Path, experiments: bool) -> list:  # type: ignore[type-arg]
    """The workspace's cells (and every experiment's, when asked) with their reference points."""
    from moedd.report import collect, collect_references, merge_cells, with_references

    def read(root: Path) -> tuple[list, list]:  # type: ignore[type-arg]
        cells = collect(sorted((root / metrics_dir).rglob("*.json")))  # <dataset>/b<budget>/<method>-noe<N>.json
        ref_dir = root / reference_dir
        return cells, collect_references(sorted(ref_dir.rglob("*.json"))) if ref_dir.is_dir() else []

    cells, refs = read(Path("."))
    if experiments:
        from moedd.experiments import experiment_trees

        with experiment_trees(Path.cwd(), [metrics_dir, reference_dir]) as trees:
            for name, tree in trees:
                more, more_refs = read(tree)
                console.log(f"experiment {name}: {len(more)} cell(s), {len(more_refs)} full-data reference(s)")
                cells = merge_cells(cells, more)
                refs += [r for r in more_refs if (r.label, r.net) not in {(x.label, x.net) for x in refs}]
    if not cells:
        raise ConfigError(f"no evaluation metrics in {metrics_dir}; run `moedd evaluate` (or `dvc repro`) first")
    return with_references(cells, refs)
