"""Heterogeneous mixtures (``--expert idc,idm``): the joint schedule, members that are exactly the
method's own one-expert run when the diversity term is off, the cross-method term, exact resume,
per-expert decoding into one space at evaluation, a ZCA (MTT) member beside a normalised one, and
one-line refusals. Real methods and networks on the tiny generated data of conftest (3 classes, 24
32x32 train images per class) and, for MTT, 8x8 images with real teachers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import interrupted_then_resumed, tiny_params
from moedd.config import ConfigError
from moedd.data import Partition, load_prepared, load_source, make_partition, save_prepared
from moedd.distill import build_method, member_seed, plan_run, run_distillation
from moedd.evaluate import common_space, evaluate_synthetic, pool_experts, prepare_test_images, training_lr
from moedd.experts import EXPERTS
from moedd.experts.mixture import Mixture, local_steps, mixture_name, parse_methods
from moedd.synthetic import DECODERS, load_synthetic, save_synthetic
from moedd.trajectories import load_trajectories, train_teachers
from tinydata import make_image_folder

CPU = torch.device("cpu")


@pytest.mark.parametrize("total", [1, 3, 7, 50])
def test_every_member_takes_its_own_steps_in_order_over_the_run(total: int) -> None:
    for n in range(0, total + 1):
        taken = [j for t in range(total) for j in local_steps(t, n, total)]
        assert taken == list(range(n))
        assert all(len(local_steps(t, n, total)) <= 1 for t in range(total))  # at most one per global step
    # the longest member steps every global step; a shorter one finishes on the last one
    assert [len(local_steps(t, 2, 50)) for t in range(50)].index(1) == 24
    assert len(local_steps(49, 2, 50)) == 1


def test_names_parse_one_per_expert_and_one_method_is_homogeneous() -> None:
    names = EXPERTS.names()
    assert parse_methods("idc,idm", names) == ["idc", "idm"] == parse_methods("idc+idm", names)
    assert mixture_name(["idc", "idm"]) == "idc+idm"
    assert mixture_name(["dm", "dm"]) == "dm"
    with pytest.raises(ConfigError, match="unknown expert 'foo'"):
        parse_methods("idc,foo", names)
    with pytest.raises(ConfigError, match="empty method name"):
        parse_methods("idc,", names)


def _one_shard(part: Partition, k: int) -> Partition:
    return dataclasses.replace(part, shards=[part.shards[k]])


def test_without_the_term_each_member_is_exactly_its_methods_own_run(tiny_prepared) -> None:
    params = tiny_params(**{"distill.dcor_weight": 0.0})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    mix = run_distillation("dm,idm", params, tiny_prepared, part, CPU)
    assert [m.method for m in mix.metas] == ["dm", "idm"] and {m.mixture for m in mix.metas} == {"dm+idm"}
    for k, name in enumerate(["dm", "idm"]):
        alone = run_distillation(name, tiny_params(**{"distill.dcor_weight": 0.0, "distill.seed": member_seed(0, k),
                                                      "distill.budget": 2}),  # the mixture's IPC per expert
                                 tiny_prepared, _one_shard(part, k), CPU)
        assert torch.equal(mix.images[k], alone.images[0]), name
        assert mix.metas[k].iterations == alone.metas[0].iterations
        assert (mix.metas[k].space, mix.metas[k].decoding) == (alone.metas[0].space, alone.metas[0].decoding)


def test_the_cross_method_update_lowers_the_term_it_steps_on(tiny_prepared) -> None:
    params = tiny_params(**{"distill.dcor_weight": 1.0, "distill.budget": 8, "distill.dcor_estimator": "bias_corrected"})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    method = build_method("idc,dm", params, tiny_prepared, part, CPU)
    assert isinstance(method, Mixture)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    before = [x.detach().clone() for x in method.leaves]
    d0 = method.diversity_update(1, t=0)  # the DM member, against IDC's images (detached)
    assert torch.equal(method.leaves[0], before[0])  # only the member that stepped moves
    assert not torch.equal(method.leaves[1], before[1])
    d1 = method.diversity_update(1, t=0)  # same common network (same t, k): the term it stepped on
    assert d0 > 0 and d1 < d0


def test_mixture_distills_and_evaluates_each_expert_by_its_own_metadata(tiny_prepared, tmp_path: Path) -> None:
    params = tiny_params()
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    res = run_distillation("dm,idc", params, tiny_prepared, part, CPU)
    assert res.history and "dcor" in res.history[-1] and res.history[-1]["dcor"] > 0
    save_synthetic(tmp_path / "set", list(res.images), [res.labels] * 2, res.metas, res.zca)
    syn = load_synthetic(tmp_path / "set")
    assert syn.method == "dm+idc" and syn.spaces == ["normalized", "pixel"]
    data = pool_experts(syn, 0.01, CPU)
    n = len(res.labels)
    assert len(data.images) == n + 4 * n  # DM as stored, IDC's multi-formation decoded x4
    mean = torch.tensor(syn.meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(syn.meta.std).view(1, -1, 1, 1)
    decoded, _ = DECODERS.get("multiformation2")(syn.images[1], syn.labels[1])
    assert torch.equal(data.images[:n], syn.images[0])
    torch.testing.assert_close(data.images[n:], (decoded - mean) / std, rtol=0, atol=0)
    assert (data.space, data.lr_source, data.lr) == ("normalized", "protocol", 0.01)
    out = evaluate_synthetic(syn, tiny_prepared.test_images, tiny_prepared.test_labels, params.evaluate,
                             params.fusion, CPU)
    assert 0 <= out["convnet3"].mean <= 1 and len(out["convnet3"].accs) == 2


def test_an_interrupted_mixture_resumes_to_the_same_images(tiny_prepared, tmp_path: Path) -> None:
    params = tiny_params(**{"distill.dcor_weight": 0.5})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    whole = run_distillation("idm,dm", params, tiny_prepared, part, CPU)
    resumed = interrupted_then_resumed("idm,dm", params, tiny_prepared, part, tmp_path / "ck", stop_at=3)
    assert resumed.resumed_from == 2
    assert torch.equal(whole.images, resumed.images)


def test_a_mixture_is_refused_in_one_line_before_any_work(tiny_prepared) -> None:
    params = tiny_params()
    part3 = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 3, 0, tiny_prepared.digest)
    with pytest.raises(ConfigError, match="names 2 methods for 3 experts"):
        plan_run("idc,idm", tiny_params(**{"distill.budget": 6}), tiny_prepared, part3)
    part2 = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    with pytest.raises(ConfigError, match="MTT expert needs teacher trajectories"):
        plan_run("idm,mtt", params, tiny_prepared, part2)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    folder = make_image_folder(tmp_path_factory.mktemp("mix8") / "folder", train_per_class=16, test_per_class=4, size=8)
    out = tmp_path_factory.mktemp("mix8-prepared") / "prepared"
    save_prepared(load_source("imagefolder", folder), out)
    return load_prepared(out)


def _mtt_params(**overrides):
    base = {"experts.mtt.preset": "none", "experts.idm.preset": "none", "distill.budget": 4,
            "trajectories.num_teachers": 1, "trajectories.epochs": 3, "trajectories.batch_size": 16,
            "trajectories.test_batch_size": 64, "experts.mtt.iterations": 3, "experts.mtt.syn_steps": 3,
            "experts.mtt.expert_epochs": 1, "experts.mtt.max_start_epoch": 2, "experts.mtt.lr_img": 100.0,
            "experts.mtt.lr_lr": 1e-5, "experts.mtt.lr_teacher": 0.01}
    return tiny_params(**{**base, **overrides})


def test_an_mtt_member_in_zca_space_beside_a_normalised_one(small, tmp_path: Path) -> None:
    params = _mtt_params()
    part = make_partition(small.train_labels, small.num_classes, 2, 0, small.digest)
    train_teachers(params, small, part, tmp_path / "teachers", CPU)
    teachers = load_trajectories(tmp_path / "teachers")
    res = run_distillation("idm,mtt", params, small, part, CPU, trajectories=teachers)
    assert [(m.method, m.space) for m in res.metas] == [("idm", "normalized"), ("mtt", "zca")]
    assert res.metas[1].learned_lr is not None and res.metas[0].learned_lr is None
    assert res.metas[1].zca_digest == res.zca.digest and res.metas[0].zca_digest == ""
    save_synthetic(tmp_path / "set", list(res.images), [res.labels] * 2, res.metas, res.zca)
    syn = load_synthetic(tmp_path / "set")
    # the common space is the normalised one: MTT's images are un-whitened to pixels and normalised
    assert common_space(syn) == "normalized" and training_lr(syn, 0.01) == (0.01, "protocol")
    data = pool_experts(syn, 0.01, CPU)
    n = len(res.labels)
    pixels = syn.zca.invert(syn.images[1])
    mean = torch.tensor(syn.meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(syn.meta.std).view(1, -1, 1, 1)
    torch.testing.assert_close(data.images[4 * n:], (pixels - mean) / std, rtol=0, atol=0)
    test_x = prepare_test_images(syn, small.test_images, CPU)
    torch.testing.assert_close(test_x, (small.test_images.float() / 255 - mean) / std)
    out = evaluate_synthetic(syn, small.test_images, small.test_labels, params.evaluate, params.fusion, CPU)
    assert 0 <= out["convnet3"].mean <= 1


@pytest.mark.parametrize(("entry", "message"), [
    ({"experts": "idc,idm", "noe": 2}, "as the methods joined by '\\+'"),
    ({"experts": "idc+idc", "noe": 2}, "as the methods joined by '\\+'"),
    ({"experts": "idc+idm+dm", "noe": 2}, "names 3 methods but its noe is 2"),
    ({"experts": "idc+idm+dm", "noe": 3}, "add 3 to grid.noe"),
    ({"experts": "idm+mtt", "noe": 2}, "needs teacher trajectories"),
    ({"experts": "idc+xyz", "noe": 2}, "unknown expert 'xyz'"),
])
def test_grid_mixtures_are_checked_when_params_load(entry: dict, message: str) -> None:
    from moedd.params import load_params

    assert load_params(None, {"grid.mixtures": [{"experts": "idc+idm", "noe": 2}]}).grid.mixtures[0].noe == 2
    with pytest.raises(ConfigError, match=message):
        load_params(None, {"grid.mixtures": [entry]})


def test_teachers_only_for_the_shards_whose_method_needs_them(small, tmp_path: Path) -> None:
    params = _mtt_params()
    part = make_partition(small.train_labels, small.num_classes, 2, 0, small.digest)
    train_teachers(params, small, part, tmp_path / "teachers", CPU, shards=[1])
    teachers = load_trajectories(tmp_path / "teachers")
    assert teachers.shards == [1] and teachers.count(0) == 0 and teachers.count(1) == 1
    assert not list((tmp_path / "teachers").glob("shard0/*.pt"))
    res = run_distillation("idm,mtt", params, small, part, CPU, trajectories=teachers)  # expert 1 is MTT
    assert res.metas[1].method == "mtt"
    with pytest.raises(ConfigError, match="no teacher trajectories for shard 0"):
        plan_run("mtt,idm", params, small, part, CPU, teachers)  # MTT on shard 0, which has none
    with pytest.raises(ConfigError, match="no teacher trajectories for shard 0"):
        plan_run("mtt", params, small, part, CPU, teachers)  # the homogeneous run needs every shard's
