"""Mixture-of-experts parts: distance correlation and mixup fusion."""

from __future__ import annotations

import numpy as np
import torch

from moedd.moe import MixupFusion, dcor2, expert_dcor_loss


def test_dcor_is_one_for_dependent_and_small_for_independent() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    assert torch.isclose(dcor2(x, x), torch.tensor(1.0), atol=1e-4)
    assert torch.isclose(dcor2(x, 3 * x), torch.tensor(1.0), atol=1e-4)  # rows are normalised first
    y = torch.randn(200, 16, generator=g)
    r = dcor2(x, y)  # the V-statistic is biased upwards at finite n, but far from 1
    assert r < 0.3
    assert dcor2(x, x + 0.5 * y) > 0.6
    assert 0.0 <= r <= 1.0 and torch.isclose(r, dcor2(y, x))


def test_dcor_is_batched_and_differentiable() -> None:
    x = torch.randn(4, 6, 8, requires_grad=True)
    y = torch.randn(4, 6, 5)
    r = dcor2(x, y)
    assert r.shape == (4,)
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_expert_dcor_loss() -> None:
    f = torch.randn(1, 3, 5, 8)
    assert expert_dcor_loss(f) == 0
    same = torch.randn(1, 3, 5, 8).expand(2, -1, -1, -1)
    assert torch.isclose(expert_dcor_loss(same), torch.tensor(3.0), atol=1e-3)  # 3 classes x dCor 1


def _pool():
    # 2 experts x 2 classes x 3 images; each image is a constant = a unique id
    labels = torch.tensor([0, 0, 0, 1, 1, 1] * 2)
    experts = torch.tensor([0] * 6 + [1] * 6)
    images = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 2, 2).contiguous()
    return images, labels, experts


def test_mixup_mixes_same_class_images_of_another_expert() -> None:
    images, labels, experts = _pool()
    fuse = MixupFusion(images, labels, experts, p=1.0, alpha=1.0)
    assert fuse.active
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    idx = torch.arange(12)
    for _ in range(20):
        out = fuse(images[idx], idx, g, rng)
        for i in range(12):
            v = out[i, 0, 0, 0].item()
            # v = lam*i + (1-lam)*j with j of the same class, other expert; solve for possible j
            candidates = [j for j in range(12) if labels[j] == labels[i] and experts[j] != experts[i]]
            ok = any(min(i, j) - 1e-4 <= v <= max(i, j) + 1e-4 for j in candidates)
            assert ok, (i, v)
            assert torch.allclose(out[i], out[i, 0, 0, 0].expand_as(out[i]))


def test_mixup_is_identity_without_partners_or_with_p_zero() -> None:
    images, labels, experts = _pool()
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    idx = torch.arange(12)
    assert torch.equal(MixupFusion(images, labels, experts, p=0.0, alpha=1.0)(images, idx, g, rng), images)
    one = MixupFusion(images[:6], labels[:6], torch.zeros(6, dtype=torch.long), p=1.0, alpha=1.0)
    assert not one.active
    assert torch.equal(one(images[:6], idx[:6], g, rng), images[:6])


def test_mixup_probability_is_respected() -> None:
    images, labels, experts = _pool()
    fuse = MixupFusion(images, labels, experts, p=0.5, alpha=1.0)
    g, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    idx = torch.arange(12).repeat(200)
    out = fuse(images[idx], idx, g, rng)
    changed = (out[:, 0, 0, 0] != images[idx][:, 0, 0, 0]).float().mean().item()
    assert 0.4 < changed < 0.6
