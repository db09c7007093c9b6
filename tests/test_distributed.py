"""Evaluation spread over the ranks of a real ``torchrun`` launch (gloo on the CPU, 2 ranks): each
rank trains its share of the (network, seed) units, rank 0 writes the metrics and tracks; the
accuracies are the one-process run's. Both runs use one thread per process, so every unit runs
the same kernels in both (a unit is deterministic given its seed and its kernels)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from moedd.data import make_partition, save_prepared, load_source
from moedd.distill import run_distillation
from moedd.synthetic import save_synthetic

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed next to python")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
                "MOEDD_DIST_TIMEOUT": "120", "MOEDD_CHECKPOINT_DIR": str(tmp_path / "ck")})
    return env


def test_evaluate_on_two_ranks_gives_the_one_process_metrics(tiny_folder: Path, tiny_prepared, tmp_path: Path) -> None:
    prep_dir = tmp_path / "prepared"
    save_prepared(load_source("imagefolder", tiny_folder), prep_dir)
    params = tiny_params(**{"distill.budget": 4})
    part = make_partition(tiny_prepared.train_labels, 3, 2, 0, tiny_prepared.digest)
    r = run_distillation("random", params, tiny_prepared, part, torch.device("cpu"))
    save_synthetic(tmp_path / "set", list(r.images), [r.labels] * 2, r.metas)
    args = ["evaluate", "--synthetic", str(tmp_path / "set"), "--prepared", str(prep_dir), "--nets", "convnet3",
            "--seeds", "0,1,2", "--epochs", "2", "-S", "evaluate.test_batch_size=64", "--device", "cpu"]
    env = _env(tmp_path)
    one = subprocess.run([str(BIN / "moedd"), *args, "--metrics", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "moedd.cli", *args,
                          "--metrics", str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["nets"] == b["nets"] and len(b["nets"]["convnet3"]["accs"]) == 3
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
    stages = [x for x in runs if x.info.run_name.startswith("evaluate ")]
    assert len(stages) == 2  # one per launch: rank 1 tracked nothing

    def seed_runs(stage):  # stage run -> network run -> one run per (network, seed) unit
        nets = {x.info.run_id for x in runs if x.data.tags.get("mlflow.parentRunId") == stage.info.run_id}
        return sorted((x for x in runs if x.data.tags.get("mlflow.parentRunId") in nets), key=lambda x: x.info.run_name)

    per_launch = [seed_runs(st) for st in stages]
    assert [len(u) for u in per_launch] == [3, 3]  # every unit logged once, by rank 0
    # the units rank 1 trained have their training curves too (gathered), as in one process
    assert [sorted(u.data.metrics) for u in per_launch[0]] == [sorted(u.data.metrics) for u in per_launch[1]]


def _rank_grads(rank: int, world: int, init: str, feats: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from moedd.moe.dcor import ranked_diversity_term

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        local = feats[rank:rank + 1].clone().requires_grad_(True)  # expert `rank` lives on rank `rank`
        term, dcor = ranked_diversity_term(local, 0.1, "bias_corrected")
        term.backward()
        torch.save({"grad": local.grad, "dcor": dcor}, f"{out}.{rank}")
        dist.barrier()  # both ranks done talking before either leaves: gloo aborts a rank whose peer left
    finally:
        dist.destroy_process_group()


def test_the_diversity_gradient_on_two_ranks_is_the_joint_one(tmp_path: Path) -> None:
    """Two experts on two ranks (gloo): each expert's gradient of λ·dCor equals the one-process
    joint gradient bit for bit (each rank adds half the term; the gather's backward sums two equal
    halves, which is exact), and both ranks see the joint dCor."""
    import torch.multiprocessing as mp

    from moedd.moe.dcor import diversity_term

    feats = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    joint = feats.clone().requires_grad_(True)
    term, dcor = diversity_term(joint, 0.1, "bias_corrected")
    term.backward()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank_grads, args=(2, init, feats, str(tmp_path / "g")), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'g'}.{rank}", weights_only=True)
        assert torch.equal(got["grad"][0], joint.grad[rank])
        assert torch.equal(got["dcor"], dcor)


def test_teachers_on_two_ranks_are_the_one_process_teachers(tmp_path: Path) -> None:
    """`moedd trajectories` under torchrun: each rank trains every other (shard, teacher); the files
    and meta.json are the one-process run's (a teacher depends on its seed and shard only)."""
    from tinydata import make_image_folder

    folder = make_image_folder(tmp_path / "folder", train_per_class=16, test_per_class=4, size=8)
    env = _env(tmp_path)
    moedd = str(BIN / "moedd")
    common = ["-S", "experts.mtt.preset=none", "-S", "distill.budget=4", "-S", "trajectories.num_teachers=2",
              "-S", "trajectories.epochs=2", "-S", "trajectories.batch_size=16", "-S", "trajectories.test_batch_size=64",
              "-S", "experts.mtt.zca=false", "-S", "trajectories.device=cpu"]
    for cmd in (["prepare", "--out", str(tmp_path / "prep"), "-S", "data.source=imagefolder", "-S", f"data.root={folder}",
                 "-S", "data.download=false"],
                ["partition", "--noe", "2", "--prepared", str(tmp_path / "prep"), "--out", str(tmp_path / "noe2.pt")]):
        done = subprocess.run([moedd, *cmd], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    args = ["trajectories", "--noe", "2", "--prepared", str(tmp_path / "prep"), "--partition", str(tmp_path / "noe2.pt"),
            *common]
    one = subprocess.run([moedd, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "moedd.cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / n / "meta.json").read_text()) for n in ("one", "two"))
    assert a == b and len(a["fingerprints"]) == 2 and all(len(f) == 2 for f in a["fingerprints"])
    for k in (0, 1):
        for i in (0, 1):
            ta, tb = (torch.load(tmp_path / n / f"shard{k}" / f"teacher{i:03d}.pt", weights_only=True)["trajectory"]
                      for n in ("one", "two"))
            assert torch.equal(ta, tb)


def _rank_distill(rank: int, world: int, init: str, name: str, overrides: dict, prepared, part, ck: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from moedd.distributed import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        r = run_distillation(name, tiny_params(**overrides), prepared, part, torch.device("cpu"),
                             checkpoint_dir=Path(ck), ranks=Ranks(rank, world, 0))
        torch.save({"images": r.images, "history": r.history}, f"{out}.{rank}")
        dist.barrier()  # both ranks done talking before either leaves: gloo aborts a rank whose peer left
    finally:
        dist.destroy_process_group()


def _one_and_two(name: str, overrides: dict, prepared, tmp_path: Path):
    """The one-process run (one thread) and the two-rank run (one thread per rank) of 2 experts."""
    import torch.multiprocessing as mp

    part = make_partition(prepared.train_labels, prepared.num_classes, 2, 0, prepared.digest)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels of a rank
    try:
        one = run_distillation(name, tiny_params(**overrides), prepared, part, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank_distill, args=(2, init, name, overrides, prepared, part, str(tmp_path / "ck"),
                                            str(tmp_path / "r")), nprocs=2, start_method="spawn")
    two = [torch.load(f"{tmp_path / 'r'}.{rank}", weights_only=False) for rank in (0, 1)]
    return one, two


@pytest.mark.parametrize("name, overrides", [
    ("dm", {"distill.budget": 8, "distill.dcor_weight": 0.5, "experts.dm.iterations": 4}),
    # IDC's grouped pass (its default) convolves NoE·classes groups at once: a rank's half as many
    # groups get other kernels, so other summation orders (the sets then differ by rounding:
    # docs/design.md §11); class by class, every kernel is the one-process kernel
    ("idc", {"distill.budget": 8, "distill.dcor_weight": 0.5, "experts.idc.match_pass": "per_class"}),
    ("idm", {"distill.budget": 8, "distill.dcor_weight": 0.5, "experts.idm.iterations": 3}),
])
def test_experts_on_two_ranks_give_the_one_process_set(name: str, overrides: dict, tiny_prepared, tmp_path: Path) -> None:
    """NoE=2 with one expert per rank (gloo): each rank draws exactly its expert's random numbers of
    the one-process run, the diversity term spans the ranks (each rank's gradient from it is the
    joint one bit for bit: two equal halves summed), and an expert's own loss never mixes the
    two experts' numbers. Both ranks end with the one-process images, bit for bit; the merged
    curves carry the same keys, each expert's loss equal, sums over experts within rounding."""
    one, two = _one_and_two(name, overrides, tiny_prepared, tmp_path)
    for got in two:
        assert torch.equal(got["images"], one.images)
        assert len(got["history"]) == len(one.history)
        for a, b in zip(one.history, got["history"], strict=True):
            assert a.keys() == b.keys()
            assert all(a[k] == b[k] for k in a if k.startswith("match_e") or k == "dcor")
            assert all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)
    ck = tmp_path / "ck"
    assert not ck.exists() or not list(ck.iterdir())  # every rank's checkpoint is gone once the set is made


def _prepare(folder: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    """`moedd prepare` of the image folder into tmp_path/prep."""
    prep = tmp_path / "prep"
    done = subprocess.run([str(BIN / "moedd"), "prepare", "--out", str(prep), "-S", "data.source=imagefolder", "-S",
                           f"data.root={folder}", "-S", "data.download=false"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return prep


def _worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` whose command line holds ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and marker in cmd and "moedd.cli" in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_killed_rank_stops_the_run_and_the_same_command_resumes(tiny_folder: Path, tmp_path: Path) -> None:
    """`moedd distill --nproc 2` (torchrun, gloo): SIGKILL one rank after the first checkpoint; the
    launch ends with an error (no hang); the same command resumes from the checkpoint every rank
    holds and writes the one-process set, bit for bit. Rank 0 alone tracked: one stage run per
    launch, each expert's child run has one loss per iteration."""
    import signal
    import time

    env = _env(tmp_path)
    moedd = str(BIN / "moedd")
    prep = _prepare(tiny_folder, tmp_path, env)
    iters = 60
    args = ["distill", "--expert", "dm", "--noe", "2", "--prepared", str(prep), "--device", "cpu",
            "-S", "distill.budget=8", "-S", f"experts.dm.iterations={iters}", "-S", "experts.dm.batch_real=8",
            "-S", "distill.checkpoint_every=2", "-S", "distill.log_every=1"]
    one = subprocess.run([moedd, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    two = [moedd, *args, "--nproc", "2", "--out", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.json")]
    first = subprocess.Popen(two, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ck = tmp_path / "ck"
    deadline = time.monotonic() + 300
    while not list(ck.glob("*rank1of2-it*.pt")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = _worker_pid(str(tmp_path / "two"), 1)
    assert pid is not None and first.poll() is None, "the run ended before a rank could be killed"
    os.kill(pid, signal.SIGKILL)
    out, _ = first.communicate(timeout=240)  # torchrun stops the other rank: no hang
    assert first.returncode != 0, out
    assert list(ck.glob("*rank0of2-it*.pt")) and list(ck.glob("*rank1of2-it*.pt"))
    again = subprocess.run(two, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "two.json").read_text())["resumed_from"] > 0
    for k in (0, 1):
        a, b = (torch.load(tmp_path / n / f"expert-{k}.pt", weights_only=True)["images"] for n in ("one", "two"))
        assert torch.equal(a, b)
    assert not list(ck.glob("*.pt"))
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
    stages = [x for x in runs if x.info.run_name.startswith("distill ")]
    assert len(stages) == 3  # one process, the killed launch, the resumed launch: never one per rank
    last = max(stages, key=lambda x: x.info.start_time)
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == last.info.run_id]
    assert sorted(x.info.run_name for x in children) == ["expert 0", "expert 1"]
    client = mlflow.MlflowClient()
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert sorted(steps) == list(range(iters))  # the curve so far, then the rest: each step once


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port."""
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
        time.sleep(0.5)


def test_two_nodes_on_loopback_distill_the_one_process_set_and_log_to_an_mlflow_server(
        tiny_folder: Path, tmp_path: Path) -> None:
    """Two torchrun launches with `--nnodes 2` and a c10d rendezvous on 127.0.0.1 (two "machines",
    one rank each) distill the one-process set bit for bit; both track to a real `mlflow server`,
    where the launch has one stage run (rank 0's) with each expert's child run and curve."""
    import signal

    env = _env(tmp_path)
    server, uri = _mlflow_server(tmp_path, env)
    env["MLFLOW_TRACKING_URI"] = uri
    try:
        moedd = str(BIN / "moedd")
        prep = _prepare(tiny_folder, tmp_path, env)
        args = ["distill", "--expert", "dm", "--noe", "2", "--prepared", str(prep), "--device", "cpu",
                "-S", "distill.budget=8", "-S", "experts.dm.iterations=4", "-S", "experts.dm.batch_real=8"]
        one = subprocess.run([moedd, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                             timeout=600)
        assert one.returncode == 0, one.stdout + one.stderr
        rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "moedd-test",
                "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
        nodes = [subprocess.Popen([str(BIN / "torchrun"), *rdzv, "-m", "moedd.cli", *args, "--out", str(tmp_path / "two")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outs = [n.communicate(timeout=600)[0] for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], outs
        for k in (0, 1):
            a, b = (torch.load(tmp_path / n / f"expert-{k}.pt", weights_only=True)["images"] for n in ("one", "two"))
            assert torch.equal(a, b)
        import mlflow

        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["moedd"], output_format="list")
        stages = sorted((x for x in runs if x.info.run_name.startswith("distill ")), key=lambda x: x.info.start_time)
        assert len(stages) == 2 and all(s.info.status == "FINISHED" for s in stages)  # one process; two nodes, once
        children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == stages[1].info.run_id]
        assert sorted(x.info.run_name for x in children) == ["expert 0", "expert 1"]
        client = mlflow.MlflowClient()
        for child in children:
            assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [0, 1, 2, 3]
            assert client.list_artifacts(child.info.run_id)  # its image grid went through the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_distill_nproc_from_params_runs_a_run_it_cannot_spread_in_one_process(tiny_folder: Path, tmp_path: Path) -> None:
    """`distill.nproc` is one setting for every distill stage of a grid: NoE=1 (nothing to share)
    runs in one process with a note, and writes its set; `--nproc` for the same run is an error."""
    env = _env(tmp_path)
    moedd = str(BIN / "moedd")
    prep = _prepare(tiny_folder, tmp_path, env)
    args = ["distill", "--expert", "dm", "--noe", "1", "--prepared", str(prep), "--device", "cpu", "-S", "distill.budget=4",
            "-S", "experts.dm.iterations=2", "-S", "experts.dm.batch_real=8", "--out", str(tmp_path / "set")]
    quiet = subprocess.run([moedd, *args, "-S", "distill.nproc=2"], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    said = " ".join((quiet.stdout + quiet.stderr).split())  # the console wraps long lines
    assert "2 ranks do not divide NoE=1" in said and "running in one process" in said
    assert (tmp_path / "set" / "expert-0.pt").exists()
    loud = subprocess.run([moedd, *args, "--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 1 and "2 ranks do not divide NoE=1" in loud.stdout + loud.stderr
