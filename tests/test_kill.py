"""Hard kills: a SIGKILLed `moedd distill` / `moedd trajectories` resumes to exactly the outputs of
an uninterrupted run, its state outlives the working copy, and outputs are never half-published.

The stage commands run as real processes (the console script), killed with SIGKILL once their
first checkpoint or teacher file is on disk: no handler runs, so this is the queued experiment
cancelled or OOM-killed mid-run. ``DVC_ROOT`` points at a directory other than the working one,
as in a queued experiment (whose working copy is a temporary directory), so the checkpoints must
land under ``DVC_ROOT``. The atomic-publication helper is tested directly, including a real
SIGKILL inside an ``atomic_dir`` block.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from conftest import Interrupt, tiny_params
from moedd._atomic import atomic_dir, atomic_file, clean_leftovers
from moedd.data import load_prepared, load_source, make_partition, save_partition, save_prepared
from moedd.synthetic import SyntheticMeta, load_synthetic, save_synthetic
from moedd.trajectories import load_trajectories, teacher_path, train_teachers
from tinydata import make_image_folder

MOEDD = str(Path(sys.executable).with_name("moedd"))
CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers


def _workspace(tmp_path: Path, folder: Path, params: dict) -> tuple[Path, Path, dict[str, str]]:
    """A working copy (cwd) with params.yaml, the prepared store and the NoE=2 partition, and a
    separate repository root (``DVC_ROOT``) that owns MLflow and the checkpoints."""
    work, root = tmp_path / "work", tmp_path / "root"
    work.mkdir()
    root.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "imagefolder", "root": str(folder)}, **params}))
    prep = save_prepared(load_source("imagefolder", folder), work / "data/prepared")
    save_partition(make_partition(prep.train_labels, prep.num_classes, 2, 0, prep.digest), work / "data/partitions/noe2.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MOEDD_CHECKPOINT"))}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_ROOT": str(root)})
    return work, root, env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start the uninterrupted reference run alongside the killed one (the imports overlap)."""
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, f"the uninterrupted run failed:\n{log.read_text()}"


def _kill_when(cmd: list[str], cwd: Path, env: dict[str, str], ready: Callable[[], bool], what: str) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; fail clearly if it ends first."""
    log = cwd / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (rc {proc.returncode}) before its first checkpoint; make the run longer\n"
                        f"{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} wrote no checkpoint within 180 s\n{log.read_text()}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"{what} finished (rc {proc.returncode}) before the SIGKILL landed; make the run longer\n"
                    f"{log.read_text()}")


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer leaves in its file names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- distill


def test_sigkilled_distill_resumes_to_the_uninterrupted_result(tiny_folder: Path, tmp_path: Path) -> None:
    """Kill `moedd distill` (DM) after its first checkpoint, run the same command again: it resumes
    from the checkpoint under DVC_ROOT (not the working copy) and ends with the images, loss curve
    and metrics of an uninterrupted run; the checkpoint and a killed write's temporary are gone."""
    work, root, env = _workspace(tmp_path, tiny_folder, {
        "distill": {"budget": 8, "log_every": 1, "checkpoint_every": 1},  # IPC 4: the default dCor
        "experts": {"dm": {"iterations": 16, "batch_real": 8}},
    })
    ckdir = root / ".moedd" / "checkpoints"

    def cmd(name: str) -> list[str]:
        return [MOEDD, "distill", "--expert", "dm", "--noe", "2", "--out", f"data/synthetic/{name}",
                "--metrics", f"metrics/{name}.json", "--plots", f"plots/{name}.csv"]

    ref_env = {**env, "MOEDD_CHECKPOINT_DIR": str(tmp_path / "other-checkpoints")}  # a run of its own
    ref = _start(cmd("full"), work, ref_env, tmp_path / "full.log")
    _kill_when(cmd("resumed"), work, env, lambda: any(ckdir.glob("*.pt")), "moedd distill")
    assert not (work / ".moedd").exists()  # the working copy holds no state (a queued experiment's is deleted)
    assert not (work / "data/synthetic/resumed").exists()
    _run(cmd("resumed"), work, env)
    assert list(ckdir.iterdir()) == []  # finished: no checkpoint, no leftover of the killed write
    _finish(ref, tmp_path / "full.log")

    resumed, full = load_synthetic(work / "data/synthetic/resumed"), load_synthetic(work / "data/synthetic/full")
    assert all(torch.equal(a, b) for a, b in zip(resumed.images, full.images, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.labels, full.labels, strict=True))
    assert (work / "plots/resumed.csv").read_text() == (work / "plots/full.csv").read_text()
    m_resumed, m_full = (json.loads((work / f"metrics/{n}.json").read_text()) for n in ("resumed", "full"))
    assert m_resumed.pop("resumed_from") > 0 and m_full.pop("resumed_from") == 0
    m_resumed.pop("seconds"), m_full.pop("seconds")
    assert m_resumed == m_full


