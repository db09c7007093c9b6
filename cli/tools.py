"""Commands around the pipeline: the MLflow store and UI, image grids, the registries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import ParamsOpt, SetOpt, _params, _user_errors
from .progress import console


@_user_errors
def init(params_path: ParamsOpt = None, sets: SetOpt = None) -> None:
    """Create the MLflow store and experiment once (before parallel queued runs)."""
    from moedd.tracking import init_tracking, tracking_uri

    params = _params(params_path, sets)
    exp_id = init_tracking(params.mlflow)
    console.print(f"MLflow store {tracking_uri(params.mlflow)}, experiment '{params.mlflow.experiment}' (id {exp_id})")


@_user_errors
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; the UI has no login).")] = "127.0.0.1",
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Serve the MLflow UI on the project's store (the one every stage logs to) and print its URL."""
    import os
    import sys

    from moedd.tracking import init_tracking, tracking_uri, ui_url

    params = _params(params_path, sets)
    exp_id = init_tracking(params.mlflow)  # the store and its experiment exist, marked as model training
    uri = tracking_uri(params.mlflow)
    console.print(f"MLflow UI on {uri}, experiment '{params.mlflow.experiment}': the pipeline runs with "
                  f"every cell's accuracy (Ctrl-C stops it):\n{ui_url(host, port, exp_id)}", soft_wrap=True)
    sys.stdout.flush()
    # the server replaces this process, so Ctrl-C and kill reach it directly
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", host, "--port", str(port), "--workers", "1"])



@_user_errors
def show(
    synthetic: Annotated[Path, typer.Argument(help="Synthetic set directory.")],
    out: Annotated[Path | None, typer.Option(help="Directory for the PNG grids (default: <synthetic>-grids).")] = None,
) -> None:
    """Write one PNG grid per expert (rows = classes, columns = images)."""
    from PIL import Image

    from moedd.synthetic import load_synthetic
    from moedd.visualize import expert_grid

    syn = load_synthetic(synthetic)
    target = out or synthetic.with_name(synthetic.name + "-grids")
    target.mkdir(parents=True, exist_ok=True)
    for k, (x, meta) in enumerate(zip(syn.images, syn.metas, strict=True)):
        path = target / f"expert-{k}.png"
        Image.fromarray(expert_grid(x, meta, zca=syn.zca)).save(path)
        typer.echo(str(path))


def list_components() -> None:
    """List the registered experts, networks and dataset sources."""
    from moedd.data import SOURCES
    from moedd.experts import EXPERTS
    from moedd.nets import list_nets

    typer.echo(f"experts:  {', '.join(EXPERTS.names())}")
    typer.echo(f"networks: {', '.join(list_nets())}")
    typer.echo(f"sources:  {', '.join(SOURCES.names())}")

