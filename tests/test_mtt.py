"""MTT experts: real teachers from `moedd.trajectories`, the unrolled objective, the learned
learning rate, ZCA space end to end (save, load, evaluate), exact resume, early refusals.

Real ConvNet-3 students and teachers on 8x8 generated images (3 classes, 16 train / 4 test per
class), so the ZCA fit and the unrolled steps take fractions of a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import device_read_backs, interrupted_then_resumed, tiny_params
from moedd.config import ConfigError
from moedd.data import load_prepared, load_source, make_partition, save_prepared
from moedd.distill import build_method, run_distillation, validate_run
from moedd.evaluate import evaluate_synthetic, prepare_test_images
from moedd.experts.mtt import estimate_memory_gb
from moedd.nets import create_net
from moedd.synthetic import SyntheticSetError, check_matches, load_synthetic, save_synthetic, to_pixels
from moedd.trajectories import load_trajectories, train_teachers
from tinydata import make_image_folder

CPU = torch.device("cpu")


def _params(**overrides):
    base = {"data.source": "imagefolder", "experts.mtt.preset": "none", "distill.budget": 4,
            "trajectories.num_teachers": 2, "trajectories.epochs": 3, "trajectories.batch_size": 16,
            "trajectories.test_batch_size": 64,
            "experts.mtt.iterations": 4, "experts.mtt.syn_steps": 3, "experts.mtt.expert_epochs": 1,
            "experts.mtt.max_start_epoch": 2, "experts.mtt.lr_img": 100.0, "experts.mtt.lr_lr": 1e-5,
            "experts.mtt.lr_teacher": 0.01}
    return tiny_params(**{**base, **overrides})


@pytest.fixture(scope="module")
def prepared8(tmp_path_factory: pytest.TempPathFactory):
    folder = make_image_folder(tmp_path_factory.mktemp("mtt8") / "folder", train_per_class=16, test_per_class=4, size=8)
    out = tmp_path_factory.mktemp("mtt8-prepared") / "prepared"
    save_prepared(load_source("imagefolder", folder), out)
    return load_prepared(out)


@pytest.fixture(scope="module")
def part2(prepared8):
    return make_partition(prepared8.train_labels, prepared8.num_classes, 2, 0, prepared8.digest)


@pytest.fixture(scope="module")
def teachers2(prepared8, part2, tmp_path_factory: pytest.TempPathFactory):
    """Two ZCA-space teachers per shard, 3 epochs each, for NoE = 2 at budget 4 (IPC 2)."""
    out = tmp_path_factory.mktemp("teachers") / "noe2"
    train_teachers(_params(), prepared8, part2, out, CPU)
    return load_trajectories(out)


def test_objective_drops_images_and_lr_learn(prepared8, part2, teachers2) -> None:
    params = _params()
    method = build_method("mtt", params, prepared8, part2, CPU, teachers2)
    assert method.space == "zca" and method.zca is not None
    syn = method.init_images().detach().clone().requires_grad_(True)
    assert syn.shape == (2, 3 * 2, 3, 8, 8)
    method.setup(syn)
    x0, lr0 = syn.detach().clone(), method.learned_lr()
    before = float(method.objective(syn, 0).detach())
    for it in range(8):
        out = method.step(syn, it)
        assert torch.isfinite(out["loss"]) and out["peak_mem_gb"] > 0
    after = float(method.objective(syn, 0).detach())
    assert after < before, (before, after)
    assert not torch.equal(syn.detach(), x0)
    assert method.learned_lr() != lr0 and method.learned_lr() > 0


def test_student_first_step_is_sgd_on_the_teacher_start(prepared8, part2, teachers2) -> None:
    """One unrolled step from θ*_t equals one plain SGD step of a network loaded with θ*_t."""
    method = build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
    syn = method.init_images()
    traj = teachers2.load(0, 0)
    start = traj[0]
    x, y = syn[0], method.ctx.labels()
    theta = start.clone().requires_grad_(True)
    from torch.func import functional_call

    ce = torch.nn.functional.cross_entropy(functional_call(method.net, method.unflatten(theta), (x,)), y)
    (g,) = torch.autograd.grad(ce, theta)
    net = create_net("convnet3", 3, channels=3, image_size=8)
    torch.nn.utils.vector_to_parameters(start.clone(), net.parameters())  # (it aliases its input)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    diff = (start - 0.01 * g - torch.nn.utils.parameters_to_vector(net.parameters())).abs().max()
    assert diff < 1e-6, float(diff)


def test_resume_equals_uninterrupted_and_zca_set_round_trip(prepared8, part2, teachers2, tmp_path: Path) -> None:
    params = _params()
    full = run_distillation("mtt", params, prepared8, part2, CPU, trajectories=teachers2)
    resumed = interrupted_then_resumed("mtt", params, prepared8, part2, tmp_path / "ck", stop_at=3, trajectories=teachers2)
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    assert resumed.metas[0].learned_lr == full.metas[0].learned_lr != 0.01
    # the set carries its ZCA transform; the evaluator whitens the test set with it
    meta = full.metas[0]
    assert meta.space == "zca" and meta.zca_digest == teachers2.zca.digest
    save_synthetic(tmp_path / "set", list(full.images), [full.labels] * 2, full.metas, full.zca)
    syn = load_synthetic(tmp_path / "set")
    check_matches(syn, prepared8.classes, prepared8.image_shape, prepared8.digest)
    test_x = prepare_test_images(syn, prepared8.test_images, CPU)
    assert torch.allclose(test_x, teachers2.zca.apply_u8(prepared8.test_images))
    px = to_pixels(syn.images[0], syn.meta, syn.zca)
    assert px.shape == syn.images[0].shape and 0 <= float(px.min()) and float(px.max()) <= 1
    res = evaluate_synthetic(syn, prepared8.test_images, prepared8.test_labels, params.evaluate, params.fusion, CPU)
    assert 0.0 <= res["convnet3"].mean <= 1.0
    # without its transform a ZCA set is refused, and a set is never saved without it
    (tmp_path / "set" / "zca.pt").unlink()
    with pytest.raises(SyntheticSetError, match="zca.pt"):
        load_synthetic(tmp_path / "set")
    with pytest.raises(SyntheticSetError, match="ZCA"):
        save_synthetic(tmp_path / "set2", list(full.images), [full.labels] * 2, full.metas)


def test_normalized_space_without_zca(prepared8, part2, tmp_path: Path) -> None:
    params = _params(**{"experts.mtt.zca": False, "trajectories.num_teachers": 1})
    train_teachers(params, prepared8, part2, tmp_path / "t", CPU)
    traj = load_trajectories(tmp_path / "t")
    res = run_distillation("mtt", params, prepared8, part2, CPU, trajectories=traj)
    assert res.metas[0].space == "normalized" and res.zca is None and res.metas[0].learned_lr is not None


@pytest.mark.parametrize(("overrides", "match"), [
    ({"experts.mtt.max_start_epoch": 3}, "needs max_start_epoch \\+ expert_epochs = 4"),
    ({"experts.mtt.zca": False}, "'zca' space"),
    ({"experts.mtt.max_memory_gb": 1e-6}, "lower experts.mtt.batch_syn"),
    ({"distill.net": "convnet4"}, "convnet3"),
])
def test_bad_inputs_refused_before_work(prepared8, part2, teachers2, overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_run("mtt", _params(**overrides), prepared8, part2, CPU, teachers2)


def test_needs_trajectories_of_this_partition(prepared8, part2, teachers2) -> None:
    with pytest.raises(ConfigError, match="moedd trajectories"):
        validate_run("mtt", _params(), prepared8, part2, CPU, None)
    other = make_partition(prepared8.train_labels, prepared8.num_classes, 2, 1, prepared8.digest)
    with pytest.raises(ConfigError, match="another partition"):
        validate_run("mtt", _params(), prepared8, other, CPU, teachers2)


def test_memory_estimate_grows_with_unroll_and_batch() -> None:
    net = create_net("convnet3", 10)
    one = estimate_memory_gb(net, (3, 32, 32), 30, 100)
    assert estimate_memory_gb(net, (3, 32, 32), 60, 100) > 1.9 * one
    assert estimate_memory_gb(net, (3, 32, 32), 30, 50) < 0.6 * one
    assert 5 < one < 30  # the reference needs ~13 GiB for 30 steps x 100 CIFAR images


def test_unrolled_steps_read_nothing_back_to_the_host(prepared8, part2, teachers2, monkeypatch) -> None:
    """An MTT iteration reads no device value back inside the unroll: the per-step choices (the
    DSA group, the minibatch order) are drawn on the host or stay on the device. (A device draw of
    the DSA group read back with ``.item()`` stalled a GPU once per unrolled step.)"""
    counts = []
    for steps in (2, 6):
        method = build_method("mtt", _params(**{"experts.mtt.syn_steps": steps}), prepared8, part2, CPU, teachers2)
        syn = method.init_images().detach().clone().requires_grad_(True)
        method.setup(syn)
        with device_read_backs(monkeypatch) as reads:
            method.step(syn, 0)
        counts.append(reads.count)
    assert counts == [0, 0], counts


def test_layout_knob_changes_speed_not_results(prepared8, part2, teachers2, monkeypatch) -> None:
    """MOEDD_LAYOUT (the benchmarking knob of moedd.device.memory_format_for) gives the same
    objective and image gradient in either layout; a bad value is refused."""
    out = {}
    for layout in ("contiguous", "channels_last"):
        monkeypatch.setenv("MOEDD_LAYOUT", layout)
        method = build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
        syn = method.init_images().detach().clone().requires_grad_(True)
        loss = method.objective(syn, 0)
        (grad,) = torch.autograd.grad(loss, syn)
        out[layout] = (loss.detach(), grad)
    torch.testing.assert_close(out["channels_last"][0], out["contiguous"][0], rtol=1e-4, atol=1e-6)
    # the meta-gradient passes through 3 unrolled double backwards: compare it as a whole (the
    # layouts sum in different orders; measured 5e-5 relative, single elements near zero differ more)
    g_cl, g_nchw = out["channels_last"][1], out["contiguous"][1]
    assert float((g_cl - g_nchw).norm() / g_nchw.norm()) < 1e-3
    monkeypatch.setenv("MOEDD_LAYOUT", "nhwc")
    with pytest.raises(ValueError, match="MOEDD_LAYOUT"):
        build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