# ---------------------------------------------------------------- trajectories


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8x8 images (3 classes, 16 train / 4 test each): teachers and ZCA in milliseconds."""
    return make_image_folder(tmp_path_factory.mktemp("kill-small") / "folder", train_per_class=16, test_per_class=4, size=8)


_TEACHERS = {"num_teachers": 6, "epochs": 2, "batch_size": 16, "test_batch_size": 64}


def _teacher_state(out: Path, k: int, i: int) -> dict:
    return torch.load(teacher_path(out, k, i), map_location="cpu", weights_only=True)


def test_sigkilled_trajectories_resume_to_the_uninterrupted_teachers(small_folder: Path, tmp_path: Path) -> None:
    """Kill `moedd trajectories` once its first teacher is written, run the same command again: the
    finished teachers are kept byte for byte, the rest trained, and every teacher (parameters,
    accuracies) and meta.json equal those of an uninterrupted run; the teacher cache under
    DVC_ROOT is emptied once the run is complete."""
    work, root, env = _workspace(tmp_path, small_folder, {
        "distill": {"budget": 4, "dcor_estimator": "v_statistic"}, "experts": {"mtt": {"preset": "none"}}, "trajectories": _TEACHERS,
    })
    out, cache = work / "data/trajectories/resumed", root / ".moedd/checkpoints/teachers"

    def cmd(target: Path) -> list[str]:
        return [MOEDD, "trajectories", "--noe", "2", "--out", str(target), "--metrics", f"metrics/{target.name}.json"]

    full = work / "data/trajectories/full"
    ref_env = {**env, "MOEDD_CHECKPOINT_DIR": str(tmp_path / "other-checkpoints")}  # a run of its own
    ref = _start(cmd(full), work, ref_env, tmp_path / "full.log")
    _kill_when(cmd(out), work, env, lambda: any(out.glob("shard*/teacher*.pt")), "moedd trajectories")
    done = {p.relative_to(out): p.read_bytes() for p in out.glob("shard*/teacher*.pt")}
    assert done and not (out / "meta.json").exists()
    fps = {torch.load(out / rel, weights_only=True)["fingerprint"] for rel in done}
    assert {f"{fp}.pt" for fp in fps} <= {p.name for p in cache.glob("*.pt")}  # also outside the working copy
    _run(cmd(out), work, env)
    summary = json.loads((work / "metrics/resumed.json").read_text())
    assert summary["skipped"] >= len(done) and summary["skipped"] + summary["trained"] == 12
    assert all((out / rel).read_bytes() == b for rel, b in done.items())
    assert list(cache.iterdir()) == []
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and ".tmp-" in p.name) == []

    _finish(ref, tmp_path / "full.log")
    assert load_trajectories(out).meta == load_trajectories(full).meta
    assert (out / "zca.pt").read_bytes() == (full / "zca.pt").read_bytes()
    for k in range(2):
        for i in range(_TEACHERS["num_teachers"]):
            a, b = _teacher_state(out, k, i), _teacher_state(full, k, i)
            assert torch.equal(a["trajectory"], b["trajectory"]), (k, i)
            assert (a["train_acc"], a["train_loss"], a["test_acc"]) == (b["train_acc"], b["train_loss"], b["test_acc"])


def test_teachers_outlive_a_deleted_output_through_the_cache(small_folder: Path, tmp_path: Path) -> None:
    """A queued experiment's output directory is deleted with its temporary copy: teachers
    finished before the interruption come back from the cache, unchanged, instead of retraining."""
    save_prepared(load_source("imagefolder", small_folder), tmp_path / "prepared")
    prep = load_prepared(tmp_path / "prepared")
    part = make_partition(prep.train_labels, prep.num_classes, 2, 0, prep.digest)
    params = tiny_params(**{"data.source": "imagefolder", "experts.mtt.preset": "none", "trajectories.num_teachers": 2,
                            "trajectories.epochs": 2, "trajectories.batch_size": 16, "trajectories.test_batch_size": 64})
    out, cache = tmp_path / "copy" / "noe2", tmp_path / "root" / "teachers"

    def stop_after_two(rec) -> None:
        if (rec.shard, rec.index) == (0, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        train_teachers(params, prep, part, out, CPU, on_teacher=stop_after_two, cache_dir=cache)
    kept = {i: teacher_path(out, 0, i).read_bytes() for i in range(2)}
    shutil.rmtree(tmp_path / "copy")
    resumed = train_teachers(params, prep, part, out, CPU, cache_dir=cache)
    assert (resumed.skipped, resumed.trained) == (2, 2)
    assert all(teacher_path(out, 0, i).read_bytes() == b for i, b in kept.items())
    assert list(cache.iterdir()) == []
    full = train_teachers(params, prep, part, tmp_path / "full", CPU)
    assert resumed.meta == full.meta


# ---------------------------------------------------------------- atomic publication


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _old_output(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    (target / "b.txt").write_text("old b")
    return target


def test_atomic_dir_replaces_the_whole_directory(tmp_path: Path) -> None:
    target = _old_output(tmp_path)
    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and list(tmp.iterdir()) == []
        (tmp / "c.txt").write_text("new c")
    assert _tree(target) == {"c.txt": b"new c"}  # nothing of the old output lingers
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(tmp_path / "fresh" / "set") as tmp:  # an absent target (and parent) is created
        (tmp / "x").write_text("x")
    assert _tree(tmp_path / "fresh") == {"set/x": b"x"}


def test_atomic_dir_failure_leaves_the_old_directory_and_no_temporary(tmp_path: Path) -> None:
    target = _old_output(tmp_path)
    with pytest.raises(RuntimeError, match="half-way"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new a")
        raise RuntimeError("failed half-way")
    assert _tree(target) == {"a.txt": b"old a", "b.txt": b"old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_failure_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_sigkill_inside_atomic_dir_leaves_the_old_output_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of writing the new directory: the old one is intact and the
    killed writer's temporary directory is removed by the next write of the same target."""
    target = _old_output(tmp_path)
    child = (f"import os, signal\nfrom moedd._atomic import atomic_dir\n"
             f"with atomic_dir({str(target)!r}) as tmp:\n"
             f"    (tmp / 'a.txt').write_text('new a')\n"
             f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _tree(target) == {"a.txt": b"old a", "b.txt": b"old b"}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith("out.tmp-")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("newer a")
    assert _tree(target) == {"a.txt": b"newer a"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_dead_writers_are_finished_or_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A kill between 'old output renamed away' and 'new one renamed in' (the fallback swap) leaves
    no target but a complete new directory: it is moved into place. Other leftovers of dead writers
    go; a live writer's temporary stays (it is still writing)."""
    target, dead = tmp_path / "out", _dead_pid()
    (tmp_path / f"out.old-{dead}").mkdir()
    (tmp_path / f"out.old-{dead}" / "a.txt").write_text("old a")
    (tmp_path / f"out.tmp-{dead}").mkdir()
    (tmp_path / f"out.tmp-{dead}" / "a.txt").write_text("new a")
    clean_leftovers(target)
    assert _tree(target) == {"a.txt": b"new a"} and [p.name for p in tmp_path.iterdir()] == ["out"]

    live = tmp_path / f"out.tmp-{os.getppid()}"
    live.mkdir()
    (tmp_path / f"out.tmp-{dead}").mkdir()  # a killed first write, target already there: dropped
    (tmp_path / "out.tmp-notapid").mkdir()  # not ours: left alone
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("b")
    assert _tree(target) == {"b.txt": b"b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, "out.tmp-notapid"])


def _meta(k: int) -> SyntheticMeta:
    return SyntheticMeta(method="dm", expert=k, noe=2, ipc=1, budget=2, classes=["a", "b"], image_shape=[1, 2, 2],
                         mean=[0.5], std=[0.25], data_digest="d")


def test_failed_save_synthetic_keeps_the_previous_set(tmp_path: Path) -> None:
    """save_synthetic fails after writing one expert (a missing label list): the previous set is
    still there and loads; a successful save of fewer experts leaves none of the old ones."""
    target, labels = tmp_path / "set", torch.tensor([0, 1])
    old = [torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)]
    save_synthetic(target, old, [labels, labels], [_meta(0), _meta(1)])
    with pytest.raises(ValueError):
        save_synthetic(target, [torch.full((2, 1, 2, 2), 7.0)] * 2, [labels], [_meta(0), _meta(1)])
    kept = load_synthetic(target)
    assert kept.noe == 2 and all(torch.equal(a, b) for a, b in zip(kept.images, old, strict=True))
    save_synthetic(target, [old[1]], [labels], [_meta(0).model_copy(update={"noe": 1})])
    assert sorted(p.name for p in target.iterdir()) == ["expert-0.json", "expert-0.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
