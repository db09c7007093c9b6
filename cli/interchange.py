"""`moedd export` / `moedd import`: distilled sets to and from other projects' formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moedd.config import ConfigError

from ._common import _user_errors
from .progress import console

FormatOpt = Annotated[str, typer.Option("--format", help="Set format (moedd.formats: folder).")]


@_user_errors
def export(
    synthetic: Annotated[Path, typer.Argument(help="A moedd synthetic set directory.")],
    out: Annotated[Path, typer.Option(help="Where to write the set in the other format (must not exist).")],
    fmt: FormatOpt = "folder",
) -> None:
    """Write a moedd set in another format (decoded, de-normalised images for `folder`, the layout
    DD-Ranking and DC-Bench read), so results can be re-checked with other evaluation code."""
    from moedd.formats import FORMATS
    from moedd.synthetic import load_synthetic

    cls = FORMATS.get(fmt)  # an unknown format is one line, with the choices
    if out.exists():
        raise ConfigError(f"{out} exists; export writes a new directory")
    syn = load_synthetic(synthetic)
    written = cls().export(syn, out)
    console.log(f"exported {syn.noe} expert(s) of {syn.meta.method}: {len(written)} images -> {out} ({fmt})")


@_user_errors
def import_set(
    path: Annotated[Path, typer.Argument(help="The set in the other format.")],
    prepared: Annotated[Path, typer.Option(help="Prepared store of the data the set was distilled from (classes, shape, mean/std).")],
    out: Annotated[Path, typer.Option(help="Where to write the moedd synthetic set.")],
    fmt: FormatOpt = "folder",
    method: Annotated[str | None, typer.Option(help="Method name to record (default: the set's sidecar, else 'imported').")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate the set trains with (MTT/DATM learn one; default: the sidecar's, else the protocol's).")] = None,
) -> None:
    """Read a distilled set in another format into a moedd set, so `moedd evaluate` judges it under
    the one protocol and it can be fused with others."""
    from moedd.data import load_prepared
    from moedd.formats import FORMATS
    from moedd.synthetic import save_synthetic

    cls = FORMATS.get(fmt)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    side = path / "moedd-set.json"
    info = json.loads(side.read_text()) if side.is_file() else {}
    prep = load_prepared(prepared)
    images, labels, metas = cls().read(path, prep, method or info.get("method") or "imported",
                                       lr if lr is not None else info.get("learned_lr"))
    written = save_synthetic(out, images, labels, metas)
    console.log(f"imported {len(written)} expert(s), {written[0].ipc} images/class each -> {out}")
