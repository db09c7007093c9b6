"""End to end: the real `dvc repro` in a temporary repository on tiny data, with MLflow lineage,
caching (a second repro is a no-op), a push to the local remote, and queued experiments that
lose no MLflow runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tinydata import make_image_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git+DVC repository with this project's pipeline and tiny params (one dataset, budget 8,
    DM, the random baseline and MTT at NoE 2 and 1, the heterogeneous mixture IDC+IDM at NoE 2);
    `dvc repro` already run."""
    return _repo(tmp_path_factory, {"tiny": tiny_folder}, [8], mixtures=({"experts": "idc+idm", "noe": 2},))


def _repo(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path], budgets: list[int],
          baselines: tuple[str, ...] = ("random",), mtt_noe: tuple[int, ...] = (2,),
          mixtures: tuple[dict, ...] = ()) -> tuple[Path, dict[str, str]]:
    """This project's pipeline in a fresh git+DVC repository over the image ``folders`` (name ->
    folder) and ``budgets``, at toy sizes; `dvc repro` run once."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    root.mkdir()
    for package in ("moedd", "cli"):  # the stages' deps (the installed code runs; these are what DVC hashes)
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {name: {"source": "imagefolder", "root": str(f), "download": False} for name, f in folders.items()}
    params["grid"] = {"datasets": list(folders), "budgets": budgets, "experts": ["dm"], "baselines": list(baselines),
                      "noe": [2, 1], "mtt_noe": list(mtt_noe), "mixtures": list(mixtures)}
    params["scale"] = "smoke"  # every method and stage at its smoke sizes (moedd.scale)
    params["distill"].update({"budget": max(budgets), "log_every": 1, "checkpoint_every": 2})
    params["experts"]["mtt"].update({"zca": False})  # its 3072x3072 fit is tested on small images in test_mtt.py
    params["trajectories"].update({"batch_size": 16, "test_batch_size": 64})  # batches of the tiny shards
    params["evaluate"].update({"test_batch_size": 64})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db\n/mlflow.db.lock\n/mlartifacts/\n/.moedd/\n/storage/\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "remote", "add", "-d", "local", str(root / "storage")],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny pipeline"]):
        _run(cmd, root, env)
    _run(["dvc", "repro"], root, env)
    return root, env


def _runs(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["moedd"], output_format="list")


def test_repro_produces_every_stage_output(repo) -> None:
    root, _ = repo
    for name in ("dm-noe2", "dm-noe1"):
        assert (root / "data/tiny/synthetic/b8" / name / "expert-0.json").exists()
        assert (root / "metrics/evaluate/tiny/b8" / f"{name}.json").exists()
        assert (root / "plots/distill/tiny/b8" / f"{name}.csv").exists()
    assert (root / "data/tiny/synthetic/b8/dm-noe2/expert-1.pt").exists()
    for name in ("random-noe2", "random-noe1"):  # a baseline: a set and its evaluation, no loss curve to plot
        assert (root / "metrics/evaluate/tiny/b8" / f"{name}.json").exists()
        assert not (root / "plots/distill/tiny/b8" / f"{name}.csv").exists()
    table = (root / "reports/table.md").read_text()
    assert (root / "reports/table.csv").read_text().startswith("dataset,budget,config,method,net,mean")
    assert r"\begin{tabular}" in (root / "reports/table.tex").read_text()
    assert (root / "reports/table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DM | ConvNet-3 |" in table and "| RANDOM | ConvNet-3 |" in table and "b8 4x2" in table and "b8 8x1" in table
    assert "Scale: smoke. Protocol: 2 epochs x 1 seeds" in table  # the scale is part of the protocol line
    # MTT: teachers of both shards (3 epochs = the smoke max_start_epoch + expert_epochs), its set, its evaluation
    assert (root / "data/tiny/trajectories/noe2/meta.json").exists()
    assert (root / "data/tiny/trajectories/noe2/shard1/teacher000.pt").exists()
    assert (root / "data/tiny/synthetic/b8/mtt-noe2/expert-1.json").exists()
    assert (root / "metrics/evaluate/tiny/b8/mtt-noe2.json").exists()
    assert "| MTT | ConvNet-3 |" in table
    # the heterogeneous mixture: each expert its own method, space and decoding; a row of its own
    metas = [json.loads((root / f"data/tiny/synthetic/b8/idc+idm-noe2/expert-{k}.json").read_text()) for k in (0, 1)]
    assert [(m["method"], m["space"], m["mixture"]) for m in metas] == [("idc", "pixel", "idc+idm"), ("idm", "normalized", "idc+idm")]
    assert json.loads((root / "metrics/evaluate/tiny/b8/idc+idm-noe2.json").read_text())["method"] == "idc+idm"
    assert (root / "plots/distill/tiny/b8/idc+idm-noe2.csv").exists()
    assert "| IDC+IDM | ConvNet-3 |" in table


def test_second_repro_is_a_no_op(repo) -> None:
    root, env = repo
    out = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in out
    assert "'trajectories@tiny-2' didn't change" in out  # teachers are cached, never retrained
    assert "up to date" in _run(["dvc", "status"], root, env)


def test_mlflow_holds_the_runs_with_dvc_lineage(repo) -> None:
    root, _ = repo
    runs = _runs(root)
    by_name = {r.info.run_name: r for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    cells = parents[0].data.metrics  # logged by the report stage: every cell of the pipeline run
    assert {"acc/tiny/b8/4x2/dm/convnet3", "acc/tiny/b8/8x1/dm/convnet3", "acc/tiny/b8/4x2/mtt/convnet3",
            "gain/tiny/b8/4x2/dm/convnet3"} <= set(cells), sorted(cells)
    assert cells["gain/tiny/b8/4x2/dm/convnet3"] == round(
        cells["acc/tiny/b8/4x2/dm/convnet3"] - cells["acc/tiny/b8/8x1/dm/convnet3"], 4)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    stages = [r for r in runs if "stage" in r.data.tags and "mlflow.parentRunId" in r.data.tags
              and r.info.run_name.split()[0] in ("trajectories", "distill", "evaluate")]
    assert len(stages) >= 6 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in stages), \
        [(r.info.run_name, r.data.tags["mlflow.parentRunId"][:8]) for r in stages]  # every stage under the ONE parent
    distill = by_name["distill dm tiny b8 4x2"]
    assert distill.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert distill.data.tags["dvc.stage"] == "distill@tiny-8-dm-2"
    assert distill.data.params["scale"] == by_name["evaluate dm tiny b8 4x2"].data.params["scale"] == "smoke"
    assert parents[0].data.params["scale"] == "smoke"
    part_md5 = next(o["md5"] for o in lock["partition@tiny-2"]["outs"])
    assert distill.data.tags["lineage.partition.partition-noe2"] == part_md5
    evaluate = by_name["evaluate dm tiny b8 4x2"]
    syn_md5 = next(o["md5"] for o in lock["distill@tiny-8-dm-2"]["outs"])
    assert evaluate.data.tags["lineage.synthetic.synthetic-dm-noe2"] == syn_md5
    digests = {d.dataset.digest for d in evaluate.inputs.dataset_inputs}
    assert syn_md5 in digests
    assert {"expert 0", "expert 1", "ConvNet-3"} <= set(by_name)
    assert by_name["ConvNet-3"].data.metrics["test_acc_mean"] >= 0


def test_push_to_the_local_remote(repo) -> None:
    root, env = repo
    _run(["dvc", "push"], root, env)
    assert any((root / "storage").rglob("*"))
    assert not _run(["dvc", "status", "-c", "-q"], root, env).strip()  # rc 0 and silent: in sync


@pytest.fixture(scope="module")
def queued(repo) -> tuple[Path, dict[str, str]]:
    """The repo after two queued experiments ran on two workers: qa with another evaluation seed,
    qb the no-fusion ablation evaluated with another seed."""
    root, env = repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    for name, sets in (("qa", ["evaluate.seeds=[5]"]), ("qb", ["evaluate.seeds=[6]", "fusion.kind=none"])):
        _run(["dvc", "exp", "run", "--queue", "-n", name, *(a for x in sets for a in ("-S", x))], root, env)
    # the workers it starts inherit its stdout: with captured output, the call would wait for them
    # to finish (and time out on a loaded machine); the loop below waits for them instead
    started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0
    deadline = time.time() + 540
    while time.time() < deadline:
        status = _run(["dvc", "queue", "status"], root, env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, _run(["dvc", "queue", "logs", "qa"], root, env)
    return root, env


def test_queued_experiments_lose_no_mlflow_runs(queued) -> None:
    root, env = queued
    runs = _runs(root)
    for name in ("qa", "qb"):
        exp_runs = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        names = {r.info.run_name for r in exp_runs}
        assert {"evaluate dm tiny b8 4x2", "evaluate dm tiny b8 8x1"} <= names, (name, names)


def test_one_report_holds_every_queued_experiment(queued) -> None:
    """`moedd report --experiments` reads the experiments' commits (not the workspace's files):
    qb's no-fusion cells appear as the ablation's rows beside the workspace's cells."""
    root, env = queued
    out = _run(["moedd", "report", "--experiments", "--out", "reports/all.md"], root, env)
    assert "experiment qb:" in out and "experiment qa:" in out
    table = (root / "reports/all.md").read_text()
    assert "| DM (no fusion) | ConvNet-3 |" in table and "| DM | ConvNet-3 |" in table
    assert "Ablations: no fusion = " in table
    assert not list((root / "metrics/evaluate").rglob("*nofusion*"))  # the workspace was not touched
    union = [r for r in _runs(root) if r.data.tags.get("moedd.role") == "report"]
    assert len(union) == 1 and union[0].data.metrics["acc/tiny/b8/4x2/dm-nofusion/convnet3"] >= 0  # its own run


