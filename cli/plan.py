"""`moedd plan`: the estimated time of the grid on this device, before anything long starts."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import ParamsOpt, SetOpt, _params, _user_errors
from .progress import console


@_user_errors
def plan(
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] (default: distill.device).")] = None,
    recalibrate: Annotated[bool, typer.Option(help="Measure the unit costs again instead of reading the cache.")] = False,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Estimate every stage of the grid (trajectories, distill, evaluate, full_data) on this device:
    counts from the params times unit costs measured by a short calibration (cached in
    .moedd/calibration.json per device). `dvc repro --dry` lists the stages that would run."""
    from rich.table import Table

    from moedd.device import resolve_device
    from moedd.plan import Calibration, UnitCosts, dataset_shape, human, plan as make_plan, total
    from moedd.tracking import project_root

    params = _params(params_path, sets, **{"distill.device": device})
    dev = resolve_device(params.distill.device)
    shapes = {name: dataset_shape(params, name) for name in params.grid.datasets}
    cal = Calibration(project_root() / ".moedd" / "calibration.json", dev, fresh=recalibrate)
    console.log(f"unit costs on {cal.key} ({'measuring what the cache lacks' if not recalibrate else 'measuring'})")
    lines = make_plan(params, UnitCosts(cal, params), shapes)
    cal.save()
    if cal.measured:
        console.log(f"measured {len(cal.measured)} unit cost(s); cached in {cal.path}")
    everything = total(lines)
    table = Table(title=f"plan: scale {params.scale}, datasets {', '.join(shapes)}, budgets "
                        f"{', '.join(map(str, params.grid.budgets))}, device {dev}")
    for col in ("stage", "cells", "estimate", "share", "what"):
        table.add_column(col, justify="right" if col in ("cells", "estimate", "share") else "left")
    for line in sorted(lines, key=lambda x: -x.seconds):
        share = 100 * line.seconds / everything if everything else 0.0
        table.add_row(line.stage, str(line.cells), human(line.seconds), f"{share:.0f} %", line.detail)
    console.print(table)
    top = max(lines, key=lambda x: x.seconds) if lines else None
    dominant = f"; {top.stage} dominates ({100 * top.seconds / everything:.0f} %)" if top and everything else ""
    typer.echo(f"total: {human(everything)} ({everything:.0f} s){dominant}; not counted: prepare, partition, "
               "process start-up, MLflow bookkeeping")
