"""A fresh MLflow store under parallel workers: the first processes of `dvc queue start -j N`.

Several processes that create one SQLite store at once race in MLflow's schema migrations
(``duplicate column name``, ``Online migration expected to match one row``); moedd serialises
the store's creation and the pipeline parent's find-or-create with a file lock. This test starts
real ``moedd distill`` processes at the same moment on a store that does not exist yet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moedd.cli.main import app

WORKERS = 3


def test_workers_starting_together_on_a_missing_store(tiny_folder: Path, tmp_path: Path, mlflow_uri: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": str(tiny_folder)}, "distill": {"budget": 2, "dcor_estimator": "v_statistic"},
    }))
    prepared = CliRunner().invoke(app, ["prepare", "--out", "data/prepared"])  # no MLflow: the store stays missing
    assert prepared.exit_code == 0, prepared.output
    db = Path(mlflow_uri.removeprefix("sqlite:///"))
    assert not db.exists()

    moedd = Path(sys.executable).with_name("moedd")
    procs = [subprocess.Popen([str(moedd), "distill", "--expert", "random", "--noe", "1", "--out", f"syn{i}",
                               "--metrics", f"m{i}.json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=os.environ.copy())
             for i in range(WORKERS)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORKERS, "\n---\n".join(outs)

    mlflow.set_tracking_uri(mlflow_uri)
    assert sorted(e.name for e in mlflow.search_experiments()) == ["Default", "moedd"]  # MLflow makes Default
    runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("moedd.role") == "pipeline"]
    stages = [r for r in runs if r.info.run_name.startswith("distill ")]
    assert len(parents) == 1  # the same params: one pipeline run, found again by each worker
    assert len(stages) == WORKERS
    assert {r.data.tags.get("mlflow.parentRunId") for r in stages} == {parents[0].info.run_id}
    assert {r.info.status for r in stages} == {"FINISHED"}
