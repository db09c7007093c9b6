"""Tests of moedd.augment.dsa (fast, CPU, tiny tensors)."""

from __future__ import annotations

import pytest
import torch

from moedd.augment import DSA, DSAParams, rotate, scale

SINGLE = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dsa(strategy: str = "color_crop_cutout_flip_scale_rotate") -> DSA:
    return DSA(DSAParams(strategy=strategy))


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Reference shift: out[h, w] = x[h + dx, w + dy], zeros outside."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, -dx):min(h, h - dx), max(0, -dy):min(w, w - dy)] = \
        x[..., max(0, dx):min(h, h + dx), max(0, dy):min(w, w + dy)]
    return out


@pytest.mark.parametrize("strategy", SINGLE + ["color_crop_cutout_flip_scale_rotate"])
@pytest.mark.parametrize("mode", ["siamese", "per_sample"])
def test_shape_dtype_and_grad(strategy: str, mode: str) -> None:
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    aug = dsa(strategy)
    if mode == "siamese":
        y = aug.siamese(x, torch.tensor([0, 0, 1, 1, 2, 2]), 3, gen())
    else:
        y = aug.per_sample(x, gen(), gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_siamese_same_unit_identical_different_units_differ() -> None:
    img = torch.randn(1, 3, 16, 16)
    x = img.repeat(4, 1, 1, 1)
    y = dsa("scale").siamese(x, torch.tensor([0, 0, 1, 1]), 2, gen(3))
    assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])
    assert not torch.allclose(y[0], y[2])


def test_siamese_full_strategy_shares_within_unit() -> None:
    x = torch.randn(1, 3, 16, 16).repeat(40, 1, 1, 1)
    unit = torch.arange(20).repeat_interleave(2)
    y = dsa().siamese(x, unit, 20, gen(1))
    assert torch.equal(y[0::2], y[1::2])


def test_determinism() -> None:
    x = torch.randn(8, 3, 16, 16)
    unit = torch.arange(8) % 4
    aug = dsa()
    assert torch.equal(aug.siamese(x, unit, 4, gen(5)), aug.siamese(x, unit, 4, gen(5)))
    assert torch.equal(aug.per_sample(x, gen(5), gen(9)), aug.per_sample(x, gen(5), gen(9)))
    a = dsa("scale")
    assert not torch.equal(a.siamese(x, unit, 4, gen(5)), a.siamese(x, unit, 4, gen(6)))
    assert not torch.equal(a.per_sample(x, gen(5), gen(9)), a.per_sample(x, gen(6), gen(9)))


def test_per_sample_group_comes_from_the_host_generator() -> None:
    """The group is drawn from ``host`` alone (no device read-back), the parameters from
    ``generator``: the same host seed gives the same group sequence whatever the device
    generator's seed, and the sequence visits several groups."""
    x = torch.randn(4, 3, 16, 16)
    aug = dsa()

    def group_sequence(host_seed: int, dev_seed: int) -> list[tuple[str, ...]]:
        host, dev = gen(host_seed), gen(dev_seed)
        seq = []
        for _ in range(12):
            state = dev.get_state()
            y = aug.per_sample(x, dev, host)
            # which group's op, with the same device draws, gives y
            seq.append(tuple(g for g in aug.groups if torch.equal(
                y, aug._op(g, x, aug._draw(g, len(x), x, torch.Generator().set_state(state))))))
        return seq

    a, b = group_sequence(11, 3), group_sequence(11, 4)
    assert all(len(hit) == 1 for hit in a + b)
    assert a == b and len(set(a)) > 1


def test_channels_last_matches_contiguous() -> None:
    x = torch.randn(12, 3, 16, 16)
    unit = torch.arange(12) % 6
    for strategy in SINGLE + ["color_crop_cutout_flip_scale_rotate"]:
        aug = dsa(strategy)
        ref = aug.siamese(x, unit, 6, gen(2))
        out = aug.siamese(x.to(memory_format=torch.channels_last), unit, 6, gen(2))
        torch.testing.assert_close(out, ref)


def test_per_sample_flip_mixes() -> None:
    img = torch.arange(16.0).view(1, 1, 4, 4)  # asymmetric left/right
    y = dsa("flip").per_sample(img.repeat(64, 1, 1, 1), gen(0), gen(1))
    flipped = (y == img.flip(3)).flatten(1).all(1)
    same = (y == img).flatten(1).all(1)
    assert (flipped | same).all() and flipped.any() and same.any()


def test_crop_is_exact_integer_shift() -> None:
    x = torch.randn(16, 2, 32, 32)
    y = dsa("crop").per_sample(x, gen(4), gen(1))
    shifts = set()
    for i in range(x.shape[0]):
        hits = [(dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)
                if torch.equal(y[i], shifted(x[i], dx, dy))]
        assert len(hits) == 1, i
        shifts.add(hits[0])
    assert len(shifts) > 1


