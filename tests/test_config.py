"""Config: every section validates, bad values fail with one clear line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moedd.config import ConfigError, check_budget, flatten
from moedd.experts.idm import IDMConfig
from moedd.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.distill.budget % max(params.grid.noe) == 0
    assert params.experts.dm.iterations == 20000  # the paper-scale default (docs/methods.md §DM)


def test_missing_file_means_defaults() -> None:
    assert load_params(None) == Params()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"distill.budget": 10, "grid.noe": [3]}, "not divisible by NoE=3"),
        ({"grid.experts": ["nope"]}, "unknown expert 'nope'"),
        ({"grid.experts": ["dm", "random"]}, "random, which selects real images (no loss curve): list it under grid.baselines"),
        ({"grid.baselines": ["herding", "idc"]}, "idc, which optimises images (it has a loss curve): list it under grid.experts"),
        ({"grid.baselines": ["mtt"]}, "MTT has its own stages"),
        ({"evaluate.nets": ["resnet9000"]}, "unknown network 'resnet9000'"),
        ({"data.source": "mnist"}, "unknown dataset source 'mnist'"),
        ({"experts.dm.iterations": -1}, "experts.dm.iterations"),
        ({"distill.device": "tpu"}, "device must be auto"),
        ({"evaluate.seeds": [1, 1]}, "distinct"),
        ({"fusion.kind": "concat"}, "fusion.kind"),
        ({"mlflow.tracking_uri": "./mlruns"}, "file store is deprecated"),
        ({"distill.bogus": 1}, "unknown key distill.bogus"),
        ({"experts.dm.dsa_strategy": "color_blur"}, "unknown DSA group(s) ['blur']"),
        ({"experts.idc.match_dsa_strategy": "crop_warp"}, "experts.idc.match_dsa_strategy"),
    ],
)
def test_invalid_values_fail_with_one_line(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_dsa_none_is_allowed_where_it_means_no_augmentation() -> None:
    assert load_params(None, {"experts.idc.net_dsa_strategy": "none"}).experts.idc.net_dsa_strategy == "none"
    with pytest.raises(ConfigError, match="unknown DSA group"):
        load_params(None, {"experts.dm.dsa_strategy": "none"})  # DM's DSA has no "off" strategy


def test_params_file_missing_or_malformed_is_one_line(tmp_path: Path) -> None:
    """A given params file must exist (no silent defaults), and bad YAML names the 1-based line and column."""
    with pytest.raises(ConfigError, match="params file .*nope.yaml not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  budget: 4\n  net: a: b\nevaluate: {}\n")
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    msg = str(err.value)
    assert "bad.yaml is not valid YAML at line 3, column 9: mapping values are not allowed here" in msg
    assert "\n" not in msg
    (tmp_path / "empty.yaml").write_text("")
    assert load_params(tmp_path / "empty.yaml") == Params()


def test_overrides_apply_and_none_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"distill": {"budget": 20}}))
    p = load_params(f, {"distill.budget": None, "experts.dm.lr_img": 2.0})
    assert p.distill.budget == 20 and p.experts.dm.lr_img == 2.0


def test_params_are_frozen() -> None:
    p = load_params(None)
    with pytest.raises(Exception):
        p.distill.budget = 3  # type: ignore[misc]


def test_check_budget() -> None:
    assert check_budget(10, 2) == 5
    with pytest.raises(ConfigError, match="not divisible"):
        check_budget(10, 4)
    with pytest.raises(ConfigError, match=">= 1"):
        check_budget(10, 0)


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(load_params(None))
    assert flat["experts.dm.lr_img"] == 1.0 and flat["distill.budget"] == 10


def _param_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys.add(f"{prefix}{k}")  # presets rows have int keys (IPC)
        if isinstance(v, dict):
            keys |= _param_keys(v, f"{prefix}{k}.")
    return keys


def test_every_dvc_stage_param_exists_in_params_yaml() -> None:
    """Each `params:` entry of dvc.yaml names a real key (templated ones for every expert and
    dataset the grid lists)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = _param_keys(tree)
    items = {"${item.expert}": tree["grid"]["experts"] + tree["grid"]["baselines"],
             "${item.dataset}": tree["grid"]["datasets"]}
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for entry in body.get("params", []):
            names = [entry]
            for var, values in items.items():
                if var in entry:
                    names = [n.replace(var, v) for n in names for v in values]
            assert names and all("${" not in n for n in names), entry
            for name in names:
                assert name in keys, f"dvc.yaml param {name} is not in params.yaml"
    # and params.yaml has no section the config models do not read
    assert set(tree) <= set(Params.model_fields)


