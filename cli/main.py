"""The ``moedd`` command line: one command per DVC stage, thin over the library.

Every command reads params.yaml (``--params``), applies its own options and any ``-S key=value``
overrides (the same syntax as ``dvc exp run -S``), validates everything, then runs. User errors
print one line and exit with code 1. Each stage's command lives in its own module here (the
modules its result depends on are the stage's DVC deps).
"""

from __future__ import annotations

import typer

from . import data, distill, evaluate, interchange, plan, reference, report, tools, trajectories

app = typer.Typer(
    name="moedd",
    help="Dataset distillation with a mixture of experts (DVC stages, MLflow lineage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _command in (tools.init, tools.ui, data.prepare, data.partition, trajectories.trajectories, distill.distill,
                 evaluate.evaluate, reference.full_data, report.report, plan.plan, tools.show):
    app.command()(_command)
app.command(name="list")(tools.list_components)
app.command()(interchange.export)
app.command(name="import")(interchange.import_set)
app.command()(interchange.combine)


def run() -> None:
    """Console-script entry point: set up the process, then run the Typer app."""
    from moedd.device import tune_process

    tune_process()
    app()
