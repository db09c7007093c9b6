"""The full_data stage: one network trained on the whole real training set (the report's reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moedd.config import flatten
from moedd.nets import DISPLAY_NAMES

from ._common import CheckpointOpt, ParamsOpt, SetOpt, _checkpoints, _params, _user_errors, _write_json
from .progress import bars, console


@_user_errors
def full_data(
    net: Annotated[str, typer.Option(help="Network to train (a registered name, e.g. convnet3).")],
    prepared: Annotated[Path, typer.Option(help="Prepared store (train and test splits).")] = Path("data/prepared"),
    metrics: Annotated[Path | None, typer.Option(help="Metrics JSON (for DVC and `moedd report`).")] = None,
    params_path: ParamsOpt = None,
    sets: SetOpt = None,
    checkpoint_dir: CheckpointOpt = None,
) -> None:
    """Train NET on the whole real training set with the evaluation protocol and full_data's epochs
    and seeds: the full-data reference beside every cell of the report (resumable per epoch)."""
    import mlflow

    from moedd.data import load_prepared
    from moedd.data.identity import PAPER_KEYS, dataset_label
    from moedd.device import resolve_device
    from moedd.evaluate import check_nets_fit
    from moedd.reference import checkpoints_for, protocol
    from moedd.tracking import stage_run

    params = _params(params_path, sets)
    prep = load_prepared(prepared)
    check_nets_fit([net], prep.num_classes, prep.image_shape)  # also refuses an unknown name, in one line
    cfg, dev = protocol(params.evaluate, params.full_data, net), resolve_device(params.evaluate.device)
    label = dataset_label(prep.name, prep.paper)
    store = checkpoints_for(_checkpoints(checkpoint_dir) / "full", prep, cfg)
    name = f"full-data {DISPLAY_NAMES.get(net, net)} {label}"
    with stage_run(params, name, {"net": net, "scale": params.scale, "images": len(prep.train_labels),
                                  **flatten(cfg, "evaluate.")},
                   {"stage": "full_data", "dataset": label, "net": net, "method": "full"}):
        console.log(f"{name}: {len(prep.train_labels)} images x {cfg.epochs} epochs x {len(cfg.seeds)} seeds, device {dev}")
        result = _train(prep, cfg, dev, store)
        mlflow.log_metrics({"acc_mean": 100 * result.mean, "acc_std": 100 * result.std, "seconds": result.seconds})
        out = {"net": net, "dataset": prep.name, "paper_dataset": PAPER_KEYS.get(prep.paper or ""),
               "images": len(prep.train_labels), "epochs": cfg.epochs, "seeds": cfg.seeds, "scale": params.scale,
               "mean": round(100 * result.mean, 2), "std": round(100 * result.std, 2),
               "accs": [round(100 * a, 2) for a in result.accs]}
        _write_json(metrics, out)
        store.clear()
    console.log(f"{name}: {out['mean']:.2f} % (n={len(out['accs'])})")


def _train(prep: Any, cfg: Any, dev: Any, store: Any) -> Any:
    """The reference's units with a progress bar (one step per epoch); resumes from ``store``."""
    import mlflow

    from moedd.reference import train_full_data

    net = cfg.nets[0]
    with bars() as b:
        b.add(DISPLAY_NAMES.get(net, net), len(cfg.seeds) * cfg.epochs)

        def on_epoch(_net: str, seed: int, epoch: int) -> None:
            b.update(DISPLAY_NAMES.get(net, net), cfg.seeds.index(seed) * cfg.epochs + epoch, f"seed {seed}")

        def on_result(_net: str, seed: int, acc: float) -> None:
            mlflow.log_metric(f"test_acc.seed{seed}", 100 * acc)
            on_epoch(net, seed, cfg.epochs)

        def on_resume(_net: str, seed: int, epoch: int, done: int) -> None:
            console.log(f"resumed {net} seed {seed} at epoch {epoch}/{cfg.epochs}; {done} units done (checkpoints {store.dir})")

        def on_curve(_net: str, seed: int, epoch: int, acc: float, loss: float) -> None:
            mlflow.log_metrics({f"train_acc.seed{seed}": 100 * acc, f"train_loss.seed{seed}": loss}, step=epoch)

        return train_full_data(prep, cfg, dev, store, on_result, on_epoch, on_resume, on_curve)
