"""`moedd ui`: the MLflow UI served on the project's store, its experiment marked as model training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_project_store(tmp_path: Path, mlflow_uri: str) -> None:
    """A real server on 127.0.0.1: it answers, and the experiment it shows carries the tag that
    makes MLflow 3's UI open on the runs table instead of the GenAI overview."""
    port = _free_port()
    moedd = Path(sys.executable).with_name("moedd")
    proc = subprocess.Popen([str(moedd), "ui", "--port", str(port)], cwd=tmp_path, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the UI did not answer within 120 s"
            time.sleep(0.5)
        url = f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=moedd"
        with urllib.request.urlopen(url, timeout=10) as r:
            exp = json.loads(r.read())["experiment"]
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    from moedd.tracking import ui_url

    said = next(line for line in out.splitlines() if "MLflow UI on" in line)
    assert mlflow_uri in said and ui_url("127.0.0.1", port, exp["experiment_id"]) in out
