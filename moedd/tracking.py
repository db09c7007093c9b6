"""MLflow tracking with lineage: one parent run per pipeline run, child runs per stage/expert/net.

Store: SQLite at an absolute path (never the deprecated file store; MLflow 3.17 raises on it).
Default ``sqlite:///<project root>/mlflow.db`` with artifacts in ``<project root>/mlartifacts``,
where the project root is ``$DVC_ROOT`` when DVC runs the stage (queued experiments run in a
temporary copy that is deleted afterwards: a CWD-relative store would lose their runs), else
the git top level, else the CWD. ``$MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` override it.

Lineage: every run is tagged with the git commit and dirty flag and the DVC experiment name,
baseline and stage; inputs (prepared data, partitions, synthetic sets) are logged as MLflow
dataset inputs whose digest is the md5 DVC recorded in dvc.lock (our own digest when the
command runs outside DVC).

Parent runs: stages run as separate processes, so the parent is found again by the tag
``moedd.pipeline``: the DVC experiment name when there is one, else a hash of the git commit
and params.yaml. Creation of the database and of parents is serialised with a file lock
(parallel workers initialising a fresh SQLite store race; docs/ecosystem.md §S4 init-race).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from moedd.config import MlflowConfig, flatten
from moedd.params import Params

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training, so MLflow 3's UI opens it on the runs table (its
GenAI overview of traces is the default for an experiment without this tag)."""

PIPELINE_TAG = "moedd.pipeline"
ROLE_TAG = "moedd.role"
"""'pipeline' on the one parent run of a pipeline run (its stage runs share its pipeline tag)."""


def project_root() -> Path:
    """The repository root that owns the MLflow store (see module docstring)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def checkpoint_root() -> Path:
    """Where resumable state lives by default: ``<project root>/.moedd/checkpoints``.

    Under the project root (``$DVC_ROOT`` for a queued experiment), not the working directory:
    a queued experiment runs in a temporary copy that is deleted afterwards, and its checkpoints
    must outlive it so that rerunning the experiment resumes. Each state file is keyed by the
    fingerprint of its run's inputs, so parallel experiments never share one by mistake.
    """
    return project_root() / ".moedd" / "checkpoints"


def tracking_uri(cfg: MlflowConfig) -> str:
    """$MLFLOW_TRACKING_URI, else ``mlflow.tracking_uri``, else SQLite under the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def _lock_path(uri: str) -> Path:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".lock")
    return project_root() / ".moedd" / "mlflow.lock"


