"""Evaluation spread over the ranks of a real ``torchrun`` launch (gloo on the CPU, 2 ranks): each
rank trains its share of the (network, seed) units, rank 0 writes the metrics and tracks; the
accuracies are the one-process run's. Both runs use one thread per process, so every unit runs
the same kernels in both (a unit is deterministic given its seed and its kernels)."""

from __future__ import annotations

import json
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
