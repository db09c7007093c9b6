"""Unit tests for moedd.nets: shapes, embed/classifier contract, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moedd.nets import DISPLAY_NAMES, NetProtocol, create_net, list_nets
from moedd.nets.norm import instance_norm
from moedd.registry import UnknownNameError

ALL = list_nets()

# docs/methods.md §Parameter counts (C=10, C=100)
PARAM_COUNTS = {
    "convnet3": (320_010, 504_420),
    "convnet4": (452_490, 498_660),
    "alexnet": (1_872_202, 2_148_772),
    "vgg11": (9_231_114, 9_277_284),
    "resnet18": (11_173_962, 11_220_132),
}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_registry_contents() -> None:
    assert set(ALL) == set(DISPLAY_NAMES)
    assert list_nets("convnet*") == ["convnet3", "convnet3_bn", "convnet4"]


@pytest.mark.parametrize("name", ALL)
def test_forward_embed_grad(name: str) -> None:
    torch.manual_seed(0)
    net = create_net(name, num_classes=10).train()
    assert isinstance(net, NetProtocol)
    x = torch.randn(4, 3, 32, 32)
    out = net(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    feat = net.embed(x)
    assert feat.ndim == 2 and feat.shape == (4, net.classifier.in_features)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x[:2]), net.classifier(net.embed(x[:2])), atol=1e-6)
    net.train()
    net.zero_grad()
    net(x).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ALL)
def test_num_classes_override_and_batch2(name: str) -> None:
    net = create_net(name, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name: str) -> None:
    for c, expected in zip((10, 100), PARAM_COUNTS[name]):
        assert n_params(create_net(name, num_classes=c)) == expected


@pytest.mark.parametrize("name", ["convnet3", "vgg11", "resnet18"])
def test_bn_variant_same_count(name: str) -> None:
    assert n_params(create_net(f"{name}_bn", 10)) == n_params(create_net(name, 10))


def test_alexnet_bn_adds_affine_params() -> None:
    extra = 2 * (128 + 192 + 256 + 192 + 192)
    assert n_params(create_net("alexnet_bn", 10)) == n_params(create_net("alexnet", 10)) + extra


def test_unknown_name() -> None:
    with pytest.raises(UnknownNameError) as err:
        create_net("convnet99", 10)
    msg = str(err.value)
    assert "convnet99" in msg and "convnet3" in msg and "resnet18" in msg


@pytest.mark.parametrize("name", ["convnet3", "resnet18_bn"])
def test_seeded_init_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    a = create_net(name, 10)
    torch.manual_seed(0)
    b = create_net(name, 10)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    net = create_net("convnet3", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        out = net(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


@pytest.mark.parametrize("size, dim", [(28, 2048), (64, 128 * 8 * 8)])
def test_convnet_other_sizes(size: int, dim: int) -> None:
    net = create_net("convnet3", 10, channels=1, image_size=size).eval()
    with torch.no_grad():
        feat = net.embed(torch.randn(2, 1, size, size))
    assert feat.shape == (2, dim) and net(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_fast_pools_match_the_native_kernels() -> None:
    from moedd.nets.pool import AvgPool2x2, MaxPool2x2

    x = torch.randn(3, 5, 32, 32, requires_grad=True)
    for fast, ref in ((AvgPool2x2(), torch.nn.functional.avg_pool2d), (MaxPool2x2(), torch.nn.functional.max_pool2d)):
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x[..., :8, :8]):
            assert torch.allclose(fast(inp), ref(inp, 2), atol=1e-6)
        fast(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None


def test_fast_average_pool_has_exact_first_and_second_derivatives() -> None:
    """The custom backward (un-pool) and double backward (pool again) pass torch's numerical checks."""
    from moedd.nets.pool import AvgPool2x2

    pool = AvgPool2x2()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))
    # a third order, as MTT's unrolled steps under gradient matching would reach
    g = torch.autograd.grad(pool(x).pow(2).sum(), x, create_graph=True)[0]
    gg = torch.autograd.grad(g.pow(3).sum(), x, create_graph=True)[0]
    native = torch.nn.functional.avg_pool2d
    g_ref = torch.autograd.grad(native(x, 2).pow(2).sum(), x, create_graph=True)[0]
    gg_ref = torch.autograd.grad(g_ref.pow(3).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(gg, gg_ref)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_instance_norm_matches_group_norm_to_second_order(layout: torch.memory_format) -> None:
    """The analytic double backward of moedd's instance norm equals autograd's through GroupNorm,
    and both derivatives pass torch's numerical checks (NCHW and channels_last maps)."""
    from moedd.nets.norm import InstanceNorm, instance_norm

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(instance_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))
    up = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    results = []
    for norm in (instance_norm, lambda x_, w_, b_: torch.nn.functional.group_norm(x_, 4, w_, b_)):
        y = norm(x, w, b)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), up, create_graph=True)
        # a loss on all three first derivatives, as gradient matching puts one on the weight grads
        loss = gx.sin().sum() + (gw * gw.detach().flip(0)).sum() + (gb * gw).sum()
        results.append((y, *torch.autograd.grad(loss, (x, w), allow_unused=True)))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref)
    # same parameters and state as the GroupNorm(C, C) it replaces
    assert isinstance(create_net("convnet3", 10).features[1], InstanceNorm)
    assert list(InstanceNorm(4).state_dict()) == list(torch.nn.GroupNorm(4, 4).state_dict())


