"""Config: every section validates, bad values fail with one clear line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moedd.config import ConfigError, Params, check_budget, flatten, load_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.distill.budget % max(params.grid.noe) == 0
    assert params.experts.dm.iterations == 20000  # the paper-scale default (algorithms.md §5.1)


def test_missing_file_means_defaults() -> None:
    assert load_params(None) == Params()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"distill.budget": 10, "grid.noe": [3]}, "not divisible by NoE=3"),
        ({"grid.experts": ["nope"]}, "unknown expert 'nope'"),
        ({"evaluate.nets": ["resnet9000"]}, "unknown network 'resnet9000'"),
        ({"data.source": "mnist"}, "unknown dataset source 'mnist'"),
        ({"experts.dm.iterations": -1}, "experts.dm.iterations"),
        ({"distill.device": "tpu"}, "device must be auto"),
        ({"evaluate.seeds": [1, 1]}, "distinct"),
        ({"fusion.kind": "concat"}, "fusion.kind"),
        ({"mlflow.tracking_uri": "./mlruns"}, "file store is deprecated"),
        ({"distill.bogus": 1}, "distill.bogus"),
    ],
)
def test_invalid_values_fail_with_one_line(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


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
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _param_keys(v, f"{prefix}{k}.")
    return keys


def test_every_dvc_stage_param_exists_in_params_yaml() -> None:
    """Each `params:` entry of dvc.yaml names a real key (templated ones for every expert)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = _param_keys(tree)
    experts = tree["grid"]["experts"]
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        for entry in body.get("params", []):
            names = [entry.replace("${item.expert}", e) for e in experts] if "${" in entry else [entry]
            for name in names:
                assert name in keys, f"dvc.yaml param {name} is not in params.yaml"
    # and params.yaml has no section the config models do not read
    assert set(tree) <= set(Params.model_fields)