def test_cutout_square_rule() -> None:
    # side = int(32 * 0.5 + 0.5) = 16; centre o in [0, 32]; rows [max(0, o-8), min(31, o+7)]
    # -> each side of the zeroed box is 16, or between 8 and 15 when clipped at a border.
    x = torch.ones(200, 1, 32, 32)
    y = dsa("cutout").per_sample(x, gen(7), gen(1))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    for img in y[:, 0]:
        rows = (img == 0).any(1).nonzero().flatten()
        cols = (img == 0).any(0).nonzero().flatten()
        r0, r1, c0, c1 = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        assert int((img == 0).sum()) == (r1 - r0 + 1) * (c1 - c0 + 1)  # a filled rectangle
        for lo, hi in ((r0, r1), (c0, c1)):
            side = hi - lo + 1
            assert 8 <= side <= 16
            assert side == 16 or lo == 0 or hi == 31
    counts = (y == 0).flatten(1).sum(1)
    assert counts.min() >= 64 and counts.max() == 256


def test_identity_params() -> None:
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(scale(x, torch.ones(3), torch.ones(3)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, torch.zeros(3)), x, atol=1e-5, rtol=0)


def test_invalid_strategy() -> None:
    with pytest.raises(ValueError, match="unknown DSA group"):
        DSAParams(strategy="color_blur")
    with pytest.raises(ValueError):
        DSA(DSAParams(strategy=""))


def test_siamese_group_choice_is_per_unit() -> None:
    img = torch.randn(1, 3, 8, 8)
    y = dsa("flip_color").siamese(img.repeat(64, 1, 1, 1), torch.arange(64), 64, gen(0))
    is_flip = (y == img).flatten(1).all(1) | (y == img.flip(3)).flatten(1).all(1)
    assert is_flip.any() and (~is_flip).any()


@pytest.mark.parametrize("group", SINGLE)
def test_gated_equals_the_picked_op_exactly(group: str) -> None:
    """``gated`` (every op runs, kept by ``torch.where`` on a device-side pick; what a CUDA graph
    captures) is bitwise the picked group's op, and its gradient reaches x through that op only."""
    aug = dsa()
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    prm = [aug._draw(g, len(x), x, gen(7 + i)) for i, g in enumerate(aug.groups)]
    g = aug.groups.index(group)
    y = aug.gated(x, torch.tensor([g]), prm)
    want = aug._op(group, x, prm[g])
    assert torch.equal(y, want)
    w = torch.randn_like(y)
    (gy,) = torch.autograd.grad((y * w).sum(), x)
    (gw,) = torch.autograd.grad((want * w).sum(), x)
    assert torch.equal(gy, gw)


def test_per_sample_static_draws_every_group_on_the_device() -> None:
    """No host generator: the group comes from the device generator (same seed, same result),
    each group is drawn about equally often, and with a one-group strategy the result is
    ``per_sample``'s with the same generator."""
    x = torch.randn(4, 3, 8, 8)
    aug = dsa()
    assert torch.equal(aug.per_sample_static(x, gen(5)), aug.per_sample_static(x, gen(5)))
    dev, hits = gen(1), {g: 0 for g in aug.groups}
    for _ in range(300):
        state = dev.get_state()
        pick = int(torch.randint(len(aug.groups), (1,), generator=torch.Generator().set_state(state)))
        y = aug.per_sample_static(x, dev)
        replay = torch.Generator().set_state(state)
        torch.randint(len(aug.groups), (1,), generator=replay)
        prm = [aug._draw(g, len(x), x, replay) for g in aug.groups]
        assert torch.equal(y, aug._op(aug.groups[pick], x, prm[pick]))
        hits[aug.groups[pick]] += 1
    assert min(hits.values()) > 25, hits  # 50 expected per group
    crop = dsa("crop")
    assert torch.equal(crop.per_sample_static(x, gen(9)), crop.per_sample(x, gen(9), gen(0)))


def test_static_units_equal_sorted_units() -> None:
    """``apply_units(static=True)`` (each op gated per sample on the device: no host counts) gives
    the result of the group-sorted path for per-sample and per-class units, gradients included."""
    aug = dsa()
    x = torch.randn(12, 3, 16, 16, requires_grad=True)
    for unit, n_units in ((torch.arange(12), 12), (torch.arange(3).repeat_interleave(4), 3)):
        draw = aug.draw_units(n_units, x, gen(4))
        a, b = aug.apply_units(x, unit, draw), aug.apply_units(x, unit, draw, static=True)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        w = torch.randn_like(a)
        ga, gb = (torch.autograd.grad((t * w).sum(), x)[0] for t in (a, b))
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5)
        assert torch.equal(aug.siamese(x, unit, n_units, gen(4)), a)
