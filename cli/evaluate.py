"""The evaluate stage: train every evaluation network on the fused synthetic set, test on real data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moedd.config import flatten
from moedd.nets import DISPLAY_NAMES

from ._common import CheckpointOpt, ParamsOpt, SetOpt, _checkpoints, _csv_list, _params, _user_errors, _write_json
from .progress import bars, console


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

    Finished (network, seed) units are kept and the unit in training is checkpointed every
    evaluate.checkpoint_every epochs under --checkpoint-dir/evaluate (keyed by the set, protocol and
    test data), so the same command after an interruption continues there. Under `torchrun
    --nproc-per-node N` the units are shared over the N ranks; rank 0 tracks and writes the metrics."""
    from moedd.data import load_prepared
    from moedd.device import resolve_device
    from moedd.distributed import ranks_from_env
    from moedd.synthetic import load_synthetic

    params = _params(params_path, sets, **{
        "evaluate.nets": _csv_list(nets), "evaluate.seeds": _csv_list(seeds, int),
        "evaluate.epochs": epochs, "fusion.kind": fusion, "evaluate.device": device,
    })
    syn, prep, dev = load_synthetic(synthetic), load_prepared(prepared), resolve_device(params.evaluate.device)
    _check(syn, prep, params)
    ranks = ranks_from_env()
    dev = ranks.device(dev) if ranks else dev
    cell_dir = (_checkpoints(checkpoint_dir) / "evaluate", f"{syn.method}-{syn.meta.ipc}x{syn.meta.noe}")
    if ranks is not None and not ranks.main:  # its share of the units; rank 0 tracks and writes
        _train(syn, prep, params, dev, _store(syn, prep, params, cell_dir), None, ranks)
        return
    _say(_tracked(synthetic, prepared, metrics, syn, prep, params, dev, cell_dir, ranks))


def _store(syn: Any, prep: Any, params: Any, cell_dir: tuple[Path, str]) -> Any:
    from moedd.evaluate import EvaluationCheckpoints

    return EvaluationCheckpoints.for_cell(*cell_dir, syn, prep.test_images, prep.test_labels, params.evaluate,
                                          params.fusion)


def _tracked(synthetic: Path, prepared: Path, metrics: Path | None, syn: Any, prep: Any, params: Any, dev: Any,
             cell_dir: tuple[Path, str], ranks: Any) -> dict[str, Any]:
    """The evaluation inside its MLflow stage run (rank 0 of a launch): every unit's run, the
    metrics JSON; the checkpoints cleared once the metrics are kept. Returns the summary."""
    from moedd.evaluate import fusion_effective
    from moedd.tracking import EvaluationRuns, cell_tags, stage_run

    m, cfg, fused, method = syn.meta, params.evaluate, fusion_effective(syn, params.fusion), syn.method
    protocol = _protocol(syn, params, fused)
    cell = cell_tags(method, m.budget, m.ipc, m.noe, prep.name, prep.paper)
    name = f"evaluate {method} {cell['dataset']} b{m.budget} {cell['config']}"
    with stage_run(params, name, {"expert": method, "noe": m.noe, "ipc": m.ipc, "budget": m.budget, **protocol},
                   {"stage": "evaluate", "expert": method, **cell}) as run:
        ranked = f", {ranks.world} ranks" if ranks else ""
        console.log(f"{name}: {len(cfg.nets)} nets x {len(cfg.seeds)} seeds x {cfg.epochs} epochs, fusion {fused}, "
                    f"device {dev}{ranked}, MLflow run {run.info.run_id[:8]}")
        _log_inputs(synthetic, prepared, syn, prep)
        store = _store(syn, prep, params, cell_dir)
        for other in store.others():
            console.log(f"ignoring {other}: evaluation checkpoints of another protocol, set or test data")
        with EvaluationRuns(run.info.run_id, cell, {"expert": method, "noe": m.noe, "ipc": m.ipc},
                            DISPLAY_NAMES) as runs:
            results = _train(syn, prep, params, dev, store, runs, ranks)
            runs.finish(results)
        _write_json(metrics, out := _summary(syn, prep, params, fused, results))
        store.clear()  # the cell is done and its metrics are kept
    return out


def _check(syn: Any, prep: Any, params: Any) -> None:
    """Before any tracking or training: the set fits the data, every network fits the images."""
    from moedd.evaluate import check_nets_fit
    from moedd.synthetic import check_matches

    check_matches(syn, prep.classes, prep.image_shape, prep.digest)
    for note in check_nets_fit(params.evaluate.nets, prep.num_classes, prep.image_shape):
        console.print(f"note: {note}", soft_wrap=True)


def _log_inputs(synthetic: Path, prepared: Path, syn: Any, prep: Any) -> None:
    """The set and the prepared data as the stage run's inputs (lineage)."""
    from moedd.tracking import log_input

    m = syn.meta
    log_input(synthetic, f"synthetic-{syn.method}-noe{m.noe}", "synthetic", ",".join(x.sha256[:16] for x in syn.metas))
    log_input(prepared, "prepared", "data", prep.digest)


