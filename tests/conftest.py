"""Shared fixtures: tiny generated image data (no downloads) and an isolated MLflow store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinydata import make_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder with 3 classes, 24 train / 8 test 32x32 PNGs per class."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "folder")


@pytest.fixture(scope="session")
def tiny_prepared(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny folder through the real imagefolder source and prepared store."""
    from moedd.data import load_prepared, load_source, save_prepared

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    save_prepared(load_source("imagefolder", tiny_folder), out)
    return load_prepared(out)


@pytest.fixture()
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for one test (never the repo's own)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return uri


def tiny_params(**overrides):
    """Validated params at test size; dotted-key overrides."""
    from moedd.config import load_params

    base = {
        "distill.budget": 4, "distill.log_every": 1, "distill.checkpoint_every": 2,
        "experts.dm.iterations": 3, "experts.dm.batch_real": 8,
        "experts.idc.iterations": 2, "experts.idc.inner_loop": 2, "experts.idc.batch_real": 4,
        "experts.idc.n_data": 16,
        "experts.idm.iterations": 2, "experts.idm.batch_real": 4, "experts.idm.trained_bs": 16,
        "experts.idm.model_train_steps": 1,
        "evaluate.nets": ["convnet3"], "evaluate.seeds": [0, 1], "evaluate.epochs": 3,
        "evaluate.test_batch_size": 64,
    }
    base.update(overrides)
    return load_params(None, base)


class Interrupt(Exception):
    """Raised from a progress callback to simulate an interrupted run."""


def interrupt_at(n: int):
    """An ``on_log`` callback that interrupts the run once ``n`` iterations are done."""

    def on_log(done: int, total: int, rows: list) -> None:
        if done == n:
            raise Interrupt

    return on_log


def interrupted_then_resumed(name: str, params, prepared, partition, ckdir: Path, stop_at: int, **kw):
    """Run ``name`` until ``stop_at`` (interrupted), check one checkpoint survived, resume; return the result.
    ``kw`` goes to ``run_distillation`` (e.g. ``trajectories`` for MTT)."""
    import torch

    from moedd.distill import run_distillation

    cpu = torch.device("cpu")
    with pytest.raises(Interrupt):
        run_distillation(name, params, prepared, partition, cpu, checkpoint_dir=ckdir, on_log=interrupt_at(stop_at), **kw)
    assert len(list(ckdir.glob("*.pt"))) == 1
    return run_distillation(name, params, prepared, partition, cpu, checkpoint_dir=ckdir, **kw)
