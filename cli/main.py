"""The ``moedd`` command line: one command per DVC stage, thin over the library.

Every command reads params.yaml (``--params``), applies its own options and any ``-S key=value``
overrides (the same syntax as ``dvc exp run -S``), validates everything, then runs. User errors
print one line and exit with code 1.
"""

from __future__ import annotations

import csv
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from rich.markup import escape

from moedd._atomic import atomic_file, write_text
from moedd.cli.progress import bars, console
from moedd.config import ConfigError, check_budget, flatten
from moedd.params import Params, load_params
from moedd.registry import UnknownNameError

app = typer.Typer(
    name="moedd",
    help="Dataset distillation with a mixture of experts (DVC stages, MLflow lineage).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_PARAMS = Path("params.yaml")
ParamsOpt = Annotated[
    Path | None,
    typer.Option(
        "--params",
        help="Params file to read (default: params.yaml; a missing params.yaml means the built-in defaults, "
             "said on the first log line). A --params file that does not exist is an error.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override any param, e.g. -S experts.dm.iterations=50 (repeatable)."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="MOEDD_CHECKPOINT_DIR",
        help="Where resumable state lives, keyed by the run's fingerprint (default: <repository root>/.moedd/checkpoints, "
             "the root being $DVC_ROOT under DVC, so a queued experiment's state outlives its temporary copy).",
    ),
]
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn expected user errors into one red line on stderr and exit code 1.

    The line is printed unwrapped (``soft_wrap``) and any newline inside the message is joined, so
    an error is exactly one line whatever the terminal width: scripts and tests can rely on it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moedd.data import DataSourceError
        from moedd.synthetic import SyntheticSetError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, UnknownNameError, DataSourceError, SyntheticSetError, FileNotFoundError, ValueError) as err:
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _overrides(sets: list[str] | None, **named: Any) -> dict[str, Any]:
    """The ``-S key=value`` overrides (values parsed as YAML, as ``dvc exp run -S``) and the named
    options that were given, as dotted keys for :func:`load_params`."""
    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-S expects key=value, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(f"-S {item}: the value is not valid YAML ({what})") from None
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def _params(path: Path | None, sets: list[str] | None, **named: Any) -> Params:
    """Load and validate the params: an explicit ``--params`` file must exist; without one,
    params.yaml is read, or, if there is none, the built-in defaults are used and the log says so
    (a run on defaults by mistake would otherwise look like any other)."""
    overrides = _overrides(sets, **named)
    if path is None:
        if not DEFAULT_PARAMS.exists():
            console.log(f"{DEFAULT_PARAMS} not found: using the built-in defaults")
            return load_params(None, overrides)
        path = DEFAULT_PARAMS
    return load_params(path, overrides)


def _checkpoints(option: Path | None) -> Path:
    """--checkpoint-dir / $MOEDD_CHECKPOINT_DIR, else the repository root's .moedd/checkpoints."""
    from moedd.tracking import checkpoint_root

    return option if option is not None else checkpoint_root()


def _csv_list(value: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    return None if value is None else [cast(v.strip()) for v in value.split(",") if v.strip()]


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        write_text(path, json.dumps(data, indent=2) + "\n")  # a kill leaves the old file or the new one


@app.command()
@_user_errors
def init(params_path: ParamsOpt = None, sets: SetOpt = None) -> None:
    """Create the MLflow store and experiment once (before parallel queued runs)."""
    from moedd.tracking import init_tracking, tracking_uri

    params = _params(params_path, sets)
    exp_id = init_tracking(params.mlflow)
    console.print(f"MLflow store {tracking_uri(params.mlflow)}, experiment '{params.mlflow.experiment}' (id {exp_id})")


@app.command()
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

    from moedd.tracking import init_tracking, tracking_uri

    params = _params(params_path, sets)
    init_tracking(params.mlflow)  # the store and its experiment exist, marked as model training
    uri = tracking_uri(params.mlflow)
    console.print(f"MLflow UI on {uri}: http://{host}:{port}  (Ctrl-C stops it)", soft_wrap=True)
    sys.stdout.flush()
    # the server replaces this process, so Ctrl-C and kill reach it directly
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                              "--host", host, "--port", str(port), "--workers", "1"])


