"""IDC experts: mosaic init, decoding, gradient matching, CutMix, network update, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CaptureBlockers, device_read_backs, interrupted_then_resumed, tiny_params
from moedd.data import make_partition
from moedd.distill import build_method, run_distillation
from moedd.synthetic import decode_grouped, decode_quadrants
from moedd.experts import EXPERTS
from moedd.experts.base import RunSpec
from moedd.experts.idc import (IDC, IDCAugment, conv_weights, cutmix, cutmix_box, cutmix_static, gradient_distance,
                                grouped_gradient_distance)
from moedd.config import ConfigError
from moedd.experts._idc_graph import StaticInnerSteps
from moedd.nets import create_net
from moedd.nets.grouped import GroupedConvNet

CPU = torch.device("cpu")
TINY = {"distill.budget": 2, "experts.idc.iterations": 1, "experts.idc.inner_loop": 2,
        "experts.idc.batch_real": 4, "experts.idc.n_data": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Double backward through tiny batches: one thread avoids oversubscription on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _method(prepared, noe: int = 2, **overrides) -> tuple[IDC, object]:
    params = tiny_params(**{**TINY, **overrides})
    part = make_partition(prepared.train_labels, prepared.num_classes, noe, 0, prepared.digest)
    m = build_method("idc", params, prepared, part, CPU)
    assert isinstance(m, IDC)
    return m, part


def test_idc_is_registered_in_pixel_space() -> None:
    assert EXPERTS.get("idc") is IDC
    assert IDC.space == "pixel"


def test_init_is_a_mosaic_of_downscaled_real_images_of_the_own_shard(tiny_prepared) -> None:
    m, part = _method(tiny_prepared)
    syn = m.init_images()
    assert syn.shape == (2, 3 * 1, 3, 32, 32)
    assert syn.min() >= 0 and syn.max() <= 1
    assert m.decoding == "multiformation2"
    labels = m.ctx.labels()
    for k, shard in enumerate(part.shards):
        own = F.interpolate(tiny_prepared.train_images[shard].float() / 255, size=(16, 16))
        other = F.interpolate(tiny_prepared.train_images[part.shards[1 - k]].float() / 255, size=(16, 16))
        for i, img in enumerate(syn[k]):
            used = set()
            for q in (img[:, :16, :16], img[:, 16:, :16], img[:, :16, 16:], img[:, 16:, 16:]):
                dist = (own - q).abs().flatten(1).amax(1)
                j = int(dist.argmin())
                assert dist[j] < 1e-6  # a downscaled real image of shard k ...
                assert tiny_prepared.train_labels[shard][j] == labels[i]  # ... of the image's class
                assert (other - q).abs().flatten(1).amax(1).min() > 1e-3  # not of the other shard
                used.add(j)
            assert len(used) == 4  # four different real images


def test_factor_one_stores_real_images(tiny_prepared) -> None:
    m, part = _method(tiny_prepared, noe=1, **{"experts.idc.factor": 1, "distill.budget": 4})
    assert m.decoding == "none"
    syn = m.init_images()
    assert syn.shape == (1, 3 * 4, 3, 32, 32)
    real = tiny_prepared.train_images[part.shards[0]].float() / 255
    for i, img in enumerate(syn[0]):
        j = int((real - img).abs().flatten(1).amax(1).argmin())
        assert torch.equal(real[j], img)
        assert tiny_prepared.train_labels[part.shards[0]][j] == m.ctx.labels()[i]


def test_decode_matches_the_evaluator_per_expert() -> None:
    x = torch.rand(2, 3, 3, 8, 8)
    d = decode_grouped(x, "multiformation2")
    assert d.shape == (2, 12, 3, 8, 8)
    for k in range(2):
        ref, _ = decode_quadrants(x[k], torch.zeros(3, dtype=torch.long))
        assert torch.equal(d[k], ref)
    assert torch.equal(decode_grouped(x, "none"), x)


@pytest.mark.parametrize("metric", ["mse", "l1", "cos"])
def test_gradient_distance_zero_iff_equal(metric: str) -> None:
    g = [torch.randn(4, 3, 3, 3), torch.randn(5, 4, 3, 3)]
    assert gradient_distance(g, [t.clone() for t in g], metric).abs() < 1e-5
    other = [g[0], g[1] + torch.randn_like(g[1])]
    assert gradient_distance(g, other, metric) > 1e-3
    if metric == "mse":
        assert torch.isclose(gradient_distance(g, other, metric), (other[1] - g[1]).pow(2).sum())


def test_only_conv_weights_are_matched(tiny_prepared) -> None:
    """The matching loss equals the mse over the conv-weight gradients of a manual computation."""
    m, part = _method(tiny_prepared, noe=1, **{"experts.idc.factor": 1})
    net = m.fresh_net(0)
    convs = {id(mod.weight) for mod in net.modules() if isinstance(mod, nn.Conv2d)}
    assert {id(p) for p in conv_weights(net)} == convs and len(convs) == 3
    m.match_aug = IDCAugment("none")  # no augmentation
    syn = m.init_images().requires_grad_(True)
    idx = m.ctx.sample_indices(0, 4, m.ctx.generator(0), repeat=True)[1]
    _, per_expert, _ = m.match_class(net, syn, 1, [idx], m.ctx.generator(0, 2))
    real = m.ctx.normalize(m.ctx.shard_images[0][idx])
    ipc = m.ctx.ipc
    fake = m.ctx.normalize_pixels(syn[0, ipc:2 * ipc].detach())
    params = list(net.parameters())
    g_r = torch.autograd.grad(F.cross_entropy(net(real), torch.ones(4, dtype=torch.long)), params)
    g_s = torch.autograd.grad(F.cross_entropy(net(fake), torch.ones(ipc, dtype=torch.long)), params)
    conv_only = sum((a - b).pow(2).sum() for a, b, p in zip(g_r, g_s, params) if p.dim() == 4)
    everything = sum((a - b).pow(2).sum() for a, b in zip(g_r, g_s))
    assert torch.isclose(per_expert[0], conv_only, rtol=1e-4)
    assert not torch.isclose(per_expert[0], everything, rtol=1e-4)


def test_images_of_the_class_receive_gradients(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, **{"distill.dcor_weight": 1.0})
    syn = m.init_images().requires_grad_(True)
    net = m.fresh_net(0)
    gen = m.ctx.generator(0, 2)
    idx = [m.ctx.sample_indices(k, 4, gen, repeat=True)[1] for k in range(2)]
    total, per_expert, dcor = m.match_class(net, syn, 1, idx, gen)
    total.backward()
    assert syn.grad is not None
    g = syn.grad.abs().sum((2, 3, 4))  # (NoE, C·IPC), IPC 1
    assert (g[:, 1] > 0).all()  # class 1 = image 1 of every expert
    assert g[:, 0].sum() == 0 and g[:, 2].sum() == 0
    assert (per_expert > 0).all() and 0 <= dcor <= 1


def test_matching_steps_with_a_fixed_network_lower_the_loss(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, **{"experts.idc.lr_img": 0.01})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    net = m.fresh_net(0)
    first, _ = m.match_phase(net, syn, m.ctx.generator(0, 2))
    for _ in range(2):  # same generator seed: same real batches and augmentation
        m.match_phase(net, syn, m.ctx.generator(0, 2))
    last, _ = m.match_phase(net, syn, m.ctx.generator(0, 2))
    assert last.sum() < 0.8 * first.sum()


def test_cutmix_pastes_a_box_from_a_permutation() -> None:
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        out, y_b, r = cutmix(x, y, 1.0, np.random.default_rng(seed), gen)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and 0.0 <= r <= 1.0
        assert torch.equal(y_b, y[perm])
        changed = (out != x).any(1)  # (B, H, W)
        for i in range(8):
            if perm[i] != i:
                assert changed[i].sum() == round((1 - r) * 32 * 32)  # the box, area 1 − r
            assert torch.equal(out[i][:, changed[i]], x[perm[i]][:, changed[i]])
        assert torch.equal(out[~changed.unsqueeze(1).expand_as(x)], x[~changed.unsqueeze(1).expand_as(x)])


def test_step_clamps_and_logs_every_key(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, **{"experts.idc.lr_img": 1e-9, "experts.idc.inner_loop": 1,
                                     "distill.dcor_weight": 0.5})
    syn = m.init_images().requires_grad_(True)
    with torch.no_grad():
        syn[0, 0] += 3.0
        syn[1, 0] -= 3.0
    m.setup(syn)
    out = m.step(syn, 0)
    assert syn.max() <= 1 + 1e-6 and syn.min() >= -1e-6  # clamped at the start of the iteration
    assert {"loss", "match", "dcor", "match_e0", "match_e1", "net_acc"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) and not v.requires_grad for v in out.values())
    assert 0 <= out["net_acc"] <= 1
    assert torch.isclose(out["match"], out["match_e0"] + out["match_e1"])
    assert torch.isclose(out["loss"], out["match"] + 0.5 * out["dcor"])


def test_lr_img_scales_with_ipc(tiny_prepared) -> None:
    m1, _ = _method(tiny_prepared)  # IPC 1 per expert
    m4, _ = _method(tiny_prepared, **{"distill.budget": 8})  # IPC 4 per expert
    assert m1.lr_img == pytest.approx(5e-4) and m4.lr_img == pytest.approx(2e-3)
    fixed, _ = _method(tiny_prepared, **{"experts.idc.lr_img": 0.3})
    syn = fixed.init_images().requires_grad_(True)
    fixed.setup(syn)
    assert fixed.opt.lr == 0.3


def test_resume_equals_uninterrupted(tiny_prepared, tmp_path: Path) -> None:
    params = tiny_params(**{**TINY, "experts.idc.iterations": 2, "experts.idc.n_data": 8,
                            "experts.idc.batch_real": 2, "distill.checkpoint_every": 1,
                            "distill.log_every": 1})
    part = make_partition(tiny_prepared.train_labels, 3, 2, 0, tiny_prepared.digest)
    full = run_distillation("idc", params, tiny_prepared, part, CPU, checkpoint_dir=None)

    resumed = interrupted_then_resumed("idc", params, tiny_prepared, part, tmp_path / "ck", stop_at=2)
    assert resumed.resumed_from == 1
    assert torch.equal(resumed.images, full.images)
    assert [r["step"] for r in resumed.history] == [0.0, 1.0]
    assert resumed.metas[0].space == "pixel" and resumed.metas[0].decoding == "multiformation2"


def test_step_logs_the_matching_loss_of_every_class(tiny_prepared) -> None:
    """IDC's own diagnostic: per-class matching losses (summed over experts) add up to ``match``."""
    m, _ = _method(tiny_prepared)
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    out = m.step(syn, 0)
    per_class = torch.stack([out[f"match_c{c}"] for c in range(m.ctx.num_classes)])
    assert (per_class > 0).all()
    assert torch.isclose(per_class.sum(), out["match"], rtol=1e-5)
    assert torch.isclose(out["match_e0"] + out["match_e1"], out["match"], rtol=1e-5)


