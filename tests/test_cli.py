"""The Typer CLI: the stage commands on tiny data, MLflow runs, one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moedd.cli.main import app

runner = CliRunner()


def _params_file(tmp_path: Path, folder: Path, uri: str) -> Path:
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": str(folder)},
        "distill": {"budget": 8, "log_every": 1},  # IPC 4 x NoE 2: the default (bias-corrected) dCor runs
        "experts": {"dm": {"iterations": 2, "batch_real": 8}},
        "evaluate": {"nets": ["convnet3", "alexnet"], "seeds": [0, 1], "epochs": 2, "test_batch_size": 64},
        "full_data": {"epochs": 2},
        "mlflow": {"tracking_uri": uri},
    }))
    return f


def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_stage_commands_end_to_end(tiny_folder: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path, tiny_folder, mlflow_uri)
    _ok(["prepare", "--out", "data/prepared"])
    _ok(["partition", "--noe", "2"])
    assert Path("data/partitions/noe2.pt").exists()
    _ok(["distill", "--expert", "dm", "--noe", "2", "--metrics", "m/d.json", "--plots", "p/d.csv"])
    summary = json.loads(Path("m/d.json").read_text())
    assert summary["ipc"] == 4 and summary["noe"] == 2 and summary["iterations"] == 2 and summary["dcor"] >= 0
    assert Path("p/d.csv").read_text().splitlines()[0] == "step,loss,match,dcor"
    _ok(["evaluate", "--synthetic", "data/synthetic/dm-noe2", "--metrics", "metrics/evaluate/dm-noe2.json"])
    ev = json.loads(Path("metrics/evaluate/dm-noe2.json").read_text())
    assert set(ev["nets"]) == {"convnet3", "alexnet"} and len(ev["nets"]["convnet3"]["accs"]) == 2
    assert ev["fusion"] == "mixup"
    _ok(["full-data", "--net", "convnet3", "--metrics", "metrics/full/convnet3.json"])
    full = json.loads(Path("metrics/full/convnet3.json").read_text())
    assert full["images"] == 72 and full["epochs"] == 2 and len(full["accs"]) == 1 and 0 <= full["mean"] <= 100
    out = _ok(["report", "--out", "reports/table.md"]).output
    assert "ConvNet-3" in out and "4x2" in out
    assert "| DM | AlexNet |" in Path("reports/table.md").read_text()
    assert "Full real training set (72 images): ConvNet-3" in Path("reports/table.md").read_text()
    shown = _ok(["show", "data/synthetic/dm-noe2", "--out", "grids"]).output
    assert "expert-1.png" in shown and Path("grids/expert-0.png").stat().st_size > 0

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
    names = {r.info.run_name for r in runs}
    assert {"distill dm folder b8 4x2", "evaluate dm folder b8 4x2", "expert 0", "expert 1", "ConvNet-3", "AlexNet"} <= names
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == 1  # one pipeline run holds everything
    distill_run = next(r for r in runs if r.info.run_name == "distill dm folder b8 4x2")
    assert distill_run.data.tags["mlflow.parentRunId"] in parents
    assert "git_commit" in distill_run.data.tags and distill_run.data.params["ipc"] == "4"
    history = mlflow.MlflowClient().get_metric_history(distill_run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1]
    expert0 = next(r for r in runs if r.info.run_name == "expert 0")
    assert expert0.data.tags["mlflow.parentRunId"] == distill_run.info.run_id
    arts = [a.path for a in mlflow.MlflowClient().list_artifacts(expert0.info.run_id, "grids")]
    assert arts == ["grids/expert-0.png"]
    evaluate_run = next(r for r in runs if r.info.run_name == "evaluate dm folder b8 4x2")
    assert "acc_mean.convnet3" in evaluate_run.data.metrics
    assert evaluate_run.inputs.dataset_inputs  # lineage: synthetic set + prepared data
    cell = {"dataset": "folder", "budget": "8", "config": "4x2", "method": "dm"}
    assert cell.items() <= evaluate_run.data.tags.items() and cell.items() <= distill_run.data.tags.items()
    alexnet = next(r for r in runs if r.info.run_name == "AlexNet")
    assert alexnet.data.tags["mlflow.parentRunId"] == evaluate_run.info.run_id
    assert {**cell, "net": "alexnet"}.items() <= alexnet.data.tags.items()
    seeds = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == alexnet.info.run_id}
    assert set(seeds) == {"AlexNet seed 0", "AlexNet seed 1"}
    seed1 = seeds["AlexNet seed 1"]
    curve = mlflow.MlflowClient().get_metric_history(seed1.info.run_id, "train_acc")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [1, 2]  # one point per epoch
    assert all(0 <= m.value <= 100 for m in curve)
    assert abs(seed1.data.metrics["test_acc"] - ev["nets"]["alexnet"]["accs"][1]) <= 0.005  # the JSON's, to its 2 places
    assert seed1.data.tags["seed"] == "1" and {"train_loss", "test_acc"} <= set(seed1.data.metrics)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["distill", "--expert", "dm", "--noe", "3"], "not divisible by NoE=3"),
        (["distill", "--expert", "gm", "--noe", "2"], "unknown expert 'gm'"),
        (["distill", "--expert", "dm", "--noe", "2", "-S", "experts.dm.iterations=-5"], "experts.dm.iterations"),
        (["distill", "--expert", "dm", "--noe", "2", "--budget", "40"], "larger than the smallest class"),
        (["evaluate", "--synthetic", "nowhere"], "no synthetic set"),
        (["evaluate", "--synthetic", "x", "--nets", "convnet3,lenet9"], "unknown network 'lenet9'"),
        (["partition", "--noe", "2", "--prepared", "missing"], "run `moedd prepare` first"),
        (["distill", "--expert", "random", "--noe", "2", "--plots", "p.csv"], "random selects real images"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(
    args: list[str], fragment: str, tiny_folder: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path, tiny_folder, mlflow_uri)
    if args[0] == "distill":
        _ok(["prepare", "--out", "data/prepared"])
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0]
    assert result.output.rstrip().endswith(errors[0].rstrip())  # the error is the last word


def test_missing_default_params_yaml_means_defaults_and_says_so(tmp_path: Path, mlflow_uri: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --params and without params.yaml the built-in defaults are used, and the first line
    says so; the same file named explicitly is an error (see tests/test_bad_inputs.py)."""
    monkeypatch.chdir(tmp_path)
    result = _ok(["init"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "params.yaml not found: using the built-in defaults" in lines[0]
    assert "experiment 'moedd'" in result.output
    missing = runner.invoke(app, ["init", "--params", "params.yaml"])
    assert missing.exit_code == 1 and missing.output.strip() == "error: params file params.yaml not found"


def test_list_shows_registries() -> None:
    out = _ok(["list"]).output
    assert "dm" in out and "resnet18" in out and "imagefolder" in out


def test_interrupted_distill_closes_its_mlflow_runs(tiny_folder: Path, tmp_path: Path, mlflow_uri: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (SIGINT) in the middle of `moedd distill`: the stage run and the per-expert runs end
    KILLED/FAILED instead of staying RUNNING in the MLflow UI, and a checkpoint is left to resume from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    monkeypatch.chdir(tmp_path)
    _params_file(tmp_path, tiny_folder, mlflow_uri)
    _ok(["prepare", "--out", "data/prepared"])
    moedd = Path(sys.executable).with_name("moedd")
    cmd = [str(moedd), "distill", "--expert", "dm", "--noe", "2", "-S", "experts.dm.iterations=100000",
           "-S", "distill.checkpoint_every=1"]
    # SIGINT back to its default in the child: a shell that runs the tests in the background (`cmd &`)
    # hands its children SIGINT ignored, and Python keeps it ignored, so Ctrl-C would not reach moedd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(Path(".moedd/checkpoints").rglob("*.pt")):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
    stage = next(r for r in runs if r.info.run_name == "distill dm folder b8 4x2")
    experts = [r for r in runs if r.info.run_name.startswith("expert ")]
    assert len(experts) == 2
    assert stage.info.status in {"KILLED", "FAILED"}
    assert {r.info.status for r in experts} == {"KILLED"}, out
    assert list(Path(".moedd/checkpoints").rglob("*.pt"))  # the work done so far is kept
