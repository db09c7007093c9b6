"""`moedd plan`: counts from the params times unit costs measured on this device (cached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_params
from moedd.cli.main import app
from moedd.plan import PROBE_BATCHES, Calibration, DataShape, UnitCosts, device_key, plan, total

CPU = torch.device("cpu")
DATA = DataShape("tiny", None, num_train=600, num_test=100, num_classes=3, shape=(3, 32, 32))


def _grid(**over):
    return tiny_params(**{"datasets": {"tiny": {"source": "imagefolder"}}, "grid.datasets": ["tiny"], "grid.budgets": [4], "grid.experts": ["dm"],
                          "grid.baselines": ["random"], "grid.noe": [2, 1], "grid.mtt_noe": [],
                          "experts.dm.iterations": 50, "evaluate.epochs": 10, "evaluate.nets": ["convnet3"],
                          "evaluate.seeds": [0, 1], "evaluate.batch_size": 256, "full_data.epochs": 3,
                          "full_data.seeds": [0], **over})


def test_the_plan_is_counts_times_unit_costs(tmp_path: Path) -> None:
    """With known unit costs in the cache (nothing measured), every stage is the arithmetic of its
    counts: a step costs 0.01 s at any batch, a test image 1e-4 s, a DM iteration 0.5 s."""
    params = _grid()
    dsa = params.evaluate.dsa_strategy
    costs = {f"step|convnet3|{DATA.shape}|3|{b}|{dsa}": 0.01 for b in PROBE_BATCHES}
    costs[f"test|convnet3|{DATA.shape}|3|{params.evaluate.test_batch_size}"] = 1e-4
    from moedd.params import method_config

    for noe, ipc in ((2, 2), (1, 4)):
        cfg, _ = method_config(params, "dm", ipc, None)
        key = f"iteration|dm|{DATA.shape}|3|noe{noe}|ipc{ipc}|{json.dumps(cfg.model_dump(mode='json'), sort_keys=True)}"
        costs[key] = 0.5
    cache = tmp_path / "calibration.json"
    cache.write_text(json.dumps({device_key(CPU): costs}))
    cal = Calibration(cache, CPU)
    lines = {line.stage: line for line in plan(params, UnitCosts(cal, params), {"tiny": DATA})}
    assert cal.measured == []  # everything came from the cache
    assert lines["distill"].cells == 4 and lines["distill"].seconds == pytest.approx(2 * 50 * 0.5)  # random: 0 s
    # 4 cells x 1 net x 2 seeds x (10 epochs x one batch of 12 images x 0.01 s + 100 test images x 1e-4 s)
    assert lines["evaluate"].cells == 4 and lines["evaluate"].seconds == pytest.approx(4 * 2 * (10 * 0.01 + 0.01))
    # full data: 3 epochs x (2 batches of 256 + one of 88) x 0.01 s + the test pass
    assert lines["full_data"].seconds == pytest.approx(3 * 3 * 0.01 + 0.01)
    assert "trajectories" not in lines  # no MTT in this grid
    assert total(list(lines.values())) == pytest.approx(50 + 0.88 + 0.1)


def test_a_real_calibration_is_measured_once_and_cached(tmp_path: Path) -> None:
    params = _grid(**{"grid.noe": [1], "experts.dm.iterations": 10})
    cache = tmp_path / "calibration.json"
    cal = Calibration(cache, CPU)
    first = plan(params, UnitCosts(cal, params), {"tiny": DATA})
    cal.save()
    assert len(cal.measured) == 4  # two step sizes, the test pass, one DM configuration
    assert all(v > 0 for v in cal.costs.values())
    again = Calibration(cache, CPU)
    second = plan(params, UnitCosts(again, params), {"tiny": DATA})
    assert again.measured == [] and [x.seconds for x in second] == [x.seconds for x in first]


def test_moedd_plan_prints_the_stages_and_the_total(tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    Path("params.yaml").write_text(json.dumps({
        "scale": "smoke", "datasets": {"tiny": {"source": "imagefolder", "root": str(tiny_folder), "download": False}},
        "grid": {"datasets": ["tiny"], "budgets": [8], "experts": ["dm"], "baselines": ["random"], "noe": [1],
                 "mtt_noe": []}}))
    result = CliRunner().invoke(app, ["plan"])
    assert result.exit_code == 0, result.output
    assert "evaluate" in result.output and "full_data" in result.output and "total:" in result.output
    assert (tmp_path / ".moedd" / "calibration.json").exists()


def test_a_mixture_costs_its_members_one_expert_runs(tmp_path: Path) -> None:
    """grid.mixtures adds a distill cell (each member's one-expert run at the mixture's IPC: DM's
    iteration at NoE 1, IPC 2; random selection costs nothing) and an evaluate cell (its experts'
    images: 2 x 3 classes x IPC 2)."""
    from moedd.params import method_config

    params = _grid(**{"grid.experts": [], "grid.baselines": [], "grid.mixtures": [{"experts": "dm+random", "noe": 2}]})
    dsa = params.evaluate.dsa_strategy
    costs = {f"step|convnet3|{DATA.shape}|3|{b}|{dsa}": 0.01 for b in PROBE_BATCHES}
    costs[f"test|convnet3|{DATA.shape}|3|{params.evaluate.test_batch_size}"] = 1e-4
    cfg, _ = method_config(params, "dm", 2, None)
    costs[f"iteration|dm|{DATA.shape}|3|noe1|ipc2|{json.dumps(cfg.model_dump(mode='json'), sort_keys=True)}"] = 0.5
    cache = tmp_path / "calibration.json"
    cache.write_text(json.dumps({device_key(CPU): costs}))
    cal = Calibration(cache, CPU)
    lines = {line.stage: line for line in plan(params, UnitCosts(cal, params), {"tiny": DATA})}
    assert cal.measured == []
    assert lines["distill"].cells == 1 and lines["distill"].seconds == pytest.approx(50 * 0.5)
    assert lines["evaluate"].cells == 1 and lines["evaluate"].seconds == pytest.approx(2 * (10 * 0.01 + 0.01))