@contextlib.contextmanager
def _locked(uri: str) -> Iterator[None]:
    path = _lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_tracking(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    with _locked(uri):
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None:
            artifacts = (project_root() / "mlartifacts").as_uri()
            exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
        else:
            exp_id = exp.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # stores made before the tag existed
                if exp.tags.get(key) != value:
                    mlflow.MlflowClient().set_experiment_tag(exp_id, key, value)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_commit() -> str:
    """``$MOEDD_GIT_COMMIT`` when set (a copied tree or container, where a ``.git`` may be absent
    or stale, as on the lent GPU machine), else HEAD of the repository in the CWD ('' outside git)."""
    return os.environ.get("MOEDD_GIT_COMMIT") or _git("rev-parse", "HEAD")


def lineage_tags() -> dict[str, str]:
    """Code and experiment identity, set explicitly (MLflow misses it for console scripts, S6/S7)."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tags = {"git_commit": git_commit(), "git_dirty": str(bool(dirty)).lower()}
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"), ("DVC_STAGE", "dvc.stage")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def pipeline_key(params: Params) -> str:
    """Identity of the pipeline run the current stage belongs to."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    blob = git_commit() + yaml.safe_dump(params.model_dump(), sort_keys=True)
    return "run-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def parent_run_id(params: Params) -> str:
    """Find or create the parent run of this pipeline run (under the lock)."""
    import mlflow

    key = pipeline_key(params)
    exp_id = init_tracking(params.mlflow)
    with _locked(tracking_uri(params.mlflow)):
        # stage runs carry the pipeline tag too (to filter a pipeline's runs); only the parent has the role tag
        found = mlflow.search_runs(
            experiment_ids=[exp_id], output_format="list", max_results=1,
            filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' AND tags.`{ROLE_TAG}` = 'pipeline'",
        )
        if found:
            return found[0].info.run_id
        tags = {k: v for k, v in lineage_tags().items() if k != "dvc.stage"}  # a parent spans all stages
        with mlflow.start_run(run_name=key, tags={PIPELINE_TAG: key, ROLE_TAG: "pipeline", **tags}) as run:
            mlflow.log_params(flatten(params))
        return run.info.run_id


def cell_tags(method: str, budget: int, ipc: int, noe: int, data_name: str, paper: str | None) -> dict[str, str]:
    """Tags that place a distill or evaluate run in the table, to filter on in the UI: ``dataset``
    (``cifar10``-style, :func:`moedd.data.identity.dataset_label`), ``budget``, ``config``
    (IPCxNoE) and ``method``."""
    from moedd.data.identity import dataset_label

    return {"dataset": dataset_label(data_name, paper), "budget": str(budget),
            "config": f"{ipc}x{noe}", "method": method}


@contextlib.contextmanager
def stage_run(params: Params, run_name: str, stage_params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A run for one stage invocation, nested under the pipeline's parent run."""
    import mlflow

    pid = parent_run_id(params)
    all_tags = {PIPELINE_TAG: pipeline_key(params), **lineage_tags(), **(tags or {})}
    with mlflow.start_run(run_name=run_name, parent_run_id=pid, nested=True, tags=all_tags) as run:
        mlflow.log_params(stage_params)
        yield run


def dvc_md5(path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for ``path`` (an out of any stage) in dvc.lock, if any."""
    lock = Path(lock_file)
    if not lock.exists():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    target = Path(path).as_posix().rstrip("/")
    for stage in (data.get("stages") or {}).values():
        for entry in (stage.get("outs") or []) + (stage.get("deps") or []):
            if Path(entry.get("path", "")).as_posix().rstrip("/") == target and entry.get("md5"):
                return str(entry["md5"])
    return None


def log_input(path: str | Path, name: str, context: str, fallback_digest: str) -> str:
    """Log ``path`` as a dataset input of the active run; returns the digest used.

    The digest is DVC's md5 of the path when dvc.lock records it, else ``fallback_digest``.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = name.replace("+", "_")  # MLflow names allow no "+" (a mixture's idc+idm)
    md5 = dvc_md5(path)
    digest = md5 or fallback_digest
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": harmless
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    ds = MetaDataset(source=source, name=name, digest=digest[:36])
    mlflow.log_input(ds, context=context, tags={"path": str(path), "digest_kind": "dvc-md5" if md5 else "moedd-sha256"})
    mlflow.set_tag(f"lineage.{context}.{name}", digest)
    return digest


def log_metric_rows(run_id: str, rows: list[dict[str, float]], skip: tuple[str, ...] = ()) -> None:
    """Log metric rows (``{"step": s, key: value, ...}``) to run ``run_id``, at most 1000 metrics per
    request (MLflow's limit); keys starting with one of ``skip`` are left out."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, int(r["step"])) for r in rows for k, v in r.items()
               if k != "step" and not k.startswith(skip)]
    for i in range(0, len(metrics), 1000):
        MlflowClient().log_batch(run_id, metrics=metrics[i:i + 1000])


class ExpertRuns:
    """One MLflow child run per expert under a distill stage run (logged through the client API).

    ``log(rows)`` sends the stage metrics to the stage run and each ``match_e{k}`` as ``loss`` to
    child k; ``finish`` adds each expert's image grid and metadata and closes the children. Used
    as a context manager, an exception (or Ctrl-C) marks the children FAILED (KILLED), so they
    never stay RUNNING.
    """

    def __init__(self, stage_run_id: str, method: str | list[str], noe: int, ipc: int) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client, self.stage_run_id = MlflowClient(), stage_run_id
        exp_id = mlflow.get_run(stage_run_id).info.experiment_id
        self.ids = []
        methods = [method] * noe if isinstance(method, str) else method  # a mixture: each expert's own
        for k in range(noe):
            run = self.client.create_run(exp_id, run_name=f"expert {k}",
                                         tags={"mlflow.parentRunId": stage_run_id, "expert_index": str(k)})
            self.client.log_batch(run.info.run_id, params=[
                Param("expert", methods[k]), Param("expert_index", str(k)), Param("ipc", str(ipc)), Param("noe", str(noe))])
            self.ids.append(run.info.run_id)

    def __enter__(self) -> "ExpertRuns":
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        if err is not None:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            for cid in self.ids:
                self.client.set_terminated(cid, status)

    def log(self, rows: list[dict[str, float]]) -> None:
        log_metric_rows(self.stage_run_id, rows, skip=("match_e",))
        for k, cid in enumerate(self.ids):
            log_metric_rows(cid, [{"step": r["step"], "loss": r[f"match_e{k}"]} for r in rows if f"match_e{k}" in r])

    def finish(self, images: Any, metas: list[Any], zca: Any = None) -> None:
        import json

        from moedd.visualize import expert_grid

        for k, cid in enumerate(self.ids):
            self.client.log_image(cid, expert_grid(images[k], metas[k], zca=zca), artifact_file=f"grids/expert-{k}.png")
            self.client.log_dict(cid, json.loads(metas[k].model_dump_json()), f"synthetic/expert-{k}.json")
            self.client.set_terminated(cid)


class TeacherLog:
    """The MLflow side of ``moedd trajectories``: every teacher's training curve and test accuracy."""

    def __init__(self, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(), run_id

    def curve(self, shard: int, index: int, accs: list[float], losses: list[float], first: int) -> None:
        """Epochs ``first, first+1, ...`` of teacher ``index`` of ``shard`` (accuracy in percent)."""
        key = f"shard{shard}.teacher{index:03d}"
        rows = [{"step": e, f"train_acc.{key}": 100 * a, f"train_loss.{key}": loss}
                for e, (a, loss) in enumerate(zip(accs, losses, strict=True), start=first)]
        log_metric_rows(self.run_id, rows)

    def teacher(self, rec: Any) -> None:
        """A finished teacher (``moedd.trajectories.TeacherRecord``); a kept one, or one another
        torchrun rank trained, gets its curve too (it was not streamed here epoch by epoch)."""
        if rec.skipped or rec.rank != 0:
            self.curve(rec.shard, rec.index, rec.train_acc, rec.train_loss, 1)
        self.client.log_metric(self.run_id, f"test_acc.shard{rec.shard}.teacher{rec.index:03d}", 100 * rec.test_acc)

    def summary(self, result: Any, out: dict[str, Any]) -> None:
        """The run's summary metrics, digest tag and the trajectories' meta.json."""
        import mlflow

        mlflow.log_metrics({"test_acc_mean": out["test_acc_mean"], "test_acc_std": out["test_acc_std"],
                            "trained": result.trained, "kept": result.skipped, "seconds": result.seconds,
                            **{f"test_acc_mean.shard{k}": v for k, v in out["test_acc_per_shard"].items()}})
        mlflow.set_tag("trajectories_digest", result.meta["digest"])
        self.client.log_dict(self.run_id, result.meta, "trajectories/meta.json")


class EvaluationRuns:
    """The MLflow side of an evaluate stage run, logged as the units finish (client API).

    One child run per network (named by its display name, tagged with the cell and ``net``) and,
    under it, one run per seed (``<net> seed <s>``): its training curve (``train_acc`` in percent
    and ``train_loss``, one step per epoch) and ``test_acc``. A unit restored from an earlier,
    interrupted call has no curve here (it was trained then). ``finish`` puts the per-seed
    accuracies, mean, std and seconds on each network's run and ``acc_mean.<net>`` /
    ``acc_std.<net>`` on the stage run. As a context manager, an exception marks every open run
    FAILED (Ctrl-C: KILLED).
    """

    def __init__(self, stage_run_id: str, cell: dict[str, str], params: dict[str, Any], display: dict[str, str]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client, self.stage_run_id = MlflowClient(), stage_run_id
        self.exp_id = mlflow.get_run(stage_run_id).info.experiment_id
        self.cell, self.params, self.display = cell, params, display
        self.net_runs: dict[str, str] = {}
        self.curves: dict[tuple[str, int], list[dict[str, float]]] = {}

    def __enter__(self) -> "EvaluationRuns":
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        if err is not None:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            for rid in self.net_runs.values():
                self.client.set_terminated(rid, status)

    def _create(self, name: str, parent: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.exp_id, run_name=name, tags={"mlflow.parentRunId": parent, **tags})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def _net_run(self, net: str) -> str:
        if net not in self.net_runs:
            tags = {"stage": "evaluate", **self.cell, "net": net}
            self.net_runs[net] = self._create(self.display.get(net, net), self.stage_run_id, tags, {"net": net, **self.params})
        return self.net_runs[net]

    def curve(self, net: str, seed: int, epoch: int, acc: float, loss: float) -> None:
        """One epoch of unit (net, seed); sent with the unit when it finishes."""
        self.curves.setdefault((net, seed), []).append({"step": epoch, "train_acc": 100 * acc, "train_loss": loss})

    def unit(self, net: str, seed: int, acc: float) -> None:
        """Unit (net, seed) finished with test accuracy ``acc`` (a fraction): its seed run."""
        tags = {"stage": "evaluate", **self.cell, "net": net, "seed": str(seed)}
        rid = self._create(f"{self.display.get(net, net)} seed {seed}", self._net_run(net), tags, {"net": net, "seed": seed})
        log_metric_rows(rid, [*self.curves.pop((net, seed), []), {"step": 0, "test_acc": 100 * acc}])
        self.client.set_terminated(rid)

    def finish(self, results: dict[str, Any]) -> None:
        """Each network's summary (``moedd.evaluate.NetResult``) on its run, which then ends."""
        for net, res in results.items():
            rid = self._net_run(net)
            rows = [{"step": i, "test_acc": 100 * a} for i, a in enumerate(res.accs)]
            rows.append({"step": 0, "test_acc_mean": 100 * res.mean, "test_acc_std": 100 * res.std, "seconds": res.seconds})
            log_metric_rows(rid, rows)
            self.client.set_terminated(rid)
        log_metric_rows(self.stage_run_id, [{"step": 0, **{f"acc_mean.{net}": 100 * r.mean for net, r in results.items()},
                                             **{f"acc_std.{net}": 100 * r.std for net, r in results.items()}}])


CELLS_VIEW = "moedd-cells"
"""Key of the saved runs-table view the report keeps: pipeline runs, one column per cell accuracy."""
_VIEW_TAG = "mlflow.sharedViewState."
_VIEW_LIMIT = 20000
"""MLflow's limit on an experiment tag's value (``MAX_EXPERIMENT_TAG_VAL_LENGTH`` in 3.17)."""


def _view_state(columns: list[str]) -> dict[str, Any]:
    """A runs-table view as MLflow 3.17's UI stores a shared one: pipeline runs, newest first."""
    return {"searchFilter": f"tags.`{ROLE_TAG}` = 'pipeline'", "orderByKey": "attributes.start_time",
            "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
            "modelVersionFilter": "All Runs", "selectedColumns": columns, "runsExpanded": {}, "runsPinned": [],
            "runsHidden": [], "viewMaximized": False, "runListHidden": False}


def update_cells_view(exp_id: str, metric_keys: list[str]) -> list[str]:
    """Add the ``acc/...`` keys among ``metric_keys`` as columns of the saved view (under the lock,
    as parallel reports may add theirs); returns its columns. Keys that would push the view past
    MLflow's tag limit are left out (the runs still hold them)."""
    import json

    from mlflow.tracking import MlflowClient

    client, tag = MlflowClient(), _VIEW_TAG + CELLS_VIEW
    current = client.get_experiment(exp_id).tags.get(tag)
    columns = list(json.loads(current).get("selectedColumns", [])) if current else []
    for key in sorted(k for k in metric_keys if k.startswith("acc/")):
        col = f"metrics.`{key}`"
        if col not in columns and len(json.dumps(_view_state([*columns, col]))) <= _VIEW_LIMIT:
            columns.append(col)
    client.set_experiment_tag(exp_id, tag, json.dumps(_view_state(columns)))
    return columns


def ui_url(host: str, port: int, exp_id: str) -> str:
    """The URL that opens the saved view of experiment ``exp_id`` in the UI's model-training layout."""
    return (f"http://{host}:{port}/#/experiments/{exp_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={CELLS_VIEW}")


def log_report(params: Params, markdown: str, metrics: dict[str, float], over_experiments: bool = False) -> None:
    """The report table (an artifact) and every cell (metrics) on the pipeline's parent run (DVC skips
    cached stages; the report sees them all), and the cells' columns in the saved view. A report
    over several experiments (``moedd report --experiments``) is no one pipeline's: it goes to a run
    of its own, named ``report over experiments`` and tagged ``moedd.role=report``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if over_experiments:
        with mlflow.start_run(experiment_id=init_tracking(params.mlflow), run_name="report over experiments",
                              tags={ROLE_TAG: "report", **lineage_tags()}) as run:
            parent = run.info.run_id
    else:
        parent = parent_run_id(params)
    MlflowClient().log_text(parent, markdown, "report/table.md")
    log_metric_rows(parent, [{"step": 0, **metrics}])
    exp_id = MlflowClient().get_run(parent).info.experiment_id
    with _locked(tracking_uri(params.mlflow)):
        update_cells_view(exp_id, list(metrics))
