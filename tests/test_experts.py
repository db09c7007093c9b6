"""Experts: registry, random real selection, DM objective and gradients, joint dCor term."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_params
from moedd.data import make_partition
from moedd.distill import build_method
from moedd.experts import EXPERTS
from moedd.experts.base import siamese_features

CPU = torch.device("cpu")


def _method(prepared, name: str, noe: int = 2, **overrides):
    params = tiny_params(**overrides)
    part = make_partition(prepared.train_labels, prepared.num_classes, noe, 0, prepared.digest)
    return build_method(name, params, prepared, part, CPU), part


def test_registry_lists_the_builtin_experts() -> None:
    assert {"random", "dm"} <= set(EXPERTS.names())


@pytest.mark.parametrize("name", [n for n in EXPERTS.names() if not EXPERTS.get(n).needs_trajectories])  # MTT: test_mtt.py
def test_every_expert_runs_at_its_smoke_size(tiny_prepared, name: str) -> None:
    """Registry-driven smoke test: init shapes, and every step (the method's own smoke sizes)."""
    m, _ = _method(tiny_prepared, name)
    syn = m.init_images().requires_grad_(True)
    assert syn.shape == (2, 3 * 2, 3, 32, 32)
    m.setup(syn)
    for it in range(m.iterations):
        out = m.step(syn, it)
        assert all(torch.isfinite(v) for v in out.values())


def test_random_expert_takes_real_images_of_its_own_shard(tiny_prepared) -> None:
    m, part = _method(tiny_prepared, "random")
    syn = m.init_images()
    for k, shard in enumerate(part.shards):
        own = m.ctx.normalize(tiny_prepared.train_images[shard])
        other = m.ctx.normalize(tiny_prepared.train_images[part.shards[1 - k]])
        for i, img in enumerate(syn[k]):
            assert (own - img).abs().flatten(1).amax(1).min() < 1e-5  # an image of shard k
            assert (other - img).abs().flatten(1).amax(1).min() > 1e-3  # not of the other shard
            assert tiny_prepared.train_labels[shard][(own - img).abs().flatten(1).amax(1).argmin()] == i // 2


def test_dm_images_receive_gradients_and_objective_decreases(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, "dm", **{"experts.dm.lr_img": 0.5, "distill.dcor_weight": 0.0})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    loss0, _ = m.objective(syn, 0)
    loss0.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    for _ in range(8):  # same iteration index: same network, real batch and augmentation
        m.step(syn, 0)
    loss1, _ = m.objective(syn, 0)
    assert loss1 < 0.7 * loss0


def test_dm_siamese_augmentation_is_shared_between_real_and_synthetic(tiny_prepared) -> None:
    """If the synthetic images equal the real ones, their features are identical."""
    m, _ = _method(tiny_prepared, "dm", noe=1, **{"experts.dm.batch_real": 2, "distill.budget": 2})
    net = torch.nn.Identity()
    net.embed = lambda x: x.flatten(1)  # type: ignore[attr-defined]
    ((real, n),) = m.ctx.sample_real_each(2, m.ctx.generator(0))
    f_real, f_syn = siamese_features(net, m.dsa, m.ctx, real, n, real.clone(), n, m.ctx.generator(5, 2))
    assert torch.allclose(f_real, f_syn, atol=1e-6)


def test_dcor_term_pushes_experts_apart(tiny_prepared) -> None:
    m, _ = _method(tiny_prepared, "dm", **{"distill.dcor_weight": 50.0, "experts.dm.lr_img": 0.2,
                                           "distill.budget": 8, "experts.dm.batch_real": 4})
    syn = m.init_images().requires_grad_(True)
    m.setup(syn)
    _, before = m.objective(syn, 0)
    for _ in range(10):
        m.step(syn, 0)
    _, after = m.objective(syn, 0)
    assert after["dcor"] < before["dcor"]