def test_grouped_pass_equals_one_pass_per_group() -> None:
    """G grouped copies give each group's logits, features, conv-weight gradients and the double
    backward through them exactly as G separate passes of the network do (in float64, so that the
    comparison is about the math, not about float32 summation order)."""
    torch.manual_seed(0)
    net = create_net("convnet3", 3, channels=3, image_size=16).double()
    assert GroupedConvNet.supports(net) and not GroupedConvNet.supports(create_net("convnet3_bn", 3, image_size=16))
    grouped = GroupedConvNet(net)
    groups, n = 4, 5
    x = torch.randn(groups, n, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    w = grouped.replicate(groups)
    logits, feats = grouped.forward(x, w)
    g_grouped = torch.autograd.grad(grouped.group_losses(logits, labels).sum(), w, create_graph=True)
    second = torch.autograd.grad(sum(t.pow(2).sum() for t in g_grouped), x)[0]
    for g in range(groups):
        xg = x[g].detach().requires_grad_(True)
        out = net(xg)
        torch.testing.assert_close(logits[g], out, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(feats[g], net.embed(xg), rtol=1e-9, atol=1e-10)
        ref = torch.autograd.grad(F.cross_entropy(out, labels[g].expand(n)), conv_weights(net), create_graph=True)
        for a, b in zip(g_grouped, ref, strict=True):
            torch.testing.assert_close(a.view(groups, *b.shape)[g], b, rtol=1e-9, atol=1e-11)
        ref_second = torch.autograd.grad(sum(t.pow(2).sum() for t in ref), xg)[0]
        torch.testing.assert_close(second[g], ref_second, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("metric", ["mse", "l1", "cos"])
def test_grouped_gradient_distance_is_per_group(metric: str) -> None:
    torch.manual_seed(1)
    shapes = [(6, 3, 3, 3), (6, 6, 3, 3)]
    real = [[torch.randn(s) for s in shapes] for _ in range(3)]
    syn = [[torch.randn(s) for s in shapes] for _ in range(3)]
    batched = grouped_gradient_distance([torch.cat([r[i] for r in real]) for i in range(2)],
                                        [torch.cat([s[i] for s in syn]) for i in range(2)], 3, metric)
    expected = torch.stack([gradient_distance(r, s, metric) for r, s in zip(real, syn, strict=True)])
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("net", "chunk", "mode"), [("convnet3", None, "grouped"), ("convnet3", 2, "grouped"),
                                                   ("convnet3", None, "auto"), ("convnet3_bn", None, "grouped")])
def test_matching_phase_equals_idc_per_class_steps(tiny_prepared, net: str, chunk: int | None, mode: str) -> None:
    """The batched phase (closed-form momentum steps, grouped or per-class passes) ends where IDC's
    loop ends: for c, loss of class c at the current images, SGD(momentum) step on the one tensor."""
    m, _ = _method(tiny_prepared, **{"distill.net": net, "experts.idc.class_chunk": chunk, "distill.budget": 4,
                                     "experts.idc.match_pass": mode,
                                     "experts.idc.lr_img": 0.05, "distill.dcor_weight": 0.5})
    m.match_aug = IDCAugment("none")  # no augmentation: same batches
    init = m.init_images()
    syn = init.clone().requires_grad_(True)
    m.setup(syn)
    ref = syn.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=m.lr_img, momentum=m.cfg.momentum)
    netw = m.fresh_net(0)
    for phase in range(2):  # the momentum carries over between phases
        per_class, _ = m.match_phase(netw, syn, m.ctx.generator(phase, 2))
        gen = m.ctx.generator(phase, 2)
        n = min(m.cfg.batch_real, *m.ctx.min_counts)
        draws = [m.ctx.sample_indices(k, n, gen, repeat=True) for k in range(m.ctx.noe)]
        for c in range(m.ctx.num_classes):
            total, per_expert, _ = m.match_class(netw, ref, c, [d[c] for d in draws], gen)
            # phase 0 starts from the same images; phase 1 from images that agree to float32 rounding
            # (amplified by the loss's cancellation: it is a squared difference of gradients)
            torch.testing.assert_close(per_class[c], per_expert.detach(), rtol=1e-4 if phase == 0 else 1e-3, atol=1e-6)
            opt.zero_grad()
            total.backward(inputs=[ref])
            opt.step()
        # Same math in another order of float operations; second derivatives through ReLU make a
        # few pixels sensitive to rounding, so compare the update itself: error << movement.
        moved = (ref.detach() - init).norm()
        assert (syn.detach() - ref.detach()).norm() < 1e-2 * moved, ((syn - ref).norm(), moved)
    assert not torch.equal(syn.detach(), init)  # the images did move


@pytest.mark.parametrize("match_pass", ["grouped", "per_class"])
def test_inner_steps_read_nothing_back_to_the_host(tiny_prepared, monkeypatch, match_pass: str) -> None:
    """An outer iteration's device reads do not grow with the inner steps (matching and network
    update): on a GPU nothing inside the inner loop makes the host wait for the queued kernels."""
    counts = []
    for inner in (1, 3):
        m, _ = _method(tiny_prepared, **{"experts.idc.inner_loop": inner, "experts.idc.match_pass": match_pass})
        syn = m.init_images().requires_grad_(True)
        m.setup(syn)
        with device_read_backs(monkeypatch) as reads:
            m.step(syn, 0)
        counts.append(reads.count)
    assert counts[0] == counts[1], counts


def test_device_cutmix_box_is_the_host_rule() -> None:
    """``cutmix_box`` (CutMix's box from device scalars, for a CUDA graph) marks exactly the
    pixels :func:`cutmix` pastes for the same λ, centre and partner permutation, with the same r;
    ``cutmix_static`` without the coin returns the batch itself and r = 1."""
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    for seed in range(30):
        out, y_b, r = cutmix(x, y, 1.0, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
        rng = np.random.default_rng(seed)
        lam = torch.tensor(rng.beta(1.0, 1.0), dtype=torch.float64)
        centre = torch.tensor([int(rng.integers(32)), int(rng.integers(32))])
        box = cutmix_box(32, 32, lam, centre, torch.tensor(True))
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.where(box, x[perm], x), out) and torch.equal(y[perm], y_b)
        assert abs((1.0 - float(box.sum()) / 1024) - r) < 1e-12
    same, _, r1 = cutmix_static(x, y, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, x) and float(r1) == 1.0
    mixed = [float(cutmix_static(x, y, 1.0, torch.Generator().manual_seed(s))[2]) for s in range(20)]
    assert all(0.0 <= v <= 1.0 for v in mixed) and min(mixed) < 0.9


def test_static_inner_steps_equal_eager_without_cutmix(tiny_prepared) -> None:
    """The body a CUDA graph captures (one static network re-initialised in place, zeroed SGD
    momentum, device-side CutMix, sums in buffers), run eagerly: with CutMix off it ends an outer
    iteration exactly where eager IDC does (images, image momentum, logged metrics)."""
    over = {"experts.idc.mix_p": 0.0, "distill.dcor_weight": 0.5, "distill.budget": 4}
    out = {}
    for mode in ("eager", "static"):
        m, _ = _method(tiny_prepared, **over)
        syn = m.init_images().requires_grad_(True)
        m.setup(syn)
        static = StaticInnerSteps(m, syn, capture=False) if mode == "static" else None
        rows = [m.step(syn, it) if static is None else m._static_step(static, syn, it) for it in range(2)]
        out[mode] = (syn.detach().clone(), m.opt.buf.clone(), rows)
    (x_e, b_e, rows_e), (x_s, b_s, rows_s) = out["eager"], out["static"]
    assert torch.equal(x_s, x_e) and torch.equal(b_s, b_e)
    for re_, rs in zip(rows_e, rows_s, strict=True):
        assert re_.keys() == rs.keys()
        for k in re_:
            assert torch.equal(rs[k], re_[k]), k


def test_static_inner_steps_with_cutmix_learn(tiny_prepared) -> None:
    """With device-side CutMix (mix_p 1) the static body runs end to end: finite losses, a
    training accuracy in [0, 1], and images that move."""
    m, _ = _method(tiny_prepared, **{"experts.idc.mix_p": 1.0, "experts.idc.inner_loop": 3})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    static = StaticInnerSteps(m, syn, capture=False)
    x0 = syn.detach().clone()
    rows = [m._static_step(static, syn, it) for it in range(2)]
    assert all(torch.isfinite(r["loss"]) and 0.0 <= float(r["net_acc"]) <= 1.0 for r in rows)
    assert not torch.equal(syn.detach(), x0)


def test_static_inner_step_has_nothing_a_cuda_graph_cannot_capture(tiny_prepared) -> None:
    """The captured body, with several geometric ops per strategy (so the per-unit gated DSA path
    runs) and CutMix on: no host reads, value-dependent shapes or host data (CPU proxy of
    capturability; the eager path sorts samples by group, which reads counts back)."""
    m, _ = _method(tiny_prepared, **{"experts.idc.mix_p": 1.0, "distill.dcor_weight": 0.5,
                                     "experts.idc.match_dsa_strategy": "color_crop_cutout_flip_scale_rotate",
                                     "experts.idc.net_dsa_strategy": "color_crop_scale_rotate"})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    static = StaticInnerSteps(m, syn, capture=False)
    static.begin(0)
    with CaptureBlockers() as blockers:
        static.step()
    assert blockers.found == [] and int(static.correct) >= 0
    with CaptureBlockers() as blockers:  # the check itself: the eager update counts samples per group
        net = m.fresh_net(0)
        m.train_net(net, torch.optim.SGD(net.parameters(), lr=0.01), m.ctx.generator(0, 3), np.random.default_rng(0))
    assert "aten.bincount.default" in blockers.found


def test_cuda_graph_needs_uniform_cutmix_and_is_eager_on_a_cpu(tiny_prepared) -> None:
    """The graph (the default) applies on CUDA only: there it needs mix_beta 1, on a CPU any
    mix_beta runs (eagerly) and the cuda_graph metric says 0."""
    cfg = IDC.config_cls(mix_beta=0.5)
    assert cfg.cuda_graph
    spec = RunSpec(noe=2, ipc=1, num_classes=3, image_shape=(3, 32, 32), net="convnet3", device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="mix_beta 1"):
        IDC.check_inputs(cfg, spec)
    IDC.check_inputs(cfg, dataclasses.replace(spec, device=torch.device("cpu")))
    _method(tiny_prepared, **{"experts.idc.mix_beta": 0.5})
    m, _ = _method(tiny_prepared, **{"experts.idc.cuda_graph": True})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    assert float(m.step(syn, 0)["cuda_graph"]) == 0.0
    with pytest.raises(ValueError, match="CUDA device"):
        StaticInnerSteps(m, syn, capture=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_cuda_graph_replays_the_eager_inner_steps(tiny_prepared) -> None:
    """On CUDA: two outer iterations of replayed inner steps end where the eager static body ends.

    Bound, derived: eager CUDA is not bitwise reproducible itself (cuDNN's backward reduces with
    atomics), and a rounding difference grows wherever it moves a ReLU input across 0 (docs/
    design.md). On the H200 (docs/results/gpu-h200-2026-12-04/call2/idc-graph-diag.txt) two eager
    runs parted by 0.4-0.8 % of the images' movement and 2.6e-3 of the loss; eager against the
    replay by at most 2.0 % and 1.9e-3. A wrong replay (a stale input, a lost update, another
    random draw) changes the step itself, i.e. a difference of the order of the movement. So the
    images must agree to 10 % of how far they moved, the losses to 10 % of how far they moved over
    the two iterations, and the network's training accuracy (a count over the real batch) to 0.1."""
    over = {"experts.idc.cuda_graph": True, "experts.idc.inner_loop": 3, "distill.dcor_weight": 0.5}
    out = {}
    for capture in (False, True):
        params = tiny_params(**{**TINY, **over})
        part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
        m = build_method("idc", params, tiny_prepared, part, torch.device("cuda"))
        syn = m.init_images().requires_grad_(True)
        m.setup(syn)
        x0 = syn.detach().clone()
        static = StaticInnerSteps(m, syn, capture=capture)
        rows = [m._static_step(static, syn, it) for it in range(2)]
        assert (static.graph is not None) == capture
        out[capture] = (x0, syn.detach().clone(), [{k: float(r[k]) for k in ("loss", "match", "net_acc")} for r in rows])
    (x0, x_e, rows_e), (x0_g, x_g, rows_g) = out[False], out[True]
    assert torch.equal(x0, x0_g)
    moved = float((x_e - x0).norm())
    assert moved > 0
    assert float((x_g - x_e).norm()) <= 0.1 * moved
    for k in ("loss", "match"):
        span = abs(rows_e[1][k] - rows_e[0][k])
        assert span > 0, k
        for re_, rg in zip(rows_e, rows_g, strict=True):
            assert abs(rg[k] - re_[k]) <= 0.1 * span, k
    for re_, rg in zip(rows_e, rows_g, strict=True):
        assert abs(rg["net_acc"] - re_["net_acc"]) <= 0.1


@CUDA
def test_cuda_graph_run_logs_replays(tiny_prepared) -> None:
    params = tiny_params(**{**TINY, "experts.idc.cuda_graph": True, "experts.idc.iterations": 3})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 2, 0, tiny_prepared.digest)
    res = run_distillation("idc", params, tiny_prepared, part, torch.device("cuda"))
    assert [row["cuda_graph"] for row in res.history] == [1.0] * 3
    assert all(np.isfinite(row["loss"]) for row in res.history)
