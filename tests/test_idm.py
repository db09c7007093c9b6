"""IDM experts: mosaic init, partition & expansion, model queue, accuracy-weighted CE, per-class
image steps, exact resume, config validation."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupted_then_resumed, tiny_params
from moedd.config import ConfigError
from moedd.data import make_partition
from moedd.distill import build_method, run_distillation
from moedd.synthetic import decode_quadrants
from moedd.experts import EXPERTS
from moedd.experts.idm import ClassSequentialSGD

CPU = torch.device("cpu")
TINY = {  # the machine is shared: as few images per step as still test something (IPC 1 at NoE 2)
    "distill.budget": 2, "experts.idm.iterations": 4, "experts.idm.batch_real": 2, "experts.idm.trained_bs": 8,
    "experts.idm.model_train_steps": 1, "experts.idm.fetch_net_num": 1, "experts.idm.net_generate_interval": 2,
    "experts.idm.net_num": 4,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared with long runs: one intra-op thread is several times
    faster there than two contending ones (and the results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(**overrides):
    return tiny_params(**{**TINY, **overrides})


def _method(prepared, noe: int = 2, **overrides):
    part = make_partition(prepared.train_labels, prepared.num_classes, noe, 0, prepared.digest)
    return build_method("idm", _params(**overrides), prepared, part, CPU), part


def _ready(prepared, noe: int = 2, **overrides):
    m, part = _method(prepared, noe, **overrides)
    syn = m.init_images().detach().clone().requires_grad_(True)
    m.setup(syn)
    return m, syn, part


def test_registered_with_space_and_decoding(tiny_prepared) -> None:
    assert "idm" in EXPERTS.names()
    m, _ = _method(tiny_prepared)
    assert (m.name, m.space, m.decoding) == ("idm", "normalized", "multiformation2")
    m1, _ = _method(tiny_prepared, **{"experts.idm.factor": 1, "distill.budget": 4})
    assert m1.decoding == "none"
    assert m1.init_images().shape == (2, 3 * 2, 3, 32, 32)


def test_init_mosaics_of_four_distinct_real_images_of_the_class_from_own_shard(tiny_prepared) -> None:
    m, part = _method(tiny_prepared, **{"distill.budget": 4})
    syn = m.init_images()
    assert syn.shape == (2, 3 * 2, 3, 32, 32)  # budget 4, NoE 2: IPC 2; 12 images per class and shard

    def small(idx):
        return F.interpolate(m.ctx.normalize(tiny_prepared.train_images[idx]), size=(16, 16),
                             mode="bilinear", align_corners=False)

    quads = [(slice(0, 16), slice(0, 16)), (slice(16, 32), slice(0, 16)),
             (slice(0, 16), slice(16, 32)), (slice(16, 32), slice(16, 32))]
    for k, shard in enumerate(part.shards):
        own, other = small(shard), small(part.shards[1 - k])
        labels = tiny_prepared.train_labels[shard]
        found = []
        for i, img in enumerate(syn[k]):
            for rows, cols in quads:
                q = img[:, rows, cols]
                dist = (own - q).abs().flatten(1).amax(1)
                assert dist.min() < 1e-5  # a downscaled real image of shard k ...
                assert labels[dist.argmin()] == i // 2  # ... of the stored image's class
                assert (other - q).abs().flatten(1).amax(1).min() > 1e-3  # not of the other shard
                found.append(int(dist.argmin()))
        assert len(set(found)) == 3 * 2 * 4  # 4·IPC different images per class (the class has 12)


def test_expansion_gives_four_upsampled_quadrants_per_image(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, **{"distill.budget": 4})
    syn = m.init_images()
    dec = m.expand(syn)
    assert dec.shape == (2, 3, 4 * 2, 3, 32, 32)  # (NoE, C, 4·IPC, ...)
    for e in range(2):
        for i in range(6):
            c, j = divmod(i, 2)
            ref, _ = decode_quadrants(syn[e, i : i + 1], torch.tensor([c]))
            for q in range(4):
                assert torch.equal(dec[e, c, q * 2 + j], ref[q])


def test_images_receive_gradients_and_objective_decreases(tiny_prepared) -> None:
    m, syn, _ = _ready(tiny_prepared, noe=1, **{"distill.budget": 1, "grid.noe": [1], "experts.idm.fetch_net_num": 0,
                                                "experts.idm.net_generate_interval": 1000})
    for qn in m.queue:  # give the CE term a weight (a net with acc 0 has none)
        qn.correct.fill_(1)
        qn.seen.fill_(10)
    loss0, out0 = m.objective(syn, 1)
    loss0.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    assert all(p.grad is None for qn in m.queue for p in qn.net.parameters())  # matching nets are frozen
    assert out0["ce"] > 0
    syn.grad = None
    for _ in range(5):  # same iteration index: same net, real batch and augmentation
        m.step(syn, 1)
    loss1, _ = m.objective(syn, 1)
    assert loss1 < 0.7 * loss0


def test_queue_grows_at_the_interval_is_capped_and_nets_train(tiny_prepared) -> None:
    m, syn, _ = _ready(tiny_prepared, noe=1, **{"distill.budget": 1, "grid.noe": [1], "experts.idm.net_num": 5,
                                                "experts.idm.net_generate_interval": 2, "experts.idm.fetch_net_num": 2})
    assert [qn.index for qn in m.queue] == [0, 1, 2]
    sizes = [float(m.step(syn, it)["queue_size"]) for it in range(5)]
    assert sizes == [4, 4, 5, 5, 5]  # pushes at it = 0, 2, 4 (IDM pushes at it % interval == 0)
    assert [qn.index for qn in m.queue] == [1, 2, 3, 4, 5]  # oldest popped
    assert not any(p.requires_grad for qn in m.queue for p in qn.net.parameters())  # frozen between trainings
    total_seen = sum(int(qn.seen) for qn in m.queue)
    assert 8 <= total_seen <= 5 * 2 * 8 and total_seen % 8 == 0  # trained on real batches of 8
    for qn in m.queue:
        acc = float(qn.accuracy())
        assert 0.0 <= acc <= 100.0
        expected = 100.0 * int(qn.correct) / int(qn.seen) if int(qn.seen) else 0.0
        assert acc == pytest.approx(expected)
    # a queue net depends only on (seed, creation index): re-creating index 1 gives the same weights
    m2, _, _ = _ready(tiny_prepared)
    first = m2.queue[1].net.state_dict()
    m2.created = 1
    again = m2._new_net().net.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(m2.queue[0].net.state_dict()["features.0.weight"], first["features.0.weight"])


def test_ce_term_is_weighted_by_accuracy_in_percent(tiny_prepared) -> None:
    m, syn, _ = _ready(tiny_prepared, **{"experts.idm.ce_weight": 0.5, "distill.dcor_weight": 0.0})
    with torch.no_grad():
        loss, out = m.objective(syn, 0)
    assert float(out["ce"]) > 0
    assert torch.allclose(loss, out["match"])  # acc 0: no CE contribution
    for qn in m.queue:
        qn.correct.fill_(1)
        qn.seen.fill_(4)  # 25 %
    with torch.no_grad():
        loss, out = m.objective(syn, 0)
    assert float(out["net_acc"]) == pytest.approx(25.0)
    assert torch.allclose(loss, out["match"] + 0.5 * 25.0 * out["ce"], rtol=1e-5)


def _toy(num_classes: int = 3, ipc: int = 2, dim: int = 5):
    """A fixed 'network' and per-class targets: loss_c depends only on the rows of class c."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, num_classes * ipc, dim, generator=gen)
    w = torch.randn(dim, 4, generator=gen)
    targets = torch.randn(num_classes, 4, generator=gen)

    def loss_c(x: torch.Tensor, c: int, shift: float = 0.0) -> torch.Tensor:
        f = torch.tanh((x[0, c * ipc : (c + 1) * ipc] + shift) @ w).mean(0)
        return (f - targets[c]).pow(2).sum()

    return x0, loss_c


