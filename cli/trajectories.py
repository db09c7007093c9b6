"""The trajectories stage: MTT's teacher networks, trained on every shard (resumable per teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moedd.config import ConfigError, check_budget, flatten
from moedd.params import Params

from ._common import CheckpointOpt, ParamsOpt, SetOpt, _checkpoints, _params, _user_errors, _write_json
from .progress import bars, console


@_user_errors
def trajectories(
    noe: Annotated[int, typer.Option(help="Number of experts (shards); teachers train on one shard each.")],
    prepared: Annotated[Path, typer.Option(help="Prepared store.")] = Path("data/prepared"),
    partition_path: Annotated[Path | None, typer.Option("--partition", help="Partition file (default data/partitions/noe<N>.pt).")] = None,
    out: Annotated[Path | None, typer.Option(help="Trajectories directory (default data/trajectories/noe<N>).")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Summary metrics JSON (for DVC).")] = None,
    teachers: Annotated[int | None, typer.Option(help="Teachers per shard (default: trajectories.num_teachers).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per teacher (default: trajectories.epochs, else MTT's max_start_epoch + expert_epochs).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] (default: trajectories.device).")] = None,
    grid_budgets: Annotated[bool, typer.Option(help="Train for the largest budget of grid.budgets, not distill.budget: "
                                               "one set of teachers then serves every budget of the grid (dvc repro).")] = False,
    expert: Annotated[str | None, typer.Option(help="A heterogeneous mixture (e.g. idm,mtt): teachers only for the "
                                               "shards whose method needs them (default: every shard).")] = None,
    checkpoint_dir: CheckpointOpt = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train MTT teacher trajectories on every shard (resumable: finished teachers are kept, in the output
    and, until the run is complete, under --checkpoint-dir/teachers, so that they outlive a queued experiment)."""
    named = {"trajectories.num_teachers": teachers, "trajectories.epochs": epochs, "trajectories.device": device}
    params = _params(params_path, sets, **named)
    if grid_budgets:  # the largest IPC needs the most teacher epochs; a smaller one uses fewer of them
        params = _params(params_path, sets, **named, **{"distill.budget": max(params.grid.budgets)})
    check_budget(params.distill.budget, noe)
    _run_trajectories(params, noe, prepared, partition_path or Path(f"data/partitions/noe{noe}.pt"),
                      out or Path(f"data/trajectories/noe{noe}"), metrics, _checkpoints(checkpoint_dir) / "teachers",
                      _teacher_shards(expert, noe))


def _teacher_shards(expert: str | None, noe: int) -> list[int] | None:
    """The shards of a mixture whose method distills against teachers (None: every shard)."""
    if expert is None:
        return None
    from moedd.experts import EXPERTS
    from moedd.experts.mixture import parse_methods

    methods = parse_methods(expert, EXPERTS.names())
    if len(methods) != noe:
        raise ConfigError(f"--expert {expert} names {len(methods)} methods for {noe} shards: one per shard")
    shards = [k for k, m in enumerate(methods) if EXPERTS.get(m).needs_trajectories]
    if not shards:
        raise ConfigError(f"--expert {expert}: no method of it needs teacher trajectories")
    return shards



def _run_trajectories(params: Params, noe: int, prepared: Path, part_file: Path, target: Path, metrics: Path | None,
                      teacher_cache: Path | None = None, shards: list[int] | None = None) -> None:
    from moedd.data import load_partition, load_prepared
    from moedd.device import resolve_device
    from moedd.tracking import TeacherLog, log_input, stage_run
    from moedd.distributed import ranks_from_env
    from moedd.trajectories import mtt_config, summarize, teacher_epochs, train_teachers, validate_trajectories

    device = resolve_device(params.trajectories.device)
    prep = load_prepared(prepared)
    part = load_partition(part_file)
    if part.noe != noe:
        raise ConfigError(f"{part_file} has {part.noe} shards but --noe is {noe}")
    ipc = validate_trajectories(params, prep, part)  # before any work or tracking
    ranks = ranks_from_env()
    device = ranks.device(device) if ranks else device
    if ranks is not None and not ranks.main:  # its share of the teachers; rank 0 tracks and writes meta.json
        train_teachers(params, prep, part, target, device, cache_dir=teacher_cache, shards=shards, ranks=ranks)
        return
    epochs, mtt, cfg = teacher_epochs(params, ipc, prep.paper), mtt_config(params, ipc, prep.paper), params.trajectories
    stage_params = {**flatten(cfg, "trajectories."), "epochs": epochs, "zca": mtt.zca, "zca_eps": mtt.zca_eps,
                    "noe": noe, "ipc": ipc, "net": params.distill.net, "device": str(device),
                    "shards": "all" if shards is None else ",".join(map(str, shards))}
    name = f"trajectories {ipc}x{noe}"
    with stage_run(params, name, stage_params, {"stage": "trajectories"}) as run:
        space = "ZCA" if mtt.zca else "normalized"
        console.log(f"{name}: {cfg.num_teachers} teachers x {epochs} epochs per shard, {space} inputs, "
                    f"device {device}, MLflow run {run.info.run_id[:8]}")
        log_input(prepared, "prepared", "data", prep.digest)
        log_input(part_file, f"partition-noe{noe}", "partition", part.digest)
        log = TeacherLog(run.info.run_id)
        result = _train(params, prep, part, target, device, epochs, log, teacher_cache, shards, ranks)
        out = summarize(result)
        log.summary(result, out)
        _write_json(metrics, out)
    console.log(f"{result.trained} teacher(s) trained, {result.skipped} kept; mean test acc {out['test_acc_mean']:.2f}% "
                f"({result.seconds:.1f}s) -> {target}")


def _train(params: Params, prep, part, target: Path, device, epochs: int, log, teacher_cache: Path | None,  # type: ignore[no-untyped-def]
           shards: list[int] | None = None, ranks=None):
    """Train the teachers with progress bars (one per shard) and their curves logged as they come."""
    from moedd.trajectories import TeacherRecord, train_teachers

    cfg = params.trajectories
    with bars() as b:
        for k in shards if shards is not None else range(part.noe):
            b.add(f"shard {k}", cfg.num_teachers * epochs)

        def on_epoch(k: int, i: int, epoch: int, acc: float, loss: float) -> None:
            b.update(f"shard {k}", i * epochs + epoch, f"teacher {i}, train acc {100 * acc:.1f}%")
            log.curve(k, i, [acc], [loss], epoch)

        def on_teacher(rec: TeacherRecord) -> None:
            log.teacher(rec)
            state = "kept" if rec.skipped else "trained"
            b.update(f"shard {rec.shard}", (rec.index + 1) * epochs, f"teacher {rec.index} {state}, test acc {100 * rec.test_acc:.1f}%")

        return train_teachers(params, prep, part, target, device, on_epoch, on_teacher, teacher_cache, shards, ranks)
