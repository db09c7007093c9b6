"""Run scales (moedd.scale): one choice sizes every method and stage, under the preset rows and
what the user writes."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from moedd.config import ConfigError, EvaluateConfig, TrajectoriesConfig
from moedd.experts import EXPERTS
from moedd.params import load_params, method_config
from moedd.scale import SCALES, scaled_keys


def test_params_yaml_lists_every_scaled_key_as_null() -> None:
    """A value written in params.yaml wins over the scale, so params.yaml writes none; it lists each
    scaled key as null, so that `dvc exp run -S evaluate.epochs=300` finds the key it overrides."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    for key in scaled_keys():
        node = tree
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"params.yaml lacks {key}"
            node = node[part]
        assert node is None, f"params.yaml sets {key}={node!r}, which would override every scale"


def test_paper_scale_is_the_class_defaults() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.scale == "paper"
    assert params.evaluate.epochs == EvaluateConfig().epochs == 1000
    assert params.evaluate.seeds == [0, 1, 2, 3, 4] and len(params.evaluate.nets) == 4
    assert params.trajectories.num_teachers == TrajectoriesConfig().num_teachers == 100
    for name in EXPERTS.names():
        cfg = params.experts.for_method(name)
        assert cfg == EXPERTS.get(name).config_cls().model_copy(update=cfg.model_dump(include=cfg.model_fields_set))


def test_every_scale_validates_for_every_method() -> None:
    for scale in SCALES:
        params = load_params(REPO / "params.yaml", {"scale": scale})
        for name in EXPERTS.names():
            for paper in ("cifar10", "cifar100", None):
                method_config(params, name, 5, paper)  # raises on an invalid merge


def test_precedence_defaults_scale_preset_user() -> None:
    """defaults < scale < preset row < params.yaml / -S."""
    cpu = load_params(REPO / "params.yaml", {"scale": "cpu"})
    idm, preset = method_config(cpu, "idm", 10, "cifar100")
    assert preset is not None and preset.label == "cifar100/ipc10"
    assert idm.iterations == 50  # the scale over the class default (20,000)
    assert idm.ce_weight == 0.1 and idm.model_train_steps == 50  # the preset row
    # a preset row wins over the scale for the keys it holds: herding's epochs at cpu scale
    herding, _ = method_config(cpu, "herding", 5, "cifar10")
    assert herding.train_epochs == 20  # presets.herding.cifar10 row, not the cpu scale's 5
    assert method_config(cpu, "herding", 5, None)[0].train_epochs == 5  # no row: the scale
    # what the user sets wins over both
    user = load_params(REPO / "params.yaml", {"scale": "cpu", "experts.idm.iterations": 7,
                                              "experts.herding.train_epochs": 3, "evaluate.epochs": 11})
    assert method_config(user, "idm", 10, "cifar100")[0].iterations == 7
    assert method_config(user, "herding", 5, "cifar10")[0].train_epochs == 3
    assert user.evaluate.epochs == 11 and user.evaluate.seeds == [0, 1, 2]


def test_smoke_drops_the_preset_rows_unless_the_user_chooses_one() -> None:
    smoke = load_params(REPO / "params.yaml", {"scale": "smoke"})
    mtt, preset = method_config(smoke, "mtt", 10, "cifar10")
    assert preset is None and (mtt.iterations, mtt.syn_steps, mtt.max_start_epoch) == (4, 3, 2)
    chosen = load_params(REPO / "params.yaml", {"scale": "smoke", "experts.mtt.preset": "auto"})
    mtt, preset = method_config(chosen, "mtt", 10, "cifar10")
    assert preset is not None and mtt.syn_steps == 30 and mtt.iterations == 4


def test_an_unknown_scale_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^invalid scale: 'laptop' is not one of paper, cpu, smoke$"):
        load_params(REPO / "params.yaml", {"scale": "laptop"})