def _per_class_steps(x0, loss_c, num_classes, lr, momentum, iters, passes=1):
    """IDM literally: one optimizer on one tensor, zero_grad/backward/step for every class."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
    for it in range(iters):
        for p in range(passes):  # matching nets, one after another
            for c in range(num_classes):
                opt.zero_grad()
                loss_c(x, c, 0.1 * (it + p)).backward()
                opt.step()
    return x.detach()


def _joint_steps(x0, loss_c, num_classes, lr, momentum, iters):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
    for it in range(iters):
        opt.zero_grad()
        sum(loss_c(x, c, 0.1 * it) for c in range(num_classes)).backward()
        opt.step()
    return x.detach()


def test_per_class_steps_vs_one_joint_step() -> None:
    """The claim 'per-class SGD steps == one joint step on the sum' holds without momentum only;
    ClassSequentialSGD reproduces the per-class steps exactly with one gradient per pass."""
    x0, loss_c = _toy()
    # momentum 0: per-class steps equal one joint step on the sum (disjoint rows, fixed network)
    a = _per_class_steps(x0, loss_c, 3, lr=0.5, momentum=0.0, iters=3)
    b = _joint_steps(x0, loss_c, 3, lr=0.5, momentum=0.0, iters=3)
    assert torch.allclose(a, b, atol=1e-6)
    # IDM's momentum 0.5 on ONE tensor: every step also moves the other classes by their momentum
    a = _per_class_steps(x0, loss_c, 3, lr=0.5, momentum=0.5, iters=3)
    b = _joint_steps(x0, loss_c, 3, lr=0.5, momentum=0.5, iters=3)
    assert (a - b).abs().max() > 1e-3
    # the closed form used by the IDM expert equals the literal loop (3 iterations x 2 nets)
    a = _per_class_steps(x0, loss_c, 3, lr=0.5, momentum=0.5, iters=3, passes=2)
    x = x0.clone().requires_grad_(True)
    opt = ClassSequentialSGD(x, num_classes=3, per_class=2, lr=0.5, momentum=0.5)
    for it in range(3):
        for p in range(2):
            z = opt.lookahead().requires_grad_(True)
            (g,) = torch.autograd.grad(sum(loss_c(z, c, 0.1 * (it + p)) for c in range(3)), z)
            opt.step(g)
    assert torch.allclose(x.detach(), a, atol=1e-6)


_LITERAL = {"experts.idm.fetch_net_num": 0, "experts.idm.net_generate_interval": 1000,
            "experts.idm.train_net_num": 2, "experts.idm.lr_img": 0.5, "distill.dcor_weight": 0.5}


def _ready_in(prepared, dtype: torch.dtype):
    """The ``_LITERAL`` problem with its networks, normalisation and images in ``dtype``.

    Built in float32 and then cast, so a float64 copy computes the same problem (same network
    weights, real batches and augmentation draws) in nearly exact arithmetic."""
    m, syn, _ = _ready(prepared, **_LITERAL)
    syn = syn.detach().to(dtype).requires_grad_(True)
    m.setup(syn)  # the optimiser in dtype; the queue is rebuilt from the same seeds
    m.ctx._mean, m.ctx._std = m.ctx._mean.to(dtype), m.ctx._std.to(dtype)
    for n, qn in enumerate(m.queue):
        qn.net.to(dtype)
        qn.correct.fill_(n + 1)  # fixed accuracies: the CE weight is active and known
        qn.seen.fill_(8)
    return m, syn


def test_step_equals_literal_per_class_loop_of_idm(tiny_prepared) -> None:
    """The expert's step on the real objective (2 experts, 2 matching nets, dCor and CE on)
    equals IDM's loop: per net, per class, SGD(momentum) step on the one image tensor.

    Compared in float64, because the claim is about the algebra of the closed form. The loss's
    gradient is discontinuous wherever a ReLU input crosses 0, and the closed form and the loop
    evaluate it at points that differ by rounding; in float32 (about 3e6 ReLU inputs per
    evaluation in the first layer here, norm outputs moved by ~1e-6) an O(1) number of them lie
    that close to 0 on some kernel paths, one flip moves a pixel's gradient by ~2e-3 and, after
    lr 0.5 and momentum, the images by ~1e-2: that is what AVX-512 on AMD EPYC showed. In float64
    the points differ by ~1e-16 and the expected number of flips is ~1e-8.

    Tolerance, derived: each of the C·P = 6 per-class steps rounds every element once in each
    computation (<= eps·|x|), and the gradient passes an input change on at most K times
    (K ~ 7 measured with 1e-14 perturbations on this problem; 32 allowed):
    2 · C·P · K · eps · max|x|, about 1e-13 here; the difference measured is ~1e-15."""
    m, syn = _ready_in(tiny_prepared, torch.float64)
    ref = syn.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.5, momentum=0.5)
    rows = torch.arange(3).view(1, 3, 1, 1, 1)  # IPC 1: row i is class i
    it = 1  # one iteration: the second net's pass already starts from a non-zero momentum buffer
    gen_real, gen_dsa = m.ctx.generator(it, 3), m.ctx.generator(it, 2)  # the streams step() uses
    steps = 0
    for qn in m.matching_nets(it):
        s_real, s_dsa = gen_real.get_state(), gen_dsa.get_state()
        for c in range(3):  # the same real batch and augmentation for every class of this net
            gen_real.set_state(s_real)
            gen_dsa.set_state(s_dsa)
            total, _ = m.net_loss(qn, ref, gen_real, gen_dsa)
            (g,) = torch.autograd.grad(total, ref)
            opt.zero_grad()
            ref.grad = g * (rows == c)  # the gradient of L_c: the rows of class c
            opt.step()
            steps += 1
    m.step(syn, it)
    tol = 2 * steps * 32 * torch.finfo(torch.float64).eps * float(ref.detach().abs().max())
    assert float((syn.detach() - ref.detach()).abs().max()) <= tol
    assert (syn.detach() - m.init_images().to(syn.dtype)).abs().max() > 1e-2  # the images did move


def test_float32_rounding_moves_a_step_by_little(tiny_prepared) -> None:
    """What rounding (and the ReLU kinks it may cross) does to one float32 IDM iteration: its
    images stay within 5 % of the step's length (max norm) of the same iteration in float64.
    The requirement, not a fitted tolerance: float32 against float64 here crosses one kink on
    the AVX-512 and AMX kernel paths (1.02e-2 of a 1.75 step, 0.6 %) and on AVX2 (6.3e-3); a
    step without crossings differs by ~1e-6."""
    m32, syn32 = _ready_in(tiny_prepared, torch.float32)
    m64, syn64 = _ready_in(tiny_prepared, torch.float64)
    start = syn64.detach().clone()
    assert torch.equal(syn32.detach().double(), start)  # one problem, two precisions
    m32.step(syn32, 1)
    m64.step(syn64, 1)
    length = float((syn64.detach() - start).abs().max())
    assert length > 1e-1
    assert float((syn32.detach().double() - syn64.detach()).abs().max()) <= 0.05 * length


def test_state_dict_round_trip_restores_queue_and_optimisers(tiny_prepared) -> None:
    """Every queue net is trained every iteration (fetch = net_num), so a lost momentum buffer,
    meter or weight would show in the continued runs."""
    cfg = {"distill.budget": 1, "grid.noe": [1], "experts.idm.fetch_net_num": 4, "experts.idm.net_num": 4}
    a, syn_a, _ = _ready(tiny_prepared, noe=1, **cfg)
    for it in range(3):
        a.step(syn_a, it)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # as the driver loads checkpoints
    b, syn_b, _ = _ready(tiny_prepared, noe=1, **cfg)
    with torch.no_grad():
        syn_b.copy_(syn_a)
    b.load_state_dict(state)
    for it in range(3, 5):
        out_a, out_b = a.step(syn_a, it), b.step(syn_b, it)
        assert all(torch.equal(out_a[key], out_b[key]) for key in out_a)
    assert torch.equal(syn_a, syn_b)
    assert torch.equal(a.opt.buf, b.opt.buf) and a.opt.buf.abs().sum() > 0
    assert a.created == b.created and [q.index for q in a.queue] == [q.index for q in b.queue]
    for qa, qb in zip(a.queue, b.queue, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(qa.net.parameters(), qb.net.parameters(), strict=True))
        assert (int(qa.correct), int(qa.seen)) == (int(qb.correct), int(qb.seen)) and int(qa.seen) > 0
        for x, y in zip(qa.net.parameters(), qb.net.parameters(), strict=True):
            assert torch.equal(qa.opt.state[x]["momentum_buffer"], qb.opt.state[y]["momentum_buffer"])


def test_resume_equals_uninterrupted(tiny_prepared, tmp_path: Path) -> None:
    params = _params(**{"experts.idm.iterations": 6, "distill.checkpoint_every": 2, "distill.log_every": 1,
                        "experts.idm.fetch_net_num": 2})
    part = make_partition(tiny_prepared.train_labels, 3, 2, 0, tiny_prepared.digest)
    full = run_distillation("idm", params, tiny_prepared, part, CPU, checkpoint_dir=None)

    resumed = interrupted_then_resumed("idm", params, tiny_prepared, part, tmp_path / "ck", stop_at=3)
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.images, full.images)
    assert resumed.history == full.history  # every metric, queue accuracies included
    assert max(r["net_acc"] for r in full.history) > 0  # the CE weight was active
    assert [r["queue_size"] for r in full.history] == [4] * 6  # pushes at 0, 2, 4 (oldest popped)
    assert resumed.metas[0].decoding == "multiformation2" and resumed.metas[0].space == "normalized"
    assert {"loss", "match", "ce", "dcor", "queue_size", "match_e0", "match_e1"} <= set(full.history[0])


@pytest.mark.parametrize(("key", "value"), [
    ("iterations", -1), ("factor", 3), ("net_num", 0), ("momentum", 1.0), ("lr_img", 0.0),
    ("ce_weight", -0.1), ("trained_bs", 0), ("net_generate_interval", 0), ("unknown", 1),
])
def test_invalid_config_is_rejected(key: str, value) -> None:
    with pytest.raises(ConfigError, match=f"experts.idm.{key}"):
        tiny_params(**{f"experts.idm.{key}": value})
