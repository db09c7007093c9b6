"""2-D convolution with an explicit double backward on the CPU.

MTT differentiates unrolled training steps and IDC differentiates gradients, so both run the
double backward of every convolution: the gradient of ``convolution_backward``'s outputs
(∂L/∂x and ∂L/∂W) with respect to its inputs (the upstream gradient gO, x and W). PyTorch's own
formula rebuilds the weight-gradient terms from forward convolutions on transposed (batch <->
channel) tensors, with a full-size copy to make each one contiguous and zero-filled buffers for the
terms a caller did not ask for. Written out, every term is one native oneDNN call, with no
transposes, given the incoming gradients U (of ∂L/∂x) and V (of ∂L/∂W) and gb (of ∂L/∂b):

    ∂/∂gO = conv(U, W) + conv(x, V) + gb       (forward convolutions)
    ∂/∂x  = backward-data(gO, weight V)        (the x-gradient of a conv with weight V)
    ∂/∂W  = backward-weight(gO, input U)       (the W-gradient of a conv with input U)

(the backward is bilinear in (gO, W) for ∂L/∂x and in (gO, x) for ∂L/∂W). Terms no caller needs
are skipped, as PyTorch's own backward does (the autograd engine says which inputs it will use):
IDC's meta-gradient goes to the images only, so ∂/∂W is not computed there, and a gradient with
respect to the weights alone computes no ∂/∂x for the first layer (the images). One MTT iteration (30 unrolled steps of ConvNet-3
on 100 CIFAR images) measured ~5 % faster on the 2-core CPU (benchmarks/README.md). CUDA keeps
cuDNN's own path (this file changes nothing there). A third derivative raises.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedd.nets.higher_order import engine_needs, no_third_derivative

_aten = torch.ops.aten


class _Geometry(NamedTuple):
    """A convolution's stride, padding, dilation and groups, in the forms aten wants."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def _conv(x: Tensor, w: Tensor, b: Tensor | None, geo: _Geometry) -> Tensor:
    return F.conv2d(x, w, b, geo.stride, geo.padding, geo.dilation, geo.groups)


def _conv_backward(g_out: Tensor, x: Tensor, w: Tensor, geo: _Geometry, mask: tuple[bool, bool, bool]):
    """``aten.convolution_backward``: (∂/∂x, ∂/∂W, ∂/∂b) of a convolution, for the outputs in mask."""
    return _aten.convolution_backward(g_out, x, w, [w.shape[0]] if mask[2] else None, geo.stride, geo.padding,
                                      geo.dilation, False, [0, 0], geo.groups, list(mask))


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s memory format (oneDNN wants its operands in one layout)."""
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, geo: _Geometry) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.has_bias = geo, b is not None
        return _conv(x, w, b, geo)

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        need = [ctx.needs_input_grad[i] and engine_needs(ctx, i) for i in range(3)]
        mask = (need[0], need[1], need[2] and ctx.has_bias)
        if not any(mask):
            return None, None, None, None
        if not torch.is_grad_enabled():  # plain training: no graph of the backward to record
            gx, gw, gb = _conv_backward(_like(g_out, x), x, w, ctx.geo, mask)
            return gx, gw, gb, None
        gx, gw, gb = _ConvBackwardFn.apply(g_out, x, w, ctx.geo, mask)
        return gx, gw, gb, None


class _ConvBackwardFn(torch.autograd.Function):
    """The backward as a function of (gO, x, W), so that its own backward is the formula above."""

    @staticmethod
    def forward(ctx, g_out: Tensor, x: Tensor, w: Tensor, geo: _Geometry,  # type: ignore[override]
                mask: tuple[bool, bool, bool]):
        g_out = _like(g_out, x)
        ctx.save_for_backward(g_out, x, w)
        ctx.geo = geo
        ctx.set_materialize_grads(False)
        return _conv_backward(g_out, x, w, geo, mask)

    @staticmethod
    def backward(ctx, u: Tensor | None, v: Tensor | None, gb: Tensor | None):  # type: ignore[override]
        g_out, x, w = ctx.saved_tensors
        geo = ctx.geo
        need_g, need_x, need_w = (ctx.needs_input_grad[i] and engine_needs(ctx, i) for i in range(3))
        d_g = d_x = d_w = None
        with torch.no_grad():
            if u is not None:
                u = _like(u, x)
            if need_g:
                if u is not None:
                    d_g = _conv(u, w, None, geo)
                if v is not None:
                    t = _conv(x, v, None, geo)
                    d_g = t if d_g is None else d_g.add_(t)
                if gb is not None:
                    t = gb.view(1, -1, 1, 1)
                    d_g = t.expand_as(g_out).clone() if d_g is None else d_g.add_(t)
            if need_x and v is not None:
                d_x = _conv_backward(g_out, x, v, geo, (True, False, False))[0]
            if need_w and u is not None:
                d_w = _conv_backward(g_out, u, w, geo, (False, True, False))[1]
        grads = no_third_derivative((d_g, d_x, d_w), (g_out, x, w, u, v, gb), "moedd.nets.conv")
        return (*grads, None, None)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int | tuple[int, int] = 1,
           padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1) -> Tensor:
    """``F.conv2d`` (numeric padding only) with the double backward of the module docstring on the
    CPU; on CUDA and for unbatched inputs ``F.conv2d`` itself."""
    if x.is_cuda or x.dim() != 4:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    pair = torch.nn.modules.utils._pair
    geo = _Geometry(list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups)
    return _ConvFn.apply(x, weight, bias, geo)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) whose double backward on the CPU is the
    formula of the module docstring; CUDA, unbatched inputs, string paddings and non-zero padding
    modes use ``nn.Conv2d``'s own forward."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,  # type: ignore[arg-type]
                      self.groups)