@app.command()
@_user_errors
def prepare(
    out: Annotated[Path, typer.Option(help="Directory of the prepared store.")] = Path("data/prepared"),
    source: Annotated[str | None, typer.Option(help="cifar10 | cifar100 | imagefolder (default: data.source).")] = None,
    root: Annotated[str | None, typer.Option(help="Download dir or image folder (default: data.root).")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Read the dataset from its source and store it as uint8 tensors with a digest."""
    from moedd.data import load_source, save_prepared

    params = _params(params_path, sets, **{"data.source": source, "data.root": root})
    t0 = time.perf_counter()
    # no "reading ..." line first: a source that is not there fails with its one-line error alone
    prep = save_prepared(load_source(params.data.source, params.data.root, params.data.download), out)
    console.log(
        f"prepared {prep.name} from {params.data.source} {params.data.root}: "
        f"{len(prep.train_labels)} train / {len(prep.test_labels)} test images, "
        f"{prep.num_classes} classes, shape {prep.image_shape}, digest {prep.digest[:12]} "
        f"({time.perf_counter() - t0:.1f}s) -> {out}"
    )


@app.command()
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


@app.command()
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
    checkpoint_dir: CheckpointOpt = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train MTT teacher trajectories on every shard (resumable: finished teachers are kept, in the output
    and, until the run is complete, under --checkpoint-dir/teachers, so that they outlive a queued experiment)."""
    params = _params(params_path, sets, **{
        "trajectories.num_teachers": teachers, "trajectories.epochs": epochs, "trajectories.device": device,
    })
    check_budget(params.distill.budget, noe)
    _run_trajectories(params, noe, prepared, partition_path or Path(f"data/partitions/noe{noe}.pt"),
                      out or Path(f"data/trajectories/noe{noe}"), metrics, _checkpoints(checkpoint_dir) / "teachers")


def _run_trajectories(params: Params, noe: int, prepared: Path, part_file: Path, target: Path, metrics: Path | None,
                      teacher_cache: Path | None = None) -> None:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from moedd.data import load_partition, load_prepared
    from moedd.device import resolve_device
    from moedd.tracking import log_input, stage_run
    from moedd.trajectories import TeacherRecord, mtt_config, summarize, teacher_epochs, train_teachers, validate_trajectories

    device = resolve_device(params.trajectories.device)
    prep = load_prepared(prepared)
    part = load_partition(part_file)
    if part.noe != noe:
        raise ConfigError(f"{part_file} has {part.noe} shards but --noe is {noe}")
    ipc = validate_trajectories(params, prep, part)  # before any work or tracking
    epochs, mtt, cfg = teacher_epochs(params, ipc), mtt_config(params, ipc), params.trajectories
    stage_params = {**flatten(cfg, "trajectories."), "epochs": epochs, "zca": mtt.zca, "zca_eps": mtt.zca_eps,
                    "noe": noe, "ipc": ipc, "net": params.distill.net, "device": str(device)}
    name = f"trajectories {ipc}x{noe}"
    with stage_run(params, name, stage_params, {"stage": "trajectories"}) as run:
        space = "ZCA" if mtt.zca else "normalized"
        console.log(f"{name}: {cfg.num_teachers} teachers x {epochs} epochs per shard, {space} inputs, "
                    f"device {device}, MLflow run {run.info.run_id[:8]}")
        log_input(prepared, "prepared", "data", prep.digest)
        log_input(part_file, f"partition-noe{noe}", "partition", part.digest)
        client, run_id = MlflowClient(), run.info.run_id
        with bars() as b:
            for k in range(noe):
                b.add(f"shard {k}", cfg.num_teachers * epochs)

            def curve(k: int, i: int, accs: list[float], losses: list[float], first: int) -> None:
                now, key = int(time.time() * 1000), f"shard{k}.teacher{i:03d}"
                client.log_batch(run_id, metrics=[
                    m for e, (a, loss) in enumerate(zip(accs, losses, strict=True), start=first)
                    for m in (Metric(f"train_acc.{key}", 100 * a, now, e), Metric(f"train_loss.{key}", loss, now, e))
                ])

            def on_epoch(k: int, i: int, epoch: int, acc: float, loss: float) -> None:
                b.update(f"shard {k}", i * epochs + epoch, f"teacher {i}, train acc {100 * acc:.1f}%")
                curve(k, i, [acc], [loss], epoch)

            def on_teacher(rec: TeacherRecord) -> None:
                if rec.skipped:  # kept from an earlier run: this run still gets its curve
                    curve(rec.shard, rec.index, rec.train_acc, rec.train_loss, 1)
                mlflow.log_metric(f"test_acc.shard{rec.shard}.teacher{rec.index:03d}", 100 * rec.test_acc)
                state = "kept" if rec.skipped else "trained"
                b.update(f"shard {rec.shard}", (rec.index + 1) * epochs, f"teacher {rec.index} {state}, test acc {100 * rec.test_acc:.1f}%")

            result = train_teachers(params, prep, part, target, device, on_epoch, on_teacher, teacher_cache)
        out = summarize(result)
        mlflow.log_metrics({"test_acc_mean": out["test_acc_mean"], "test_acc_std": out["test_acc_std"],
                            "trained": result.trained, "kept": result.skipped, "seconds": result.seconds,
                            **{f"test_acc_mean.shard{k}": v for k, v in out["test_acc_per_shard"].items()}})
        mlflow.set_tag("trajectories_digest", result.meta["digest"])
        client.log_dict(run_id, result.meta, "trajectories/meta.json")
        _write_json(metrics, out)
    console.log(f"{result.trained} teacher(s) trained, {result.skipped} kept; mean test acc {out['test_acc_mean']:.2f}% "
                f"({result.seconds:.1f}s) -> {target}")


def _expert_child_runs(parent_id: str, noe: int, expert: str, ipc: int) -> list[str]:
    """One MLflow child run per expert under the distill run (logged to with the client API)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = mlflow.get_run(parent_id).info.experiment_id
    ids = []
    for k in range(noe):
        run = client.create_run(exp_id, run_name=f"expert {k}", tags={"mlflow.parentRunId": parent_id, "expert_index": str(k)})
        client.log_batch(run.info.run_id, params=[
            mlflow.entities.Param("expert", expert), mlflow.entities.Param("expert_index", str(k)),
            mlflow.entities.Param("ipc", str(ipc)), mlflow.entities.Param("noe", str(noe)),
        ])
        ids.append(run.info.run_id)
    return ids


@app.command()
@_user_errors
def distill(
    expert: Annotated[str, typer.Option(help="Expert method: random | dm | idm | idc (any registered method; see `moedd list`).")],
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
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Distill the training set with NoE experts of one method, jointly, on their own shards."""
    from moedd.experts import EXPERTS

    EXPERTS.get(expert)
    params = _params(params_path, sets, **{
        "distill.budget": budget, "distill.device": device,
        f"experts.{expert}.iterations": iterations,
    })
    ipc = check_budget(params.distill.budget, noe)
    if expert == "mtt" and trajectories is None:
        trajectories = Path(f"data/trajectories/noe{noe}")
    _run_distill(params, expert, noe, ipc, prepared, partition_path, out, metrics, plots, _checkpoints(checkpoint_dir),
                 trajectories)


def _run_distill(
    params: Params, expert: str, noe: int, ipc: int, prepared: Path, partition_path: Path | None,
    out: Path | None, metrics: Path | None, plots: Path | None, checkpoint_dir: Path,
    trajectories_path: Path | None = None,
) -> None:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from moedd.data import load_partition, load_prepared, make_partition
    from moedd.device import resolve_device
    from moedd.distill import plan_run, run_distillation
    from moedd.synthetic import save_synthetic
    from moedd.tracking import git_commit, log_input, stage_run
    from moedd.visualize import expert_grid

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
    plan = plan_run(expert, params, prep, part, device, traj)  # before any work or tracking
    if not part_file.exists():  # said after validation: a bad input stays one line
        console.log(f"{part_file} not found: partitioned in memory (seed {params.partition.seed})")
    cfg, preset = plan.config, plan.preset
    total = int(getattr(cfg, "iterations", 0))
    target = out or Path(f"data/synthetic/{expert}-noe{noe}")
    stage_params = {"expert": expert, "noe": noe, "ipc": ipc, "budget": params.distill.budget, "device": str(device),
                    **flatten(params.distill, "distill."), **flatten(cfg, f"experts.{expert}."),
                    "preset": preset.label if preset else "none"}
    name = f"distill {expert} {ipc}x{noe}"
    with stage_run(params, name, stage_params, {"stage": "distill", "expert": expert}) as run:
        console.log(f"{name} on {prep.name} ({prep.num_classes} classes), device {device}, MLflow run {run.info.run_id[:8]}")
        log_input(prepared, "prepared", "data", prep.digest)
        if part_file.exists():
            log_input(part_file, f"partition-noe{noe}", "partition", part.digest)
        if traj is not None and trajectories_path is not None:
            log_input(trajectories_path, f"trajectories-noe{noe}", "trajectories", str(traj.meta.get("digest", "")))
        child_ids = _expert_child_runs(run.info.run_id, noe, expert, ipc)
        client = MlflowClient()
        with bars() as b:
            for k in range(noe):
                b.add(f"{expert} expert {k}", total)

            def on_log(done: int, _total: int, rows: list[dict[str, float]]) -> None:
                last = rows[-1] if rows else {}
                for k in range(noe):
                    loss = last.get(f"match_e{k}", last.get("match"))
                    b.update(f"{expert} expert {k}", done, f"loss {loss:.4g}" if loss is not None else "")
                now = int(time.time() * 1000)
                stage_metrics = [Metric(key, v, now, int(r["step"])) for r in rows for key, v in r.items() if key != "step" and not key.startswith("match_e")]
                for i in range(0, len(stage_metrics), 1000):  # MLflow takes at most 1000 per batch
                    client.log_batch(run.info.run_id, metrics=stage_metrics[i:i + 1000])
                for k, cid in enumerate(child_ids):
                    ms = [Metric("loss", r[f"match_e{k}"], now, int(r["step"])) for r in rows if f"match_e{k}" in r]
                    if ms:
                        client.log_batch(cid, metrics=ms)

            try:
                result = run_distillation(expert, params, prep, part, device, checkpoint_dir, on_log, git_commit(), traj, plan)
            except BaseException as err:  # interrupted or failed: the expert runs must not stay RUNNING
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                for cid in child_ids:
                    client.set_terminated(cid, status)
                raise
        written = save_synthetic(target, list(result.images), [result.labels] * noe, result.metas, result.zca)
        for k, cid in enumerate(child_ids):
            grid = expert_grid(result.images[k], result.metas[k], zca=result.zca)
            client.log_image(cid, grid, artifact_file=f"grids/expert-{k}.png")
            client.log_dict(cid, json.loads(result.metas[k].model_dump_json()), f"synthetic/expert-{k}.json")
            client.set_terminated(cid)
        summary = {"expert": expert, "noe": noe, "ipc": ipc, "budget": params.distill.budget,
                   "iterations": total, "seconds": round(result.seconds, 2),
                   "resumed_from": result.resumed_from}
        if result.history:
            summary.update({k: v for k, v in result.history[-1].items() if k != "step"})
        mlflow.log_metrics({"seconds": result.seconds, "iterations_done": float(len(result.history))})
        mlflow.set_tag("synthetic_sha256", ",".join(m.sha256 for m in written))
        _write_json(metrics, summary)
        _write_plots(plots, result.history)
    console.log(f"wrote {noe} expert set(s) of {ipc} images/class -> {target} ({result.seconds:.1f}s)")


def _write_plots(path: Path | None, history: list[dict[str, float]]) -> None:
    if path is None:
        return
    keys = ["step", "loss", "match", "dcor"]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for row in history:
            w.writerow([int(row["step"]) if k == "step" else row.get(k, "") for k in keys])


@app.command()
@_user_errors
def evaluate(
    synthetic: Annotated[Path, typer.Option(help="Synthetic set directory written by `moedd distill`.")],
    prepared: Annotated[Path, typer.Option(help="Prepared store (its test split is used).")] = Path("data/prepared"),
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON (for DVC).")] = None,
    nets: Annotated[str | None, typer.Option(help="Comma list of networks (default: evaluate.nets).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma list of seeds (default: evaluate.seeds).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: evaluate.epochs).")] = None,
    fusion: Annotated[str | None, typer.Option(help="mixup | none (default: fusion.kind).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N].")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
    checkpoint_dir: CheckpointOpt = None,
) -> None:
    """Train every evaluation network on the fused synthetic set; test on the real test set.

    Each finished (network, seed) unit is recorded and the unit in training is checkpointed every
    evaluate.checkpoint_every epochs under --checkpoint-dir/evaluate, keyed by a fingerprint of the
    set, protocol and test data: the same command after an interruption continues there."""
    import mlflow

    from moedd.data import load_prepared
    from moedd.device import resolve_device
    from moedd.evaluate import EvaluationCheckpoints, evaluate_synthetic, fusion_effective
    from moedd.nets import DISPLAY_NAMES
    from moedd.paper import dataset_key
    from moedd.synthetic import check_matches, load_synthetic
    from moedd.tracking import child_run, log_input, stage_run

    params = _params(params_path, sets, **{
        "evaluate.nets": _csv_list(nets), "evaluate.seeds": _csv_list(seeds, int),
        "evaluate.epochs": epochs, "fusion.kind": fusion, "evaluate.device": device,
    })
    syn = load_synthetic(synthetic)
    prep = load_prepared(prepared)
    check_matches(syn, prep.classes, prep.image_shape, prep.digest)
    dev = resolve_device(params.evaluate.device)
    m, cfg = syn.meta, params.evaluate
    fused = fusion_effective(syn, params.fusion)
    protocol = {**flatten(cfg, "evaluate."), **flatten(params.fusion, "fusion."), "fusion.effective": fused,
                "lr_used": m.learned_lr if m.learned_lr is not None else cfg.lr, "decoding": m.decoding}
    name = f"evaluate {m.method} {m.ipc}x{m.noe}"
    stage_params = {"expert": m.method, "noe": m.noe, "ipc": m.ipc, "budget": m.budget, **protocol}
    out: dict[str, Any] = {"method": m.method, "noe": m.noe, "ipc": m.ipc, "budget": m.budget, "dataset": prep.name,
                           "classes": len(prep.classes), "paper_dataset": dataset_key(prep.name, prep.classes), "fusion": fused, "epochs": cfg.epochs, "seeds": cfg.seeds, "nets": {}}
    with stage_run(params, name, stage_params, {"stage": "evaluate", "expert": m.method}) as run:
        console.log(f"{name}: {len(cfg.nets)} nets x {len(cfg.seeds)} seeds x {cfg.epochs} epochs, fusion {fused}, device {dev}, MLflow run {run.info.run_id[:8]}")
        log_input(synthetic, f"synthetic-{m.method}-noe{m.noe}", "synthetic", ",".join(x.sha256[:16] for x in syn.metas))
        log_input(prepared, "prepared", "data", prep.digest)
        store = EvaluationCheckpoints.for_cell(_checkpoints(checkpoint_dir) / "evaluate", f"{m.method}-{m.ipc}x{m.noe}",
                                               syn, prep.test_images, prep.test_labels, cfg, params.fusion)
        for other in store.others():
            console.log(f"ignoring {other}: evaluation checkpoints of another protocol, set or test data")
        per_net = len(cfg.seeds) * cfg.epochs
        with bars() as b:
            for net in cfg.nets:
                b.add(DISPLAY_NAMES.get(net, net), per_net)
            accs: dict[str, list[float]] = {n: [] for n in cfg.nets}
            trained: set[tuple[str, int]] = set()

            def on_epoch(net: str, seed: int, epoch: int) -> None:
                trained.add((net, seed))
                i = cfg.seeds.index(seed)
                done = accs[net]
                status = f"seed {seed}" + (f", acc {100 * sum(done) / len(done):.2f}%" if done else "")
                b.update(DISPLAY_NAMES.get(net, net), i * cfg.epochs + epoch, status)

            def on_result(net: str, seed: int, acc: float) -> None:
                accs[net].append(acc)
                if (net, seed) not in trained:  # restored as finished: move the bar past it
                    on_epoch(net, seed, cfg.epochs)

            def on_resume(net: str, seed: int, epoch: int, done: int) -> None:
                what = f"resumed {net} seed {seed} at epoch {epoch}/{cfg.epochs}; {done} units done"
                console.log(f"{what} (checkpoints {store.dir})")
                mlflow.set_tag("moedd.resumed", what)

            results = evaluate_synthetic(syn, prep.test_images, prep.test_labels, cfg, params.fusion, dev, on_result,
                                         on_epoch, store, on_resume)
        for net, res in results.items():
            with child_run(f"{DISPLAY_NAMES.get(net, net)}", {"net": net, "expert": m.method, "noe": m.noe, "ipc": m.ipc}, {"stage": "evaluate"}):
                for i, acc in enumerate(res.accs):
                    mlflow.log_metric("test_acc", 100 * acc, step=i)
                mlflow.log_metrics({"test_acc_mean": 100 * res.mean, "test_acc_std": 100 * res.std, "seconds": res.seconds})
            mlflow.log_metrics({f"acc_mean.{net}": 100 * res.mean, f"acc_std.{net}": 100 * res.std})
            out["nets"][net] = {"mean": round(100 * res.mean, 2), "std": round(100 * res.std, 2),
                                "accs": [round(100 * a, 2) for a in res.accs]}
        _write_json(metrics, out)
        store.clear()  # the cell is done and its metrics are kept
    for net, r in out["nets"].items():
        console.log(f"{DISPLAY_NAMES.get(net, net):>10}: {r['mean']:.2f} ± {r['std']:.2f} %")


@app.command()
@_user_errors
def report(
    metrics_dir: Annotated[Path, typer.Option(help="Directory of evaluate metrics JSON files.")] = Path("metrics/evaluate"),
    out: Annotated[Path | None, typer.Option(help="Write the table as Markdown here too.")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
) -> None:
    """Print the cross-architecture table (ours beside the paper's where the setting matches)."""
    from rich.console import Console

    from moedd.report import collect, protocol_line, render_markdown, render_table, run_metrics

    params = _params(params_path, sets)
    rows = collect(sorted(metrics_dir.glob("*.json")))
    if not rows:
        raise ConfigError(f"no evaluation metrics in {metrics_dir}; run `moedd evaluate` (or `dvc repro`) first")
    Console(width=max(console.width, 160)).print(render_table(rows))
    typer.echo(protocol_line(rows))
    md = render_markdown(rows)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
    try:
        from mlflow.tracking import MlflowClient

        from moedd.tracking import parent_run_id

        from mlflow.entities import Metric

        parent, now = parent_run_id(params), int(time.time() * 1000)
        MlflowClient().log_text(parent, md, "report/table.md")
        # every cell on the parent run: DVC skips cached stages, the report sees them all
        MlflowClient().log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in run_metrics(rows).items()])
    except Exception as err:  # the table is printed either way; MLflow is a bonus here
        console.log(f"could not log the report to MLflow: {err}")


@app.command()
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


@app.command(name="list")
def list_components() -> None:
    """List the registered experts, networks and dataset sources."""
    from moedd.data import SOURCES
    from moedd.experts import EXPERTS
    from moedd.nets import list_nets

    typer.echo(f"experts:  {', '.join(EXPERTS.names())}")
    typer.echo(f"networks: {', '.join(list_nets())}")
    typer.echo(f"sources:  {', '.join(SOURCES.names())}")


def run() -> None:
    """Console-script entry point: set up the process, then run the Typer app."""
    from moedd.device import tune_process

    tune_process()
    app()
