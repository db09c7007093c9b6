"""Checkpoints: an interrupted run resumes and ends with exactly the uninterrupted images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import Interrupt, interrupt_at, interrupted_then_resumed, tiny_params
from moedd.data import make_partition
from moedd.distill import CheckpointMismatch, run_distillation

CPU = torch.device("cpu")


def test_resume_equals_uninterrupted(tiny_prepared, tmp_path: Path) -> None:
    params = tiny_params(**{"experts.dm.iterations": 6, "distill.checkpoint_every": 2, "distill.log_every": 1})
    part = make_partition(tiny_prepared.train_labels, 3, 2, 0, tiny_prepared.digest)
    full = run_distillation("dm", params, tiny_prepared, part, CPU, checkpoint_dir=None)

    ckdir = tmp_path / "ck"
    resumed = interrupted_then_resumed("dm", params, tiny_prepared, part, ckdir, stop_at=3)
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    assert [r["step"] for r in resumed.history] == [float(i) for i in range(6)]
    assert not list(ckdir.glob("*.pt"))  # cleaned up after success


def test_checkpoint_of_other_inputs_is_refused(tiny_prepared, tmp_path: Path) -> None:
    params = tiny_params(**{"experts.dm.iterations": 4, "distill.checkpoint_every": 2})
    part = make_partition(tiny_prepared.train_labels, 3, 2, 0, tiny_prepared.digest)

    with pytest.raises(Interrupt):
        run_distillation("dm", params, tiny_prepared, part, CPU, checkpoint_dir=tmp_path, on_log=interrupt_at(3))
    ck = next(tmp_path.glob("*.pt"))
    other = tiny_params(**{"experts.dm.iterations": 4, "distill.checkpoint_every": 2, "experts.dm.lr_img": 3.0})
    state = torch.load(ck, weights_only=True)
    # a checkpoint file that claims the new fingerprint's name but holds other inputs
    from moedd.distill import fingerprint, plan_run

    fp = fingerprint(plan_run("dm", other, tiny_prepared, part), other, tiny_prepared, part)
    torch.save(state, tmp_path / f"dm-noe2-{fp}.pt")
    with pytest.raises(CheckpointMismatch, match="belongs to other inputs"):
        run_distillation("dm", other, tiny_prepared, part, CPU, checkpoint_dir=tmp_path)