def _say(out: dict[str, Any]) -> None:
    """One console line per network: mean ± std."""
    for net, r in out["nets"].items():
        spread = f" ± {r['std']:.2f}" if len(r["accs"]) > 1 else ""  # one seed has no spread
        console.log(f"{DISPLAY_NAMES.get(net, net):>10}: {r['mean']:.2f}{spread} % (n={len(r['accs'])})")


def _protocol(syn: Any, params: Any, fused: str) -> dict[str, Any]:
    """The evaluation protocol as the stage run's params: settings, fusion, the learning rate used
    and where it came from, the common input space, each expert's decoding and space."""
    from moedd.evaluate import common_space, training_lr

    cfg = params.evaluate
    lr, source = training_lr(syn, cfg.lr)
    return {**flatten(cfg, "evaluate."), **flatten(params.fusion, "fusion."), "fusion.effective": fused, "scale": params.scale,
            "lr_used": lr, "lr_source": source, "space": common_space(syn),
            "decoding": ",".join(dict.fromkeys(x.decoding for x in syn.metas)),
            "expert_spaces": ",".join(syn.spaces), "soft_labels": syn.soft is not None}


def _summary(syn: Any, prep: Any, params: Any, fused: str, results: dict[str, Any]) -> dict[str, Any]:
    """The cell's metrics JSON (what `moedd report` reads): the cell, its ablation settings (the
    diversity term of its distillation, the fusion of its evaluation), its scale and accuracies."""
    from moedd.data.identity import PAPER_KEYS

    m, cfg = syn.meta, params.evaluate
    # the diversity term acted only where images were optimised by several experts (not random/herding)
    distill = m.config.get("distill", {}) if any(x.iterations > 0 for x in syn.metas) and m.noe > 1 else {}
    return {"method": syn.method, "noe": m.noe, "ipc": m.ipc, "budget": m.budget, "dataset": prep.name,
            "classes": len(prep.classes), "paper_dataset": PAPER_KEYS.get(prep.paper or ""),
            "fusion": fused, "epochs": cfg.epochs, "seeds": cfg.seeds, "scale": params.scale,
            "distill_scale": m.config.get("scale", "paper"), "dcor_weight": distill.get("dcor_weight"),
            "dcor_estimator": distill.get("dcor_estimator", "v_statistic" if distill else None),
            "nets": {net: {"mean": round(100 * r.mean, 2), "std": round(100 * r.std, 2),
                           "accs": [round(100 * a, 2) for a in r.accs]} for net, r in results.items()}}


def _train(syn: Any, prep: Any, params: Any, dev: Any, store: Any, runs: Any, ranks: Any = None) -> dict[str, Any]:
    """Every (network, seed) unit (this rank's share under torchrun), with one progress bar per
    network; resumes from ``store``; each unit's curve and accuracy go to ``runs`` (a
    ``moedd.tracking.EvaluationRuns``; None on ranks other than 0) as it finishes."""
    import mlflow

    from moedd.evaluate import evaluate_synthetic

    cfg = params.evaluate
    per_net = len(cfg.seeds) * cfg.epochs
    with bars() as b:
        for net in cfg.nets:
            b.add(DISPLAY_NAMES.get(net, net), per_net)
        accs: dict[str, list[float]] = {n: [] for n in cfg.nets}
        trained: set[tuple[str, int]] = set()

        epochs_done: dict[tuple[str, int], int] = {}

        def on_epoch(net: str, seed: int, epoch: int) -> None:
            trained.add((net, seed))
            epochs_done[(net, seed)] = epoch  # the bar counts every seed's epochs (seeds may train together)
            done = accs[net]
            status = f"seed {seed}" + (f", acc {100 * sum(done) / len(done):.2f}%" if done else "")
            b.update(DISPLAY_NAMES.get(net, net), sum(e for (n, _), e in epochs_done.items() if n == net), status)

        def on_result(net: str, seed: int, acc: float) -> None:
            accs[net].append(acc)
            if runs is not None:
                runs.unit(net, seed, acc)
            if (net, seed) not in trained:  # restored as finished: move the bar past it
                on_epoch(net, seed, cfg.epochs)

        def on_resume(net: str, seed: int, epoch: int, done: int) -> None:
            what = f"resumed {net} seed {seed} at epoch {epoch}/{cfg.epochs}; {done} units done"
            console.log(f"{what} (checkpoints {store.dir})")
            mlflow.set_tag("moedd.resumed", what)

        return evaluate_synthetic(syn, prep.test_images, prep.test_labels, cfg, params.fusion, dev, on_result,
                                  on_epoch, store, on_resume, runs.curve if runs is not None else None, ranks)
