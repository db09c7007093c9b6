"""MTT teacher trajectories: shapes, seeding, ZCA, resumability, the CLI stage, config checks.

Real ConvNet-3 teachers on 8x8 generated images (3 classes, 16 train / 4 test per class): 8x8
keeps the ZCA fit (D = 192) and the training to fractions of a second on a busy CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import Interrupt, tiny_params
from moedd.config import ConfigError
from moedd.params import load_params
from moedd.data import load_prepared, load_source, make_partition, save_partition, save_prepared
from moedd.data.zca import fit_zca, load_zca
from moedd.nets import create_net
from moedd.trajectories import (
    flat_params,
    input_space,
    load_trajectories,
    mtt_config,
    teacher_epochs,
    teacher_path,
    teacher_seed,
    train_teachers,
)
from tinydata import make_image_folder

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("small") / "folder", train_per_class=16, test_per_class=4, size=8)


@pytest.fixture(scope="module")
def small_prepared(small_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("small-prepared") / "prepared"
    save_prepared(load_source("imagefolder", small_folder), out)
    return load_prepared(out)


@pytest.fixture(scope="module")
def part2(small_prepared):
    return make_partition(small_prepared.train_labels, small_prepared.num_classes, 2, 0, small_prepared.digest)


def _params(**overrides):
    """Tiny teachers: 2 per shard, 2 epochs, ZCA on (MTT's default), no preset table."""
    base = {"data.source": "imagefolder", "experts.mtt.preset": "none", "trajectories.num_teachers": 2,
            "trajectories.epochs": 2, "trajectories.batch_size": 16, "trajectories.test_batch_size": 64}
    return tiny_params(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(small_prepared, part2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete, uninterrupted run (ZCA space)."""
    out = tmp_path_factory.mktemp("traj") / "noe2"
    train_teachers(_params(), small_prepared, part2, out, CPU)
    return out


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------- settings


def test_teacher_epochs_follow_the_effective_mtt_config() -> None:
    p = _params(**{"trajectories.epochs": None, "experts.mtt.max_start_epoch": 3, "experts.mtt.expert_epochs": 2})
    assert teacher_epochs(p, 2) == 5
    assert teacher_epochs(_params(**{"trajectories.epochs": 7}), 2) == 7
    real = load_params(REPO / "params.yaml", {"trajectories.epochs": None})  # presets.mtt.cifar10 rows
    assert [teacher_epochs(real, ipc, "cifar10") for ipc in (1, 10, 50)] == [2 + 2, 20 + 2, 40 + 2]
    assert mtt_config(real, 50, "cifar10").zca is False and mtt_config(real, 10, "cifar10").zca is True


def test_mtt_noe_must_be_partitioned_by_grid_noe() -> None:
    with pytest.raises(ConfigError, match=r"grid.mtt_noe lists NoE 4 but grid.noe does not"):
        load_params(None, {"distill.budget": 4, "grid.budgets": [4], "grid.noe": [1, 2], "grid.mtt_noe": [4]})
    assert load_params(None, {"distill.budget": 4, "grid.noe": [1, 2], "grid.mtt_noe": [2]}).grid.mtt_noe == [2]


# ---------------------------------------------------------------- what is stored


def test_layout_shapes_and_meta(trained: Path, small_prepared, part2) -> None:
    traj = load_trajectories(trained)
    net = create_net("convnet3", 3, channels=3, image_size=8)
    p = sum(x.numel() for x in net.parameters())
    m = traj.meta
    assert (m["noe"], m["num_teachers"], m["epochs"], m["net"], m["space"]) == (2, 2, 2, "convnet3", "zca")
    assert m["param_count"] == p and m["zca_digest"] == traj.zca.digest
    assert m["data_digest"] == small_prepared.digest and m["partition_digest"] == part2.digest
    assert all(0.0 <= a <= 1.0 for shard in m["test_acc"] for a in shard) and len(m["test_acc"]) == 2
    assert (trained / "zca.pt").exists() and (trained / "meta.json").exists()
    assert sorted(f.relative_to(trained).as_posix() for f in trained.glob("shard*/*")) == [
        "shard0/teacher000.pt", "shard0/teacher001.pt", "shard1/teacher000.pt", "shard1/teacher001.pt"]
    for k in range(2):
        assert traj.count(k) == 2
        for i in range(2):
            t = traj.load(k, i)
            assert t.shape == (3, p) and t.dtype == torch.float32


def test_first_row_is_the_seeded_init_and_training_moves_it(trained: Path) -> None:
    traj = load_trajectories(trained)
    for k in range(2):
        for i in range(2):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(teacher_seed(0, k, i))
                fresh = flat_params(create_net("convnet3", 3, channels=3, image_size=8))
            t = traj.load(k, i)
            assert torch.equal(t[0], fresh)
            assert all((t[e + 1] - t[e]).abs().max() > 0 for e in range(2))  # every epoch moves it
    assert not torch.equal(traj.load(0, 0)[0], traj.load(0, 1)[0])  # distinct seeds per teacher
    assert not torch.equal(traj.load(0, 0)[0], traj.load(1, 0)[0])  # ... and per shard
    assert teacher_seed(0, 1, 2) == teacher_seed(0, 1, 2) != teacher_seed(1, 1, 2)


# ---------------------------------------------------------------- ZCA


def _correlated_u8(n: int = 400, shape: tuple[int, ...] = (3, 2, 2)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    d = int(torch.tensor(shape).prod())
    mix = torch.randn(d, d, generator=g)
    x = torch.randn(n, d, generator=g) @ mix * 20 + 128
    return x.clamp(0, 255).round().to(torch.uint8).view(n, *shape)


def test_zca_whitens_inverts_and_is_deterministic(tmp_path: Path) -> None:
    x = _correlated_u8()
    zca = fit_zca(x, eps=1e-6, data_digest="abc")
    z = zca.apply_u8(x).reshape(len(x), -1).double()
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(cov.shape[0], dtype=torch.float64), atol=1e-3)
    x01 = x.float() / 255
    assert torch.allclose(zca.invert(zca.apply(x01)), x01, atol=1e-4)
    again = fit_zca(x, eps=1e-6, data_digest="abc")
    assert again.digest == zca.digest and torch.equal(again.eigvecs, zca.eigvecs)
    assert fit_zca(x, eps=0.1, data_digest="abc").digest != zca.digest
    zca.save(tmp_path / "zca.pt")
    assert load_zca(tmp_path / "zca.pt").digest == zca.digest


def test_teachers_zca_is_fitted_on_the_full_training_set(trained: Path, small_prepared) -> None:
    zca = load_trajectories(trained).zca
    assert (zca.n_fit, zca.data_digest, zca.eps) == (len(small_prepared.train_images), small_prepared.digest, 0.1)
    space = input_space(mtt_config(_params(), 2), small_prepared)
    assert space.zca_digest == zca.digest
    plain = input_space(mtt_config(_params(**{"experts.mtt.zca": False}), 2), small_prepared)
    x = small_prepared.test_images[:4]
    m = torch.tensor(small_prepared.mean).view(1, 3, 1, 1)
    s = torch.tensor(small_prepared.std).view(1, 3, 1, 1)
    assert plain.kind == "normalized" and torch.allclose(plain.apply(x, CPU), (x.float() / 255 - m) / s)


# ---------------------------------------------------------------- resume


def test_interrupted_run_keeps_finished_teachers(trained: Path, small_prepared, part2, tmp_path: Path) -> None:
    out = tmp_path / "noe2"

    def stop_after_first(rec) -> None:
        if (rec.shard, rec.index) == (0, 0):
            raise Interrupt

    with pytest.raises(Interrupt):
        train_teachers(_params(), small_prepared, part2, out, CPU, on_teacher=stop_after_first)
    first = teacher_path(out, 0, 0)
    assert first.exists() and not teacher_path(out, 0, 1).exists()
    with pytest.raises(ConfigError, match="no complete teacher trajectories"):
        load_trajectories(out)  # no meta.json yet
    before = _bytes(first)
    result = train_teachers(_params(), small_prepared, part2, out, CPU)
    assert (result.skipped, result.trained) == (1, 3)
    assert _bytes(first) == before
    resumed, full = load_trajectories(out), load_trajectories(trained)
    assert resumed.meta == full.meta  # the same teachers as an uninterrupted run
    assert torch.equal(resumed.load(1, 1), full.load(1, 1))


def test_changed_config_retrains_and_more_teachers_keep_the_old(trained: Path, small_prepared, part2, tmp_path: Path) -> None:
    out = tmp_path / "noe2"
    shutil.copytree(trained, out)
    old = {(k, i): _bytes(teacher_path(out, k, i)) for k in range(2) for i in range(2)}

    more = train_teachers(_params(**{"trajectories.num_teachers": 3, "trajectories.device": "cpu"}), small_prepared, part2, out, CPU)
    assert (more.skipped, more.trained) == (4, 2)
    assert all(_bytes(teacher_path(out, k, i)) == b for (k, i), b in old.items())

    other = train_teachers(_params(**{"trajectories.lr": 0.02}), small_prepared, part2, out, CPU)
    assert (other.skipped, other.trained) == (0, 4)
    assert all(_bytes(teacher_path(out, k, i)) != b for (k, i), b in old.items())
    assert not teacher_path(out, 0, 2).exists()  # back to 2 teachers: the third is gone

    plain = train_teachers(_params(**{"trajectories.lr": 0.02, "experts.mtt.zca": False}), small_prepared, part2, out, CPU)
    assert plain.trained == 4 and plain.meta["space"] == "normalized" and plain.meta["zca_digest"] is None
    assert not (out / "zca.pt").exists() and load_trajectories(out).zca is None


def test_incomplete_or_foreign_directories_are_refused(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "noe2"
    shutil.copytree(trained, out)
    shutil.copy(teacher_path(out, 0, 1), teacher_path(out, 0, 0))  # a teacher of other inputs
    with pytest.raises(ValueError, match="does not belong"):
        load_trajectories(out).load(0, 0)
    teacher_path(out, 1, 1).unlink()
    with pytest.raises(ConfigError, match="incomplete: 1 teacher file"):
        load_trajectories(out)


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def _cli_setup(tmp_path: Path, folder: Path, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from moedd.cli.main import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": str(folder)},
        "distill": {"budget": 4, "dcor_estimator": "v_statistic"},
        "experts": {"mtt": {"preset": "none"}},
        "trajectories": {"num_teachers": 2, "epochs": 2, "batch_size": 16, "test_batch_size": 64},
        "mlflow": {"tracking_uri": uri},
    }))
    assert runner.invoke(app, ["prepare", "--out", "data/prepared"]).exit_code == 0


def test_cli_trains_writes_and_logs(small_folder: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from moedd.cli.main import app

    _cli_setup(tmp_path, small_folder, mlflow_uri, monkeypatch)
    assert runner.invoke(app, ["partition", "--noe", "2"]).exit_code == 0
    args = ["trajectories", "--noe", "2", "--metrics", "metrics/trajectories/noe2.json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    traj = load_trajectories("data/trajectories/noe2")
    assert traj.meta["space"] == "zca" and traj.load(1, 1).shape[0] == 3
    summary = json.loads(Path("metrics/trajectories/noe2.json").read_text())
    assert (summary["noe"], summary["num_teachers"], summary["epochs"], summary["trained"]) == (2, 2, 2, 4)
    again = runner.invoke(app, args)  # everything is kept
    assert again.exit_code == 0 and json.loads(Path("metrics/trajectories/noe2.json").read_text())["skipped"] == 4

    mlflow.set_tracking_uri(mlflow_uri)
    runs = [r for r in mlflow.search_runs(experiment_names=["moedd"], output_format="list")
            if r.info.run_name == "trajectories 2x2"]
    assert len(runs) == 2
    client = mlflow.MlflowClient()
    for run in runs:
        assert run.data.params["zca"] == "True" and run.data.params["epochs"] == "2" and run.data.params["ipc"] == "2"
        assert run.data.params["trajectories.num_teachers"] == "2" and run.data.tags["stage"] == "trajectories"
        assert "test_acc.shard1.teacher001" in run.data.metrics and "test_acc_mean" in run.data.metrics
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_acc.shard0.teacher000")]
        assert steps == [1, 2]  # a resumed run logs the kept teachers' curves too
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"prepared", "partition-noe2"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["trajectories", "--noe", "3"], "not divisible by NoE=3"),
        (["trajectories", "--noe", "2", "--partition", "nowhere.pt"], "run `moedd partition` first"),
        (["trajectories", "--noe", "2", "-S", "distill.budget=40"], "larger than the smallest class"),
        (["trajectories", "--noe", "2", "--partition", "foreign.pt"], "made from other data"),
        (["trajectories", "--noe", "2", "-S", "experts.mtt.preset=cifar100"], "no such preset"),
    ],
)
def test_cli_bad_input_is_one_line_before_training(
    args: list[str], fragment: str, small_folder: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moedd.cli.main import app

    _cli_setup(tmp_path, small_folder, mlflow_uri, monkeypatch)
    prep = load_prepared("data/prepared")
    save_partition(make_partition(prep.train_labels, 3, 2, 0, prep.digest), Path("data/partitions/noe2.pt"))
    save_partition(make_partition(prep.train_labels, 3, 2, 0, "other-data"), Path("foreign.pt"))
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    assert not Path("data/trajectories").exists()  # refused before any training
