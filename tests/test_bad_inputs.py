"""Bad inputs to the CLI: each one is refused with exactly one line and exit code 1, before any work.

One parametrized test over a list of bad inputs, run in-process through Typer's CliRunner against
real files: a prepared store, a partition and valid synthetic sets made once per module with the
real `moedd prepare / partition / distill` at tiny size, and copies of a set that are corrupted,
stripped of their digest or made from another dataset. "Before any work" is checked as: nothing
was written anywhere (neither in the case's working directory, which holds its MLflow store and
checkpoint root, nor next to the shared inputs), so no MLflow run was started and no output or
checkpoint was made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
import yaml
from typer.testing import CliRunner

from moedd.cli.main import app
from tinydata import TINY_CLASSES

runner = CliRunner()


def _write_params(where: Path, folder: Path) -> Path:
    """A tiny, valid params.yaml whose MLflow store lives in ``where``."""
    f = where / "params.yaml"
    f.write_text(yaml.safe_dump({
        "data": {"source": "imagefolder", "root": str(folder)},
        "distill": {"budget": 4, "log_every": 1, "dcor_estimator": "v_statistic"},
        "experts": {"dm": {"iterations": 2, "batch_real": 8}},
        "evaluate": {"nets": ["convnet3"], "seeds": [0], "epochs": 1, "test_batch_size": 64},
        "mlflow": {"tracking_uri": f"sqlite:///{where / 'mlflow.db'}"},
    }))
    return f


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def _copy_set(src: Path, dst: Path, edit=None) -> None:
    """Copy a synthetic set; ``edit(meta_dict)`` rewrites expert-0.json of the copy."""
    shutil.copytree(src, dst)
    if edit is not None:
        f = dst / "expert-0.json"
        meta = json.loads(f.read_text())
        edit(meta)
        f.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared valid inputs, made once: prepared stores, a partition, synthetic sets and bad copies."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        _write_params(root, tiny_folder)
        _ok(["prepare", "--out", "prepared"])
        _ok(["partition", "--noe", "2", "--prepared", "prepared", "--out", "noe2.pt"])
        _ok(["distill", "--expert", "random", "--noe", "2", "--prepared", "prepared", "--partition", "noe2.pt",
             "--out", "sets/good"])
        # another dataset: the same images under other class names
        other = root / "other_folder"
        shutil.copytree(tiny_folder, other)
        for split in ("train", "test"):
            for name in TINY_CLASSES:
                (other / split / name).rename(other / split / f"not-{name}")
        _ok(["prepare", "--source", "imagefolder", "--root", str(other), "--out", "other_prepared"])
        _ok(["distill", "--expert", "random", "--noe", "2", "--prepared", "other_prepared", "--out", "sets/other"])

    good = root / "sets/good"
    shutil.copytree(good, root / "sets/corrupt")
    pt = root / "sets/corrupt/expert-1.pt"
    blob = bytearray(pt.read_bytes())
    blob[-100] ^= 0xFF  # one byte of the tensor data, the file still loads
    pt.write_bytes(bytes(blob))
    _copy_set(good, root / "sets/nodigest", lambda m: m.pop("sha256"))
    _copy_set(good, root / "sets/emptydigest", lambda m: m.update(sha256=""))
    _copy_set(good, root / "sets/badmeta", lambda m: m.update(ipc="many"))
    (root / "malformed.yaml").write_text("data: [1,2\n")
    (root / "list.yaml").write_text("- distill\n- budget\n")
    (root / "typo.yaml").write_text("distil:\n  budget: 4\n")
    return root


D = ["distill", "--prepared", "{w}/prepared", "--partition", "{w}/noe2.pt", "--out", "{cwd}/out"]
DM = [*D, "--expert", "dm", "--noe", "2"]
EV = ["evaluate", "--prepared", "{w}/prepared", "--metrics", "{cwd}/out/m.json"]
GOOD = ["--synthetic", "{w}/sets/good"]
PART = ["partition", "--prepared", "{w}/prepared", "--out", "{cwd}/out/p.pt"]

CASES = {
    # names that are not registered
    "unknown expert": ([*D, "--expert", "gm", "--noe", "2"], "unknown expert 'gm'"),
    "unknown expert in a mixture": ([*D, "--expert", "idc,gm", "--noe", "2"], "unknown expert 'gm'"),
    "mixture of the wrong size": ([*D, "--expert", "idc,idm,dm", "--noe", "2"], "names 3 methods for 2 experts"),
    "trajectories for a mixture without MTT": (["trajectories", "--noe", "2", "--expert", "idm,dm", "--out", "{cwd}/out"],
                                               "no method of it needs teacher trajectories"),
    "unknown eval network": ([*EV, *GOOD, "--nets", "convnet3,lenet9"], "unknown network 'lenet9'"),
    "unknown distill network": ([*DM, "-S", "distill.net=lenet9"], "unknown network 'lenet9'"),
    "unknown dataset source": (["prepare", "--source", "mnist", "--out", "{cwd}/out"], "unknown dataset source 'mnist'"),
    "unknown DSA group (distill)": ([*DM, "-S", "experts.dm.dsa_strategy=color_blur"], "unknown DSA group"),
    "unknown DSA group (evaluate)": ([*EV, *GOOD, "-S", "evaluate.dsa_strategy=crop_warp"], "unknown DSA group"),
    "unknown device": ([*DM, "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
    "unknown fusion": ([*EV, *GOOD, "--fusion", "blend"], "fusion.kind"),
    # budget, NoE and IPC against the data
    "budget not divisible by NoE": ([*D, "--expert", "dm", "--noe", "3"], "not divisible by NoE=3"),
    "NoE 0": ([*PART, "--noe", "0"], "number of experts must be >= 1"),
    "IPC above smallest shard class (distill)": ([*DM, "--budget", "40"], "larger than the smallest class"),
    "IPC above smallest shard class (partition)": ([*PART, "--noe", "2", "-S", "distill.budget=40"],
                                                   "larger than the smallest class"),
    "partition of another NoE": ([*D, "--expert", "dm", "--noe", "1"], "has 2 shards but --noe is 1"),
    "ranks that do not divide NoE": ([*DM, "--nproc", "3"], "3 ranks do not divide NoE=2"),
    "a mixture on ranks": ([*D, "--expert", "dm,idm", "--noe", "2", "--nproc", "2"], "cannot run its experts on ranks yet"),
    "no processes": ([*DM, "--nproc", "0"], "invalid distill.nproc"),
    "trajectories: budget not divisible": (["trajectories", "--noe", "3", "--out", "{cwd}/out"], "not divisible by NoE=3"),
    # values
    "negative iterations": ([*DM, "-S", "experts.dm.iterations=-5"], "invalid experts.dm.iterations"),
    "negative budget": ([*DM, "--budget=-4"], "invalid distill.budget"),
    "negative epochs": ([*EV, *GOOD, "--epochs=-1"], "invalid evaluate.epochs"),
    "non-numeric value": ([*DM, "-S", "experts.dm.lr_img=fast"], "invalid experts.dm.lr_img"),
    "fractional budget": ([*DM, "-S", "distill.budget=4.5"], "invalid distill.budget"),
    "repeated seeds": ([*EV, *GOOD, "--seeds", "0,0"], "distinct seeds"),
    "MTT in grid.experts": ([*DM, "-S", "grid.experts=[dm,mtt]"], "MTT has its own stages"),
    "MLflow file store": ([*DM, "-S", "mlflow.tracking_uri=./mlruns"], "the file store is deprecated"),
    # -S syntax and keys
    "unknown key in -S": ([*DM, "-S", "experts.dm.iteratons=5"], "unknown key experts.dm.iteratons: no such setting"),
    "unknown section in -S": ([*DM, "-S", "expert.dm.iterations=5"], "unknown key expert:"),
    "-S without =": ([*DM, "-S", "experts.dm.iterations"], "-S expects key=value"),
    "-S value not YAML": ([*EV, *GOOD, "-S", "evaluate.nets=[convnet3"], "not valid YAML"),
    # params files
    "missing --params file": ([*DM, "--params", "{cwd}/nope.yaml"], "nope.yaml not found"),
    "malformed params file": ([*DM, "--params", "{w}/malformed.yaml"], "malformed.yaml is not valid YAML at line 2, column 1"),
    "params file not a mapping": ([*DM, "--params", "{w}/list.yaml"], "must hold a mapping of sections"),
    "params file with a typo'd section": ([*DM, "--params", "{w}/typo.yaml"], "unknown key distil:"),
    "params path is a directory": ([*DM, "--params", "{w}/sets"], "is not a file"),
    # missing inputs
    "missing prepared store": ([*PART, "--noe", "2", "--prepared", "{cwd}/missing"], "run `moedd prepare` first"),
    "missing trajectories for mtt (given)": ([*D, "--expert", "mtt", "--noe", "2", "--trajectories", "{cwd}/nowhere"],
                                             "run `moedd trajectories --noe 2` first"),
    "missing trajectories for mtt (default)": ([*D, "--expert", "mtt", "--noe", "2"], "run `moedd trajectories --noe 2` first"),
    "missing image folder": (["prepare", "--source", "imagefolder", "--root", "{cwd}/nowhere", "--out", "{cwd}/out"],
                             "must contain train/<class>/ and test/<class>/"),
    "missing synthetic set": ([*EV, "--synthetic", "{cwd}/nowhere"], "no synthetic set"),
    "no metrics to report": (["report", "--metrics-dir", "{cwd}/nothing", "--out", "{cwd}/out/t.md"], "no evaluation metrics"),
    # synthetic sets that must not be used
    "set of another dataset": ([*EV, "--synthetic", "{w}/sets/other"], "classes"),
    "corrupted set": ([*EV, "--synthetic", "{w}/sets/corrupt"], "does not match the sha256"),
    "set without digest": ([*EV, "--synthetic", "{w}/sets/nodigest"], "no sha256 in expert-0.json"),
    "set with an empty digest": ([*EV, "--synthetic", "{w}/sets/emptydigest"], "re-create the set with `moedd distill"),
    "set with invalid metadata": ([*EV, "--synthetic", "{w}/sets/badmeta"], "expert-0.json is not valid synthetic-set metadata"),
    "show a corrupted set": (["show", "{w}/sets/corrupt", "--out", "{cwd}/out"], "does not match the sha256"),
}


def _snapshot(*dirs: Path) -> dict[Path, tuple[int, int]]:
    """Every path under ``dirs`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for d in dirs for p in d.rglob("*")}


@pytest.mark.parametrize(("args", "fragment"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_1_and_no_work(
    args: list[str], fragment: str, world: Path, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command exits 1 with exactly one line, the error, and leaves every directory as it was."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(cwd))  # the default checkpoint root
    _write_params(cwd, tiny_folder)
    before = _snapshot(cwd, world)

    result = runner.invoke(app, [a.format(w=world, cwd=cwd) for a in args])

    out = click.unstyle(result.output)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    assert result.exit_code == 1, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # typer.Exit(1), not a crash
    assert "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert fragment in lines[0], out
    assert _snapshot(cwd, world) == before, "the command wrote files before failing"
    assert not (cwd / "mlflow.db").exists() and not (cwd / "out").exists()