# ------------------------------------------------------------------ presets


def _repo_params(**overrides):
    return load_params(REPO / "params.yaml", overrides)


def test_presets_cover_cifar_budgets_and_pick_the_row_of_the_ipc() -> None:
    from moedd.params import method_config

    p = _repo_params()
    for method in ("idm", "idc", "mtt"):
        for dataset in ("cifar10", "cifar100"):
            assert {5, 10, 20} <= set(p.presets[method][dataset]), (method, dataset)
    idm10, choice = method_config(p, "idm", 10, "cifar10")
    assert choice is not None and choice.label == "cifar10/ipc10" and idm10.ce_weight == 0.5
    assert method_config(p, "idm", 50, "cifar10")[0].ce_weight == 0.1
    mtt1, _ = method_config(p, "mtt", 1, "cifar10")
    assert (mtt1.syn_steps, mtt1.max_start_epoch, mtt1.lr_teacher, mtt1.lr_lr) == (50, 2, 0.01, 1e-7)
    assert method_config(p, "idm", 10, "cifar100")[0].model_train_steps == 50
    assert method_config(p, "idc", 10, "cifar100")[0].n_data == 500
    assert method_config(p, "mtt", 10, "cifar100")[0].zca is False


def test_preset_nearest_row_and_explicit_keys_win() -> None:
    from moedd.params import method_config

    p = _repo_params()
    _, choice = method_config(p, "mtt", 7, "cifar10")
    assert choice.row_ipc == 5 and "nearest" in choice.label
    assert method_config(p, "mtt", 15, "cifar10")[1].row_ipc == 20  # ties go to the larger IPC
    over = _repo_params(**{"experts.idm.ce_weight": 0.3, "experts.mtt.syn_steps": 12})
    assert method_config(over, "idm", 10, "cifar10")[0].ce_weight == 0.3
    assert method_config(over, "mtt", 1, "cifar10")[0].syn_steps == 12
    assert method_config(over, "mtt", 1, "cifar10")[0].max_start_epoch == 2  # the rest still from the row


def test_preset_choice_auto_none_and_unknown() -> None:
    from moedd.params import method_config

    folder = _repo_params(**{"data.source": "imagefolder"})
    cfg, choice = method_config(folder, "idm", 10, None)  # data that is no paper dataset: the class defaults
    assert choice is None and cfg == IDMConfig.model_validate(folder.experts.idm.model_dump())
    # auto goes by the identity the prepared store records, never by data.source
    assert method_config(_repo_params(**{"data.source": "cifar10"}), "idm", 10, None)[1] is None
    cfg, choice = method_config(_repo_params(**{"data.source": "imagefolder", "experts.mtt.preset": "cifar10"}), "mtt", 1)
    assert choice.dataset == "cifar10" and cfg.syn_steps == 50
    assert method_config(_repo_params(**{"experts.idm.preset": "none"}), "idm", 10, "cifar10")[1] is None
    with pytest.raises(ConfigError, match="no such preset"):
        method_config(_repo_params(**{"experts.idm.preset": "svhn"}), "idm", 10)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("presets.idm.cifar10.10.bogus", 1, "bogus"),
    ("presets.idm.cifar10.10.ce_weight", -1.0, "ce_weight"),
    ("presets.mtt.cifar10.10.preset", "cifar100", "cannot choose a preset"),
    ("presets.dm.cifar10.10", {"lr_img": 1.0}, "takes no presets"),
    ("presets.nosuch.cifar10.10", {"a": 1}, "no such expert method"),
])
def test_bad_presets_rejected_when_params_load(key, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _repo_params(**{key: value})


def test_override_of_one_preset_key_keeps_the_rest_of_the_row() -> None:
    """YAML row keys are ints; a dotted override '...10.ce_weight' must edit that row, not replace it."""
    p = _repo_params(**{"presets.idm.cifar10.10.ce_weight": 0.3})
    assert p.presets["idm"]["cifar10"][10] == {"ce_weight": 0.3, "batch_real": 256, "net_generate_interval": 30,
                                               "model_train_steps": 10}