def _serve_ui(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`moedd ui` (a real `mlflow server`) on a free loopback port, answering /health."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moedd = Path(sys.executable).with_name("moedd")
    proc = subprocess.Popen([str(moedd), "ui", "--port", str(port)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "moedd ui exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        assert time.monotonic() < deadline, "the UI did not answer within 120 s"
        time.sleep(0.5)


@pytest.mark.browser
def test_the_ui_compares_the_pipeline_runs_in_a_real_browser(queued) -> None:
    """Debian's chromium-headless-shell loads the URL `moedd ui` prints: the runs table lists the
    three pipeline runs (the workspace's and the two queued experiments') and no stage run, with a
    column per cell accuracy holding each run's value; the compare view of the three plots them.
    With $MOEDD_SCREENSHOTS set, both pages are saved there (docs/img holds the README's)."""
    import json
    import signal

    chromium = shutil.which("chromium-headless-shell")
    if chromium is None:
        pytest.skip("chromium-headless-shell is not installed (as root: apt-get install chromium-headless-shell)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    from moedd.tracking import ui_url

    root, env = queued
    pipelines = [r for r in _runs(root) if r.data.tags.get("moedd.role") == "pipeline"]
    assert {r.info.run_name for r in pipelines} >= {"qa", "qb"} and len(pipelines) == 3
    key = "acc/tiny/b8/8x1/dm/convnet3"  # a cell every run has (qb's mixtures are its no-fusion variant)
    shots = os.environ.get("MOEDD_SCREENSHOTS")
    proc, port = _serve_ui(root, env)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 3200, "height": 900})  # wide: the grid renders every column (it renders only those in view)
            page.goto(ui_url("127.0.0.1", port, pipelines[0].info.experiment_id))
            page.wait_for_selector("text=qb", timeout=60_000)
            page.wait_for_timeout(1000)
            headers = set(page.locator("[role=columnheader]").all_inner_texts())
            rows = [set(r.split("\n")) for r in page.locator("[role=row]").all_inner_texts() if "Pin run" in r]
            assert len(rows) == len(pipelines), rows  # pipeline runs only, no stage run
            for run in pipelines:
                assert sum(run.info.run_name in cells for cells in rows) == 1, (run.info.run_name, rows)
            cells = sorted({k for run in pipelines for k in run.data.metrics if k.startswith("acc/")})
            assert key in cells and set(cells) <= headers, (cells, headers)
            values = page.locator("[role=row]").all_inner_texts()
            for run in pipelines:  # each run's accuracy is in the table (the grid shows 2 significant places or more)
                shown = f"{run.data.metrics[key]:.4g}".rstrip("0").rstrip(".")
                assert any(shown[:2] in v for v in values), (shown, values)
            _close_assistant(page)
            if shots:
                page.screenshot(path=str(Path(shots) / "mlflow-runs.png"))
            ids = json.dumps([r.info.run_id for r in pipelines])
            exp = json.dumps([pipelines[0].info.experiment_id])
            page.set_viewport_size({"width": 1800, "height": 1300})
            page.goto(f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments={exp}&workflowType=machine_learning")
            page.wait_for_selector(f"text={key}", timeout=60_000)
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)  # the parallel-coordinates plot
            assert page.locator("text=Comparing 3 Runs").count() == 1
            _close_assistant(page)
            if shots:
                page.screenshot(path=str(Path(shots) / "mlflow-compare.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _close_assistant(page) -> None:
    """Close MLflow's assistant side panel when it is open (it takes a third of the screen)."""
    close = page.locator("button[aria-label='Close']")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


@pytest.fixture(scope="module")
def grid_repo(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The pipeline over two datasets (the tiny folder and another with four classes) and two
    budgets, DM at NoE 2 and 1: `dvc repro` already run."""
    other = make_image_folder(tmp_path_factory.mktemp("other") / "folder", 24, 4, seed=1,
                              classes=["ant", "bee", "cat", "dog"])
    return _repo(tmp_path_factory, {"tiny": tiny_folder, "other": other}, [8, 16], baselines=[], mtt_noe=[])


def test_one_repro_runs_every_dataset_and_budget_apart(grid_repo) -> None:
    """Every (dataset, budget, NoE) cell has its own set and metrics; a second `dvc repro` does
    nothing; the report keeps the datasets apart, one table each."""
    root, env = grid_repo
    seen = set()
    for dataset in ("tiny", "other"):
        for budget in (8, 16):
            for noe in (2, 1):
                meta = json.loads((root / f"data/{dataset}/synthetic/b{budget}/dm-noe{noe}/expert-0.json").read_text())
                assert (meta["budget"], meta["noe"]) == (budget, noe)
                metrics = json.loads((root / f"metrics/evaluate/{dataset}/b{budget}/dm-noe{noe}.json").read_text())
                assert (metrics["dataset"], metrics["budget"], metrics["noe"]) == (dataset, budget, noe)
                seen.add(meta["sha256"])
    assert len(seen) == 8  # nothing overwrote anything
    out = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in out
    table = (root / "reports/table.md").read_text()
    assert table.index("### other") < table.index("### tiny")  # one table per dataset (other data: by name)
    other, tiny = table.split("### tiny")
    for part in (other, tiny):
        assert all(col in part for col in ("b8 4x2", "b8 8x1", "b16 8x2", "b16 16x1"))
    parent = next(r for r in _runs(root) if r.data.tags.get("moedd.role") == "pipeline")
    assert {f"acc/{d}/b{b}/{c}/dm/convnet3" for d in ("tiny", "other") for b, c in ((8, "4x2"), (16, "16x1"))} \
        <= set(parent.data.metrics)

