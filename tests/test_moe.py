"""Mixture-of-experts parts: distance correlation and mixup fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedd.config import ConfigError
from moedd.moe import MixupFusion, dcor2, dcor2_bias_corrected, expert_dcor_loss


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
    for estimator in ("v_statistic", "bias_corrected"):  # 3 classes x dCor 1
        assert torch.isclose(expert_dcor_loss(same, estimator), torch.tensor(3.0), atol=1e-3)


def _unbiased_dcov2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Huo & Székely (Technometrics 58, 2016), eq. (3.3): the U-statistic form of the unbiased
    dCov², written from plain distance matrices with no centring (another route than the code's)."""
    n = x.shape[0]
    a = torch.cdist(torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x, dim=1))
    b = torch.cdist(torch.nn.functional.normalize(y, dim=1), torch.nn.functional.normalize(y, dim=1))
    a.fill_diagonal_(0)
    b.fill_diagonal_(0)
    return ((a * b).sum() + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (a.sum(1) * b.sum(1)).sum()) / (n * (n - 3))


@pytest.mark.parametrize("n", [4, 5, 10, 33])
def test_bias_corrected_dcor_equals_the_u_statistic_form(n: int) -> None:
    """U-centring (the code) and Huo & Székely's sum formula are the same estimator. float64; the
    code's distances carry sqrt(d² + 1e-12), which moves each by <= 1e-12 / (2 d) ~ 1e-12 for
    normalised random rows (d ~ 1.4), far inside rtol 1e-9."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    y = x[:, :3] ** 2 + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)  # dependent, not linearly
    expected = _unbiased_dcov2(x, y) / torch.sqrt(_unbiased_dcov2(x, x) * _unbiased_dcov2(y, y))
    assert torch.allclose(dcor2_bias_corrected(x, y), expected, rtol=1e-9, atol=1e-12)


def test_v_statistic_saturates_at_few_rows_where_the_bias_corrected_does_not() -> None:
    """MoE-DD's regime: 5 images per class per expert, 2,048 features. For independent rows the
    V-statistic sits at 1, as for identical ones (Székely & Rizzo 2013: it tends to 1 as the
    dimension grows at fixed n), so minimising it cannot make experts diverse; the bias-corrected
    R* is centred on 0. Bound: there sqrt(v - 1)·R*/sqrt(1 - R*²) is t-distributed with v - 1 = 4
    degrees of freedom (v = n(n - 3)/2 = 5), so the sd of R* is below 0.5 and that of a mean of
    400 below 0.025: 0.1 is four of them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, 2048, generator=g, dtype=torch.float64)
    y = torch.randn(400, 5, 2048, generator=g, dtype=torch.float64)
    assert dcor2(x, y).min() > 0.99 and dcor2(x, x).min() > 0.99  # blind to dependence
    assert abs(dcor2_bias_corrected(x, y).mean()) < 0.1
    assert torch.allclose(dcor2_bias_corrected(x, x), torch.ones(400, dtype=torch.float64), rtol=1e-9)


def test_bias_corrected_needs_four_rows_and_the_grid_is_checked_up_front() -> None:
    with pytest.raises(ValueError, match="needs >= 4 paired rows, got 3"):
        dcor2_bias_corrected(torch.randn(3, 8), torch.randn(3, 8))
    from moedd.params import load_params

    with pytest.raises(ConfigError, match=r"^invalid params: 3x2: the bias-corrected dCor needs >= 4 images per class per expert"):
        load_params(None, {"grid.experts": ["dm"], "grid.noe": [2, 1], "grid.budgets": [6], "distill.budget": 6})
    load_params(None, {"grid.experts": ["dm"], "grid.noe": [2, 1], "grid.budgets": [6], "distill.budget": 6,
                       "distill.dcor_estimator": "v_statistic"})  # Zhen et al.'s estimator takes any n


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
