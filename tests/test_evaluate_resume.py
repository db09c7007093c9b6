"""Evaluation resumes: an interrupted (network, seed) unit continues from its checkpoint, finished
units are kept, and the accuracies equal those of an uninterrupted run (CPU, same seeds)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import Interrupt, tiny_params
from moedd.data import make_partition
from moedd.distill import run_distillation
from moedd.evaluate import (
    EvaluationCheckpoints,
    UnitCheckpointMismatch,
    evaluate_synthetic,
    fingerprint_contents,
    pool_experts,
    train_network,
)
from moedd.synthetic import SyntheticSet

CPU = torch.device("cpu")


def _syn(prepared, noe: int = 2) -> SyntheticSet:
    """A tiny two-expert set (random real images): mixup fusion is active, so all three generators are used."""
    params = tiny_params(**{"distill.budget": 4})
    part = make_partition(prepared.train_labels, 3, noe, 0, prepared.digest)
    r = run_distillation("random", params, prepared, part, CPU)
    return SyntheticSet(list(r.images), [r.labels] * noe, r.metas)


def test_train_network_resumed_from_a_checkpoint_ends_bitwise_equal(tiny_prepared) -> None:
    """Network, optimiser (momentum, decayed lr) and every generator are restored: resuming from the
    state before and after the lr decay (at epoch 2 of 4) gives exactly the uninterrupted weights."""
    syn = _syn(tiny_prepared)
    cfg = tiny_params(**{"evaluate.epochs": 4, "evaluate.checkpoint_every": 1, "evaluate.batch_size": 8}).evaluate
    fusion = tiny_params().fusion
    data = pool_experts(syn, cfg.lr, CPU)
    states: list[dict] = []
    full = train_network("convnet3", data, cfg, fusion, 1, 3, checkpoint=lambda s: states.append(copy.deepcopy(s)))
    assert [s["epoch"] for s in states] == [1, 2, 3]  # not after the last epoch
    for state in (states[0], states[2]):
        resumed = train_network("convnet3", data, cfg, fusion, 1, 3, resume=state)
        for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), (state["epoch"], k)


def test_interrupted_evaluation_resumes_with_equal_accuracies(tiny_prepared, tmp_path: Path) -> None:
    syn = _syn(tiny_prepared)
    # a small lr keeps the accuracies off 100 %, so that a wrong resume would show in them
    params = tiny_params(**{"evaluate.seeds": [0, 1], "evaluate.epochs": 4, "evaluate.checkpoint_every": 2,
                            "evaluate.lr": 0.001})
    cfg, fusion = params.evaluate, params.fusion
    x, y = tiny_prepared.test_images, tiny_prepared.test_labels
    full = evaluate_synthetic(syn, x, y, cfg, fusion, CPU)
    assert max(full["convnet3"].accs) < 1.0, "saturated accuracies cannot tell a wrong resume apart"

    store = EvaluationCheckpoints.for_cell(tmp_path, "random-2x2", syn, x, y, cfg, fusion)

    def interrupt(net: str, seed: int, epoch: int) -> None:
        if (seed, epoch) == (1, 3):  # the second unit, after its first checkpoint (epoch 2)
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_synthetic(syn, x, y, cfg, fusion, CPU, on_epoch=interrupt, checkpoints=store)
    assert sorted(p.name for p in store.dir.iterdir()) == ["convnet3-seed0.json", "convnet3-seed1.pt", "fingerprint.json"]

    epochs: dict[int, list[int]] = {0: [], 1: []}
    resumes, results = [], []
    res = evaluate_synthetic(
        syn, x, y, cfg, fusion, CPU, checkpoints=store,
        on_epoch=lambda n, s, e: epochs[s].append(e), on_result=lambda n, s, a: results.append((s, a)),
        on_resume=lambda *a: resumes.append(a),
    )
    assert resumes == [("convnet3", 1, 2, 1)]  # seed 1 continues at epoch 2, after 1 restored unit
    assert epochs == {0: [], 1: [3, 4]}  # seed 0 skipped, seed 1 resumed at its checkpoint
    assert [s for s, _ in results] == [0, 1]  # every unit reported once, restored ones too
    assert res["convnet3"].accs == full["convnet3"].accs  # exactly
    assert [a for _, a in results] == full["convnet3"].accs
    assert not list(store.dir.glob("*.pt"))  # the finished unit's training state is dropped
    store.clear()
    assert not store.dir.exists()


def test_fingerprint_ignores_speed_only_knobs_and_a_tampered_file_is_refused(tiny_prepared, tmp_path: Path) -> None:
    syn = _syn(tiny_prepared)
    x, y = tiny_prepared.test_images, tiny_prepared.test_labels
    base = tiny_params()

    def store(**over) -> EvaluationCheckpoints:
        p = tiny_params(**over)
        return EvaluationCheckpoints.for_cell(tmp_path, "random-2x2", syn, x, y, p.evaluate, p.fusion)

    a = store()
    assert a.fingerprint == store(**{"evaluate.test_batch_size": 7, "evaluate.checkpoint_every": 1,
                                     "evaluate.device": "cpu"}).fingerprint
    for change in ({"evaluate.epochs": 4}, {"evaluate.lr": 0.02}, {"evaluate.seeds": [0]}, {"fusion.kind": "none"},
                   {"evaluate.batch_size": 8}):
        assert store(**change).fingerprint != a.fingerprint, change
    other_test = EvaluationCheckpoints.for_cell(tmp_path, "random-2x2", syn, x, (y + 1) % 3, base.evaluate, base.fusion)
    assert other_test.fingerprint != a.fingerprint
    contents = fingerprint_contents(syn, x, y, base.evaluate, base.fusion)
    assert {"device", "test_batch_size", "checkpoint_every"}.isdisjoint(contents["evaluate"])

    b = store(**{"evaluate.epochs": 4})
    b.dir.mkdir(parents=True)
    a.dir.mkdir(parents=True)
    assert a.others() == [b.dir]  # another protocol's state is listed (to say it is ignored), not used
    (a.dir / "convnet3-seed0.json").write_text(json.dumps({"fingerprint": b.fingerprint, "net": "convnet3",
                                                           "seed": 0, "acc": 1.0, "seconds": 0.0}))
    with pytest.raises(UnitCheckpointMismatch, match="belongs to other inputs"):
        a.finished("convnet3", 0)


def _cell(tmp_path: Path, tiny_folder: Path, uri: str, epochs: int) -> list[str]:
    """Prepared store, synthetic set and params.yaml in ``tmp_path``; returns the evaluate arguments."""
    from moedd.data import load_source, save_prepared
    from moedd.data import load_prepared as load
    from moedd.synthetic import save_synthetic

    save_prepared(load_source("imagefolder", tiny_folder), tmp_path / "prepared")
    prep = load(tmp_path / "prepared")
    params = tiny_params(**{"distill.budget": 4})
    part = make_partition(prep.train_labels, 3, 2, 0, prep.digest)
    r = run_distillation("random", params, prep, part, CPU)
    save_synthetic(tmp_path / "syn", list(r.images), [r.labels] * 2, r.metas)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"nets": ["convnet3"], "seeds": [0, 1], "epochs": epochs, "checkpoint_every": 1,
                     "lr": 0.0003, "test_batch_size": 64, "device": "cpu"},  # small lr: accuracies off 100 %
        "mlflow": {"tracking_uri": uri},
    }))
    return ["evaluate", "--synthetic", str(tmp_path / "syn"), "--prepared", str(tmp_path / "prepared")]


def test_killed_evaluate_process_resumes_to_the_same_metrics(tiny_folder: Path, tmp_path: Path, mlflow_uri: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`kill -9` of a real `moedd evaluate` after its first unit checkpoint; the same command again
    resumes and writes exactly the metrics of an uninterrupted run."""
    from moedd.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOEDD_CHECKPOINT_DIR", raising=False)
    args = _cell(tmp_path, tiny_folder, mlflow_uri, epochs=8)
    ref = CliRunner().invoke(app, [*args, "--metrics", "ref.json", "--checkpoint-dir", str(tmp_path / "ref-ck")])
    assert ref.exit_code == 0, ref.output
    assert not list((tmp_path / "ref-ck").rglob("*.pt"))

    ckdir = tmp_path / ".moedd/checkpoints/evaluate"  # the default: $DVC_ROOT/.moedd/checkpoints/evaluate
    cmd = [str(Path(sys.executable).with_name("moedd")), *args, "--metrics", "resumed.json"]
    env = os.environ.copy()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(ckdir.rglob("*.pt")):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"moedd evaluate ended (rc {proc.returncode}) before its first checkpoint could be killed:\n{out}")
        assert time.monotonic() < deadline, "no evaluate checkpoint appeared within 120 s"
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("moedd evaluate finished before the kill; give it more epochs")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not Path("resumed.json").exists() and list(ckdir.rglob("*.pt"))

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    resumed = re.search(r"resumed convnet3 seed (\d)\s+at\s+epoch\s+(\d+)/8;\s+(\d)\s+units\s+done", out)
    assert resumed, out
    assert int(resumed[2]) > 0 or int(resumed[3]) > 0, out  # continued, not restarted
    got, want = json.loads(Path("resumed.json").read_text()), json.loads(Path("ref.json").read_text())
    assert max(want["nets"]["convnet3"]["accs"]) < 100.0, "saturated accuracies cannot tell a wrong resume apart"
    assert got["nets"] == want["nets"]  # accuracies (and mean, std) equal
    assert not any(ckdir.iterdir())  # removed once the metrics were written
