"""`moedd export` / `moedd import`: distilled sets to and from other projects' formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moedd.config import ConfigError

from ._common import _user_errors
from .progress import console

FormatOpt = Annotated[str, typer.Option("--format", help="Set format (moedd.formats): folder | dc | mtt | datm | idc.")]


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
    if not cls.writes:
        raise ConfigError(f"--format {fmt}: moedd reads this format but does not write it (write: "
                          f"{', '.join(n for n in FORMATS.names() if FORMATS.get(n).writes)})")
    if out.exists():
        raise ConfigError(f"{out} exists; export writes a new directory")
    syn = load_synthetic(synthetic)
    written = cls().export(syn, out)
    console.log(f"exported {syn.noe} expert(s) of {syn.method}: {len(written)} files -> {out} ({fmt})")


@_user_errors
def import_set(
    path: Annotated[Path, typer.Argument(help="The set in the other format (its directory or file).")],
    prepared: Annotated[Path, typer.Option(help="Prepared store of the data the set was distilled from (classes, shape; ZCA refit).")],
    out: Annotated[Path, typer.Option(help="Where to write the moedd synthetic set.")],
    fmt: FormatOpt = "folder",
    method: Annotated[str | None, typer.Option(help="Method name to record (default: the format's, or the sidecar's).")] = None,
    lr: Annotated[float | None, typer.Option(help="The learned learning rate (MTT logs it only to its tracker; DATM saves it).")] = None,
    zca: Annotated[bool | None, typer.Option("--zca/--no-zca", help="mtt/datm: images in ZCA space (default: yes, their CIFAR setting).")] = None,
    factor: Annotated[int | None, typer.Option(help="idc: multi-formation factor (default 2).")] = None,
    experiment: Annotated[int, typer.Option(help="dc: which experiment of the file (default the last).")] = -1,
    dataset: Annotated[str | None, typer.Option(help="cifar10 | cifar100: the set's label order and constants (default: the prepared data's).")] = None,
) -> None:
    """Read a distilled set in another format into a moedd set with full metadata (method, space,
    decoding, learned lr, labels, soft labels), so `moedd evaluate` judges it under the one protocol
    and it can be fused with others (`moedd combine`)."""
    from moedd.data import load_prepared
    from moedd.formats import FORMATS, ImportOptions
    from moedd.synthetic import save_synthetic

    cls = FORMATS.get(fmt)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    if dataset is not None and dataset not in ("cifar10", "cifar100"):
        raise ConfigError(f"--dataset {dataset}: cifar10 or cifar100")
    prep = load_prepared(prepared)
    got = cls().read(path, prep, ImportOptions(method, lr, zca, factor, experiment, dataset))
    written = save_synthetic(out, got.images, got.labels, got.metas, got.zca, got.soft)
    soft = ", soft labels" if got.soft is not None else ""
    console.log(f"imported {len(written)} expert(s) of {written[0].method}, {written[0].ipc} images/class each "
                f"({written[0].space} space, decoding {written[0].decoding}{soft}) -> {out}")


@_user_errors
def combine(
    synthetic: Annotated[list[Path], typer.Argument(help="Two or more moedd synthetic set directories.")],
    out: Annotated[Path, typer.Option(help="Where to write the combined set.")],
) -> None:
    """Make one mixture of the experts of several sets (say an imported set and a distilled one):
    each expert keeps its own method, space and decoding; `moedd evaluate` fuses them with mixup."""
    from moedd.synthetic import combine as combine_sets, load_synthetic, save_synthetic

    syn = combine_sets([load_synthetic(p) for p in synthetic])
    written = save_synthetic(out, syn.images, syn.labels, syn.metas, syn.zca, syn.soft)
    console.log(f"combined {len(written)} experts as {syn.method} -> {out}")