def test_instance_norm_refuses_a_third_derivative() -> None:
    """No method needs one; asking for it fails loudly instead of returning a wrong value."""
    from moedd.nets.norm import instance_norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    r = torch.randn(2, 3, 4, 4)  # (a plain sum would be blind: the map's mean cancels)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    g = torch.autograd.grad((instance_norm(x, w, b) * r).pow(3).sum(), x, create_graph=True)[0]
    gg = torch.autograd.grad((g * r).pow(2).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad((gg * r).sum(), x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(padding=3), dict(stride=2, padding=1, groups=2),
                                      dict(padding=2, dilation=2, bias=False)])
def test_conv_matches_torch_conv_to_second_order(layout: torch.memory_format, geometry: dict) -> None:
    """moedd's Conv2d (hand-written double backward on the CPU) equals nn.Conv2d's values, first
    and second derivatives, with all three first derivatives under a loss (MTT) and with the
    meta-gradient taken to the input only (IDC: the weights' term is skipped)."""
    from moedd.nets.conv import Conv2d

    torch.manual_seed(0)
    kw = dict(kernel_size=3, **geometry)
    ours = Conv2d(4, 6, **kw).double()
    ref = torch.nn.Conv2d(4, 6, **kw).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))
    up = torch.randn_like(ref(x))
    for wrt in ("all", "input"):
        results = []
        for net in (ours, ref):
            params = [p for p in net.parameters()]
            y = net(x)
            firsts = torch.autograd.grad(y, [x, *params], up, create_graph=True)
            loss = sum((g.sin() * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sum() for g in firsts)
            targets = [x, *params] if wrt == "all" else [x]
            results.append((y, *firsts, *torch.autograd.grad(loss, targets, materialize_grads=True)))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)
    assert isinstance(create_net("convnet3", 10).features[0], Conv2d)
    assert list(Conv2d(4, 6, 3).state_dict()) == list(torch.nn.Conv2d(4, 6, 3).state_dict())


def test_functional_conv2d_matches_f_conv2d_to_second_order() -> None:
    """moedd.nets.conv.conv2d (the grouped IDC pass's convolution) equals F.conv2d with the same
    stride / padding / dilation / groups, values and first and second derivatives (gradgradcheck
    of ours against the numerical ones, and equal second derivatives)."""
    import torch.nn.functional as F

    from moedd.nets.conv import conv2d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    geo = dict(stride=(2, 1), padding=1, dilation=1, groups=2)
    assert torch.autograd.gradgradcheck(lambda *a: conv2d(*a, **geo), (x, w, b))
    out = []
    for fn in (conv2d, F.conv2d):
        y = fn(x, w, b, **geo)
        g = torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=True)
        out.append((y, *g, *torch.autograd.grad(sum(t.sin().sum() for t in g), (x, w, b))))
    for a, r in zip(*out, strict=True):
        torch.testing.assert_close(a, r)


def test_conv_refuses_a_third_derivative() -> None:
    from moedd.nets.conv import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    gw = torch.autograd.grad(conv(x).pow(2).sum(), conv.weight, create_graph=True)[0]
    gx = torch.autograd.grad(gw.pow(2).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad(gx.pow(2).sum(), x)


def test_conv_computes_only_the_derivatives_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients w.r.t. the weights compute no input gradient for the first layer, and a
    meta-gradient w.r.t. the input only computes no weight term (IDC's case)."""
    import moedd.nets.conv as conv_mod

    masks: list[tuple[bool, bool, bool]] = []
    native = conv_mod._conv_backward

    def spy(g, x, w, geo, mask):
        masks.append(tuple(mask))
        return native(g, x, w, geo, mask)

    monkeypatch.setattr(conv_mod, "_conv_backward", spy)
    torch.manual_seed(0)
    conv = conv_mod.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    gw, gb = torch.autograd.grad(conv(x).pow(2).sum(), (conv.weight, conv.bias), create_graph=True)
    assert masks == [(False, True, True)]
    masks.clear()
    torch.autograd.grad(gw.pow(2).sum(), x)
    # d/dx through ∂L/∂W, and through the forward conv's output (∂L/∂W depends on it); no weight term
    assert masks == [(True, False, False)] * 2


def test_instance_norm_under_autocast_runs_in_float32() -> None:
    """Autocast hands the norm a bf16 map with float32 parameters; CUDA's fused kernel refuses the
    mix (seen on the H200: the bf16 DM bench row stopped there), so the map is brought to float32
    first and the output is float32, as autocast's ``group_norm`` gives on CUDA: the same numbers
    as the float32 norm of the bf16 map, bit for bit, and a gradient that reaches the bf16 map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, 6, generator=g).to(torch.bfloat16).requires_grad_(True)
    w, b = torch.randn(8, generator=g, requires_grad=True), torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = instance_norm(x, w, b)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.group_norm(x.detach().float(), 8, w.detach(), b))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and w.grad is not None
