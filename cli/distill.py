"""The distill stage: NoE experts of one method distill the training set, jointly, on their shards."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moedd._atomic import atomic_file
from moedd.config import ConfigError, check_budget, flatten
from moedd.experts import EXPERTS
from moedd.params import Params

from ._common import CheckpointOpt, ParamsOpt, SetOpt, _checkpoints, _params, _user_errors, _write_json
from .progress import bars, console


@_user_errors
def distill(
    expert: Annotated[str, typer.Option(help=f"Expert method: {' | '.join(EXPERTS.names())}; or one per expert, "
                                              "e.g. idc,idm (a heterogeneous mixture: expert k runs the k-th).")],
    noe: Annotated[int, typer.Option(help="Number of experts; each distills budget/NoE images per class.")] = 2,
    budget: Annotated[int | None, typer.Option(help="Images per class in total (default: distill.budget).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Override experts.<expert>.iterations.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] (default: distill.device).")] = None,
    prepared: Annotated[Path, typer.Option(help="Prepared store.")] = Path("data/prepared"),
    partition_path: Annotated[Path | None, typer.Option("--partition", help="Partition file (default data/partitions/noe<N>.pt; made on the fly if absent).")] = None,
    out: Annotated[Path | None, typer.Option(help="Synthetic set directory (default data/synthetic/<expert>-noe<N>).")] = None,
    metrics: Annotated[Path | None, typer.Option(help="Summary metrics JSON (for DVC).")] = None,
    plots: Annotated[Path | None, typer.Option(help="Loss curve CSV (for DVC plots).")] = None,
    checkpoint_dir: CheckpointOpt = None,
    trajectories: Annotated[Path | None, typer.Option(help="Teacher trajectories of the shards (MTT; default data/trajectories/noe<N>).")] = None,
    nproc: Annotated[int | None, typer.Option(help="Processes sharing the experts (torchrun on this machine; default distill.nproc).")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Distill the training set with NoE experts, jointly, each on its own shard: one method for
    every expert, or one per expert (--expert idc,idm). Under `torchrun --nproc-per-node N` (or
    with --nproc N, which launches it) each of N ranks optimises NoE/N experts, with the images of
    the one-process run; rank 0 tracks and writes."""
    from moedd.experts.mixture import mixture_name, parse_methods

    methods = parse_methods(expert, EXPERTS.names())
    name, kinds = mixture_name(methods), [EXPERTS.get(m) for m in methods]
    params = _params(params_path, sets, **{
        "distill.budget": budget, "distill.device": device, "distill.nproc": nproc,
        **{f"experts.{m}.iterations": iterations for m in methods},
    })
    ipc = check_budget(params.distill.budget, noe)
    if plots is not None and not any(k.optimises for k in kinds):
        raise ConfigError(f"--plots: {expert} selects real images and has no loss curve to plot")
    if any(k.needs_trajectories for k in kinds) and trajectories is None:
        trajectories = Path(f"data/trajectories/noe{noe}")
    if params.distill.nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        _maybe_launch(params, name, noe, prepared, partition_path, trajectories, explicit=nproc is not None)
    _run_distill(params, name, noe, ipc, prepared, partition_path, out, metrics, plots, _checkpoints(checkpoint_dir),
                 trajectories)


def _maybe_launch(params: Params, name: str, noe: int, prepared: Path, partition_path: Path | None,
                  trajectories: Path | None, explicit: bool) -> None:
    """Check the run for ``distill.nproc`` ranks, then become ``torchrun --standalone
    --nproc-per-node N`` running this same command (the ranks see ``LOCAL_RANK`` and do not launch
    again). A run that cannot be spread fails in one line when --nproc asked for it; with the value
    from params.yaml (one setting for every distill stage of the grid) it runs in one process."""
    from moedd.distill import SpreadError

    n = params.distill.nproc
    try:
        _inputs(params, name, noe, prepared, partition_path, trajectories, n)
    except SpreadError as err:
        if explicit:
            raise
        console.log(f"distill.nproc={n}: {err}; running in one process")
        return
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // n)))  # torchrun would give each rank 1 thread
    argv, skip = [], False
    for arg in sys.argv[1:]:  # torchrun would read --nproc as its own --nproc-per-node: say it with -S
        if not skip and not arg.startswith("--nproc="):
            skip = arg == "--nproc"
            argv += [] if skip else [arg]
        else:
            skip = False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "moedd.cli",
           *argv, "-S", f"distill.nproc={n}"]
    console.log(f"launching {n} ranks ({env['OMP_NUM_THREADS']} threads each): {' '.join(cmd[1:])}")
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)  # signals reach torchrun, which stops its ranks


def _inputs(params: Params, expert: str, noe: int, prepared: Path, partition_path: Path | None,
            trajectories_path: Path | None, world: int = 0) -> tuple[Any, Path, Any, Any, Any, Any]:
    """Load and validate the run's inputs (before any work or tracking): device, partition file,
    prepared data, partition (made in memory when the file is absent), teachers and the plan;
    ``world``: the ranks it will run on (default: this launch's)."""
    from moedd.data import load_partition, load_prepared, make_partition
    from moedd.device import resolve_device
    from moedd.distill import check_spread, plan_run

    device = resolve_device(params.distill.device)
    prep = load_prepared(prepared)
    part_file = partition_path or Path(f"data/partitions/noe{noe}.pt")
    if part_file.exists():
        part = load_partition(part_file)
        if part.noe != noe:
            raise ConfigError(f"{part_file} has {part.noe} shards but --noe is {noe}")
    else:
        part = make_partition(prep.train_labels, prep.num_classes, noe, params.partition.seed, prep.digest)
    traj = None
    if trajectories_path is not None:
        from moedd.trajectories import load_trajectories

        if not trajectories_path.exists():
            raise ConfigError(f"{trajectories_path} not found: run `moedd trajectories --noe {noe}` first")
        traj = load_trajectories(trajectories_path)
    plan = plan_run(expert, params, prep, part, device, traj)
    check_spread(plan, world or int(os.environ.get("WORLD_SIZE", "1")))
    if not part_file.exists():  # said after validation: a bad input stays one line
        console.log(f"{part_file} not found: partitioned in memory (seed {params.partition.seed})")
    return device, part_file, prep, part, traj, plan


