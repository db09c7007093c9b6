"""The data stages: prepare (read a source into the prepared store) and partition (the shards)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated

import typer

from moedd.config import check_budget
from moedd.data import SOURCES

from ._common import ParamsOpt, SetOpt, _params, _user_errors
from .progress import console


@_user_errors
def prepare(
    out: Annotated[Path, typer.Option(help="Directory of the prepared store.")] = Path("data/prepared"),
    source: Annotated[str | None, typer.Option(help=f"{' | '.join(SOURCES.names())} (default: data.source).")] = None,
    root: Annotated[str | None, typer.Option(help="Download dir or image folder (default: data.root).")] = None,
    dataset: Annotated[str | None, typer.Option(help="An entry of `datasets` (its keys over `data`; the grid's stages name one).")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Read the dataset from its source and store it as uint8 tensors with a digest."""
    from moedd.data import load_source, save_prepared
    from moedd.data.transform import reshape_dataset
    from moedd.params import dataset_data

    params = _params(params_path, sets, **{"data.source": source, "data.root": root})
    data = dataset_data(params, dataset) if dataset is not None else params.data
    t0 = time.perf_counter()
    # no "reading ..." line first: a source that is not there fails with its one-line error alone
    raw = load_source(data.source, data.root, data.download)
    if dataset is not None:  # the grid's name for it: run names, tags and metric keys use it (not in the digest)
        raw = dataclasses.replace(raw, name=dataset)
    prep = save_prepared(reshape_dataset(raw, data.image_size, data.channels), out,
                         {"image_size": data.image_size, "channels": data.channels})
    console.log(
        f"prepared {prep.name} from {data.source} {data.root}: "
        f"{len(prep.train_labels)} train / {len(prep.test_labels)} test images, "
        f"{prep.num_classes} classes, shape {prep.image_shape}, {prep.paper or 'not a paper dataset'}, digest {prep.digest[:12]} "
        f"({time.perf_counter() - t0:.1f}s) -> {out}"
    )


@_user_errors
def partition(
    noe: Annotated[int, typer.Option(help="Number of experts (shards).")],
    prepared: Annotated[Path, typer.Option(help="Prepared store.")] = Path("data/prepared"),
    out: Annotated[Path | None, typer.Option(help="Partition file (default data/partitions/noe<N>.pt).")] = None,
    seed: Annotated[int | None, typer.Option(help="Partition seed (default: partition.seed).")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Split the training set into NoE class-balanced, disjoint shards (indices only)."""
    from moedd.data import check_ipc_fits, load_prepared, make_partition, save_partition

    params = _params(params_path, sets, **{"partition.seed": seed})
    ipc = check_budget(params.distill.budget, noe)
    prep = load_prepared(prepared)
    part = make_partition(prep.train_labels, prep.num_classes, noe, params.partition.seed, prep.digest)
    check_ipc_fits(part, prep.train_labels, prep.num_classes, ipc)
    target = out or Path(f"data/partitions/noe{noe}.pt")
    save_partition(part, target)
    sizes = ", ".join(str(len(s)) for s in part.shards)
    console.log(f"partition NoE={noe} seed={params.partition.seed}: shard sizes {sizes}, digest {part.digest[:12]} -> {target}")

