"""MTT experts: real teachers from `moedd.trajectories`, the unrolled objective, the learned
learning rate, ZCA space end to end (save, load, evaluate), exact resume, early refusals.

Real ConvNet-3 students and teachers on 8x8 generated images (3 classes, 16 train / 4 test per
class), so the ZCA fit and the unrolled steps take fractions of a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CaptureBlockers, device_read_backs, interrupted_then_resumed, tiny_params
from moedd.config import ConfigError
from moedd.data import load_prepared, load_source, make_partition, save_prepared
from moedd.distill import build_method, run_distillation, plan_run
from moedd.evaluate import evaluate_synthetic, prepare_test_images
from moedd.experts.mtt import estimate_memory_gb
from moedd.experts._mtt_graph import StaticUnrolls
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
        plan_run("mtt", _params(**overrides), prepared8, part2, CPU, teachers2)


def test_needs_trajectories_of_this_partition(prepared8, part2, teachers2) -> None:
    with pytest.raises(ConfigError, match="moedd trajectories"):
        plan_run("mtt", _params(), prepared8, part2, CPU, None)
    other = make_partition(prepared8.train_labels, prepared8.num_classes, 2, 1, prepared8.digest)
    with pytest.raises(ConfigError, match="another partition"):
        plan_run("mtt", _params(), prepared8, other, CPU, teachers2)


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


def _grads_of_one_iteration(method, syn, static: StaticUnrolls | None, it: int = 0):
    """(losses, syn.grad, lr.grad) of iteration ``it``, eagerly or through ``static``'s body."""
    syn.grad, method.lr.grad = None, None
    if static is None:
        losses, _, _ = method._losses(syn, it, backward=True)
    else:
        losses = torch.stack(method._static_losses(static, syn, it))
    return losses, syn.grad.clone(), method.lr.grad.clone()


def test_static_body_equals_the_eager_unrolls(prepared8, part2, teachers2) -> None:
    """The body a CUDA graph captures (static buffers, DSA group drawn on the device), run
    eagerly: with a one-group DSA strategy it draws exactly what the eager unroll draws, so its
    losses and meta-gradients (images and learning rate) equal eager mode's, bit for bit (the
    dCor term, outside the graph, is off: with it the sums only round differently, 2e-6)."""
    params = _params(**{"experts.mtt.dsa_strategy": "crop", "distill.dcor_weight": 0.0})
    method = build_method("mtt", params, prepared8, part2, CPU, teachers2)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    static = StaticUnrolls(method, syn, capture=False)
    for it in (0, 1):
        eager = _grads_of_one_iteration(method, syn, None, it)
        body = _grads_of_one_iteration(method, syn, static, it)
        for a, b in zip(eager, body, strict=True):
            assert torch.equal(b, a)
        assert float(eager[1].abs().sum()) > 0 and float(eager[2].abs()) > 0


def test_static_body_with_every_dsa_group_learns(prepared8, part2, teachers2) -> None:
    """The full DSA strategy through the static body (each op gated on the device draw): finite
    losses, gradients for the images and the learning rate, and steps that lower the objective."""
    method = build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    static = StaticUnrolls(method, syn, capture=False)
    before = float(method.objective(syn, 0).detach())
    for it in range(8):
        method.opt_img.zero_grad(set_to_none=True)
        method.opt_lr.zero_grad(set_to_none=True)
        losses, g_syn, g_lr = _grads_of_one_iteration(method, syn, static, it)
        assert torch.isfinite(losses).all() and float(g_syn.abs().sum()) > 0 and torch.isfinite(g_lr)
        method.opt_img.step()
        method.opt_lr.step()
    assert float(method.objective(syn, 0).detach()) < before


def test_static_body_has_nothing_a_cuda_graph_cannot_capture(prepared8, part2, teachers2) -> None:
    """The captured body (full DSA strategy, so the gated ops run) reads no value back to the
    host, makes no value-dependent shapes and copies no host data (CPU proxy of capturability)."""
    method = build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    static = StaticUnrolls(method, syn, capture=False)
    start = torch.stack([teachers2.load(k, 0)[0] for k in range(2)])
    target = torch.stack([teachers2.load(k, 0)[1] for k in range(2)])
    order = torch.stack([method._order(len(static.labels), torch.Generator().manual_seed(k)) for k in range(2)])
    with CaptureBlockers() as blockers:
        losses, g_syn, _ = static.run(start, target, order, seed=3)
    assert blockers.found == [] and torch.isfinite(losses).all() and float(g_syn.abs().sum()) > 0


def test_cuda_graph_knob_is_eager_on_a_cpu(prepared8, part2, teachers2) -> None:
    """``experts.mtt.cuda_graph`` only applies on CUDA: on a CPU the run is the eager one
    (identical images) and logs ``cuda_graph`` 0; a graph cannot be asked for on a CPU."""
    plain = run_distillation("mtt", _params(), prepared8, part2, CPU, trajectories=teachers2)
    knob = run_distillation("mtt", _params(**{"experts.mtt.cuda_graph": True}), prepared8, part2, CPU,
                            trajectories=teachers2)
    assert torch.equal(knob.images, plain.images)
    assert [row["cuda_graph"] for row in knob.history] == [0.0] * 4
    method = build_method("mtt", _params(), prepared8, part2, CPU, teachers2)
    with pytest.raises(ValueError, match="CUDA device"):
        StaticUnrolls(method, method.init_images(), capture=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_graph_replays_the_eager_body(prepared8, part2, teachers2) -> None:
    """On CUDA: the captured graph, replayed for three iterations with new teachers, orders and
    seeds, gives the eager body's losses and gradients (the graph reads the images and the
    learning rate in place, so an update between replays is seen)."""
    dev = torch.device("cuda")
    method = build_method("mtt", _params(**{"experts.mtt.cuda_graph": True}), prepared8, part2, dev, teachers2)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    eager, graph = StaticUnrolls(method, syn, capture=False), StaticUnrolls(method, syn, capture=True)
    for it in range(3):
        a = _grads_of_one_iteration(method, syn, eager, it)
        b = _grads_of_one_iteration(method, syn, graph, it)
        assert graph.graph is not None
        for u, v in zip(a, b, strict=True):
            assert float((u - v).norm() / u.norm().clamp_min(1e-12)) < 1e-3
        with torch.no_grad():
            syn.add_(0.01 * torch.randn_like(syn))
            method.lr.mul_(1.1)


@CUDA
def test_cuda_graph_run_logs_replays_and_learns(prepared8, part2, teachers2) -> None:
    """A distillation run with ``cuda_graph`` on CUDA replays the graph at every iteration and
    learns (objective down, learning rate moved)."""
    dev = torch.device("cuda")
    params = _params(**{"experts.mtt.cuda_graph": True, "experts.mtt.iterations": 6})
    res = run_distillation("mtt", params, prepared8, part2, dev, trajectories=teachers2)
    assert [row["cuda_graph"] for row in res.history] == [1.0] * 6
    assert res.history[-1]["match"] < res.history[0]["match"] and res.metas[0].learned_lr != 0.01