def _run_distill(
    params: Params, expert: str, noe: int, ipc: int, prepared: Path, partition_path: Path | None,
    out: Path | None, metrics: Path | None, plots: Path | None, checkpoint_dir: Path,
    trajectories_path: Path | None = None,
) -> None:
    import mlflow

    from moedd.distributed import ranks_from_env
    from moedd.distill import run_distillation
    from moedd.synthetic import save_synthetic
    from moedd.tracking import ExpertRuns, cell_tags, stage_run

    device, part_file, prep, part, traj, plan = _inputs(params, expert, noe, prepared, partition_path, trajectories_path)
    ranks = ranks_from_env()
    if ranks is not None:
        device = ranks.device(device)
        if not ranks.main:  # its block of experts; rank 0 tracks and writes
            run_distillation(plan.method, params, prep, part, device, checkpoint_dir, None, "", traj, plan, ranks)
            return
    target = out or Path(f"data/synthetic/{expert}-noe{noe}")
    stage_params = {"expert": expert, "noe": noe, "ipc": ipc, "budget": params.distill.budget, "device": str(device),
                    "scale": params.scale, "ranks": ranks.world if ranks else 1,
                    **flatten(params.distill, "distill."), "preset": plan.preset_label,
                    **{k: v for m, c in plan.sections.items() for k, v in flatten(c, f"experts.{m}.").items()}}
    cell = cell_tags(expert, params.distill.budget, ipc, noe, prep.name, prep.paper)
    name = f"distill {expert} {cell['dataset']} b{params.distill.budget} {cell['config']}"
    with stage_run(params, name, stage_params, {"stage": "distill", "expert": expert, **cell}) as run:
        on = f"{device}, {ranks.world} ranks" if ranks else str(device)
        console.log(f"{name} on {prep.name} ({prep.num_classes} classes), device {on}, MLflow run {run.info.run_id[:8]}")
        _log_inputs(prepared, prep, part_file, part, trajectories_path, traj, noe)
        with ExpertRuns(run.info.run_id, plan.methods, noe, ipc) as runs:
            result = _optimise(params, plan, prep, part, device, checkpoint_dir, traj, runs, ranks)
            written = save_synthetic(target, list(result.images), [result.labels] * noe, result.metas, result.zca)
            runs.finish(result.images, result.metas, result.zca)
        summary = {"expert": expert, "noe": noe, "ipc": ipc, "budget": params.distill.budget, "scale": params.scale,
                   "iterations": plan.iterations, "seconds": round(result.seconds, 2),
                   "resumed_from": result.resumed_from}
        if result.history:
            summary.update({k: v for k, v in result.history[-1].items() if k != "step"})
        mlflow.log_metrics({"seconds": result.seconds, "iterations_done": float(len(result.history))})
        mlflow.set_tag("synthetic_sha256", ",".join(m.sha256 for m in written))
        _write_json(metrics, summary)
        _write_plots(plots, result.history)
    console.log(f"wrote {noe} expert set(s) of {ipc} images/class -> {target} ({result.seconds:.1f}s)")


def _log_inputs(prepared: Path, prep: Any, part_file: Path, part: Any, trajectories_path: Path | None, traj: Any,
                noe: int) -> None:
    from moedd.tracking import log_input

    log_input(prepared, "prepared", "data", prep.digest)
    if part_file.exists():
        log_input(part_file, f"partition-noe{noe}", "partition", part.digest)
    if traj is not None and trajectories_path is not None:
        log_input(trajectories_path, f"trajectories-noe{noe}", "trajectories", str(traj.meta.get("digest", "")))


def _optimise(params: Params, plan: Any, prep: Any, part: Any, device: Any, checkpoint_dir: Path, traj: Any,
              runs: Any, ranks: Any = None) -> Any:
    """The run itself, with one progress bar per expert and the metrics sent to MLflow as they come."""
    from moedd.distill import run_distillation
    from moedd.tracking import git_commit

    labels = [f"{m} expert {k}" for k, m in enumerate(plan.methods)]
    with bars() as b:
        for label in labels:
            b.add(label, plan.iterations)

        def on_log(done: int, _total: int, rows: list[dict[str, float]]) -> None:
            last = rows[-1] if rows else {}
            for k, label in enumerate(labels):
                loss = last.get(f"match_e{k}", last.get("match"))
                b.update(label, done, f"loss {loss:.4g}" if loss is not None else "")
            runs.log(rows)

        return run_distillation(plan.method, params, prep, part, device, checkpoint_dir, on_log, git_commit(), traj, plan,
                                ranks)


def _write_plots(path: Path | None, history: list[dict[str, float]]) -> None:
    if path is None:
        return
    keys = ["step", "loss", "match", "dcor"]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for row in history:
            w.writerow([int(row["step"]) if k == "step" else row.get(k, "") for k in keys])

