"""Shared fixtures: tiny generated image data (no downloads) and an isolated MLflow store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    """Validated params at test size (every expert at the ``smoke`` sizes it declares); dotted-key
    overrides."""
    from moedd.experts import EXPERTS
    from moedd.params import load_params

    base = {
        "distill.budget": 4, "distill.log_every": 1, "distill.checkpoint_every": 2,
        "distill.dcor_estimator": "v_statistic",  # IPC < 4 per expert at test sizes (test_moe.py: the bias-corrected one)
        **{f"experts.{name}.{key}": value for name in EXPERTS for key, value in EXPERTS.get(name).scales.get("smoke", {}).items()},
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


class DeviceReadBacks(TorchDispatchMode):
    """Counts reads of device values into host scalars (``.item()``, ``int(t)``): on a GPU each
    one stalls the host until the queued kernels have run.

    The test runs on the CPU, where host and device tensors look alike, so the host side is
    traced: a tensor drawn with a generator that is not one of the run's device generators
    (``DistillContext.generator``; told apart by seed, as dispatch hands over a fresh Python
    wrapper of the generator) is a host draw, and reading it back is free."""

    def __init__(self, device_seeds: set[int]) -> None:
        super().__init__()
        self.device_seeds = device_seeds
        self.host: list[torch.Tensor] = []  # kept alive, so their storage addresses stay theirs
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and not any(
                args[0].data_ptr() == t.data_ptr() for t in self.host):
            self.count += 1
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None and gen.initial_seed() not in self.device_seeds and isinstance(out, torch.Tensor):
            self.host.append(out)
        return out


def device_read_backs(monkeypatch: pytest.MonkeyPatch) -> DeviceReadBacks:
    """A :class:`DeviceReadBacks` that knows the device generators the run creates from now on
    (``DistillContext.generator`` is wrapped to record their seeds); use it as a context manager."""
    from moedd.experts.base import DistillContext

    seeds: set[int] = set()
    original = DistillContext.generator

    def recording(self: DistillContext, it: int, stream: int = 0) -> torch.Generator:
        gen = original(self, it, stream)
        seeds.add(gen.initial_seed())
        return gen

    monkeypatch.setattr(DistillContext, "generator", recording)
    return DeviceReadBacks(seeds)


class CaptureBlockers(TorchDispatchMode):
    """Records ops that a CUDA graph cannot capture, as a CPU proxy for code meant to be captured:
    reads of values into host scalars (``.item()``, ``int(t)``, ``bool(t)``), ops whose output
    size depends on values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``)
    and tensors made from host data (``torch.tensor(list)``, copied to the device each call)."""

    BLOCKING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.lift_fresh",
                "aten._unique", "aten.unique", "aten.bincount")
    """(``bincount`` sizes its output by the largest value: a read-back on CUDA. ``Tensor.tolist``
    is not dispatched on the CPU, so it is not seen here; it comes with a ``bincount`` in moedd.)"""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        if name.startswith(self.BLOCKING):
            self.found.append(name)
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.found.append("boolean-mask indexing")
        return func(*args, **(kwargs or {}))
