"""Instance norm (GroupNorm with one group per channel) with an analytic double backward.

Gradient matching (IDC, DC) and unrolled training (MTT) differentiate the network's backward
pass. PyTorch's GroupNorm has fused kernels for its forward and backward, but its double
backward is a generic composite of some thirty full-size elementwise ops and reductions (on the
CPU, one 40x128x32x32 layer's forward + backward + double backward: 67 ms with F.group_norm, 40 ms
here; benchmarks/README.md). Here the forward and backward call the same fused kernels
(``native_group_norm`` and ``native_group_norm_backward``), and the double backward is written
out in closed form: every second derivative is a per-instance linear combination of x, dy and
the incoming gradient, so it costs a few per-instance reductions and two or three passes over the
map.

The formulas, per instance (one (n, c) map of M = H·W values), with x̂ = (x − μ)·r,
r = (var + eps)^-½, the backward g = w·dy, and P(v) = r·(v − mean v − x̂·mean(v·x̂)) (the fused
backward with weight 1, a symmetric operator):

    backward:         dx = P(w·dy),   dw = Σ dy·x̂,   db = Σ dy
    double backward, for incoming gradients u (of dx), gw (of dw), gb (of db):
        ∂/∂dy = w·P(u) + gw·x̂ + gb
        ∂/∂w  = Σ dy·P(u)
        ∂/∂x  = P(gw·dy) − r²·[ x̂·(mean(u·g) − mean(u)·mean(g) − 3·s·t) + t·(g − mean g) + s·(u − mean u) ]
                with s = mean(g·x̂), t = mean(u·x̂)

(the last from ∂r/∂x = −r²·x̂/M and ∂x̂_i/∂x_j = r·(δ_ij − 1/M − x̂_i·x̂_j/M)). Checked against
autograd with ``gradgradcheck`` in the tests. Third-order derivatives are not supported (no
method needs them): differentiating the double backward raises a RuntimeError.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moedd.nets.higher_order import no_third_derivative

_aten = torch.ops.aten


def _shape(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x[0, 0].numel() if n else 0


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format of ``x`` (channels_last for NHWC-strided 4-D maps): the fused kernels
    want all their inputs in one layout."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _per_instance(t: Tensor, like: Tensor) -> Tensor:
    """(N, C) -> (N, C, 1, …) for broadcasting against a map shaped like ``like``."""
    return t.reshape(*t.shape[:2], *([1] * (like.dim() - 2)))


def _mean(a: Tensor) -> Tensor:
    """Per-instance mean over the spatial dims: (N, C, …) -> (N, C)."""
    return a.mean(tuple(range(2, a.dim())))


def _dot_mean(a: Tensor, b: Tensor) -> Tensor:
    """Per-instance mean of a·b: (N, C, …) x2 -> (N, C). (``torch.linalg.vecdot``, bmm and einsum
    measured no faster than the product and sum on the CPU.)"""
    return _mean(a * b)


class _InstanceNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        if not x.is_cpu:  # the CUDA kernels take NCHW only (F.group_norm converts the same way)
            x = x.contiguous()
        n, c, hw = _shape(x)
        y, mean, rstd = _aten.native_group_norm(x, weight, bias, n, c, hw, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _InstanceNormBackwardFn.apply(dy, x, weight, mean, rstd, tuple(ctx.needs_input_grad[:3]))
        return dx, dw, db, None


class _InstanceNormBackwardFn(torch.autograd.Function):
    """The backward as a function of (dy, x, weight); the statistics are recomputable constants."""

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,  # type: ignore[override]
                mask: tuple[bool, bool, bool]):
        n, c, hw = _shape(x)
        dy = dy.contiguous(memory_format=_layout(x))
        dx, dw, db = _aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hw, c, list(mask))
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        return dx, dw, db

    @staticmethod
    def backward(ctx, u: Tensor | None, gw: Tensor | None, gb: Tensor | None):  # type: ignore[override]
        dy, x, weight, mean, rstd = ctx.saved_tensors
        with torch.no_grad():
            grads = _InstanceNormBackwardFn._double_backward(ctx, dy, x, weight, mean, rstd, u, gw, gb)
        grads = no_third_derivative(grads, (dy, x, weight, u, gw, gb), "moedd's instance norm (moedd.nets.norm)")
        return (*grads, None, None, None)

    @staticmethod
    def _double_backward(ctx, dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                         u: Tensor | None, gw: Tensor | None, gb: Tensor | None):
        """The closed form of the module docstring, with P expanded: every output is a per-instance
        linear combination of x, dy and u, so it costs per-instance reductions plus 2-3 passes."""
        n, c, hw = _shape(x)
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        if u is not None:
            u = u.contiguous(memory_format=_layout(x))
        m, r, w = mean.view(n, c), rstd.view(n, c), weight.view(1, c)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        gw_ = gw.view(1, c) if gw is not None else zero
        dy_m = _mean(dy)                                  # mean(dy)
        s1 = r * (_dot_mean(dy, x) - m * dy_m)            # mean(dy·x̂)
        if u is not None:
            u_m = _mean(u)                                # mean(u)
            t = r * (_dot_mean(u, x) - m * u_m)           # mean(u·x̂)
            udy_m = _dot_mean(u, dy)                      # mean(u·dy)
        else:
            u_m = t = udy_m = zero
        d_dy = d_x = d_w = None
        if need_dy and (u is not None or gw is not None or gb is not None):
            # w·P(u) + gw·x̂ + gb = (w·r)·u + r·(gw − w·r·t)·(x − μ) + gb − w·r·mean(u)
            coef_x = r * (gw_ - w * r * t)
            const = -coef_x * m - w * r * u_m
            if gb is not None:
                const = const + gb.view(1, c)
            d_dy = (x * _per_instance(coef_x, x)).add_(_per_instance(const, x))  # (faster than a broadcast addcmul)
            if u is not None:
                d_dy.addcmul_(u, _per_instance((w * r).expand(n, c), x))
        if need_w and u is not None:
            # Σ_n Σ_hw dy·P(u) = Σ_n hw·r·(mean(u·dy) − mean(u)·mean(dy) − t·mean(dy·x̂))
            d_w = (r * (udy_m - u_m * dy_m - t * s1)).sum(0) * hw
        if need_x and (u is not None or gw is not None):
            r2 = r * r
            a = w * dy_m                                   # mean(g), g = w·dy
            s = w * s1                                     # mean(g·x̂)
            # from u: −r²·[x̂·(mean(u·g) − mean(u)·mean(g) − 3·s·t) + t·(g − mean g) + s·(u − mean u)]
            alpha = -r2 * r * (w * udy_m - u_m * a - 3.0 * s * t)
            beta = -r2 * t * w
            delta = r2 * (t * a + s * u_m)
            # from gw: P(gw·dy) = gw·r·dy − gw·r·mean(dy) − gw·r²·mean(dy·x̂)·(x − μ)
            alpha = alpha - gw_ * r2 * s1
            beta = beta + gw_ * r
            delta = delta - gw_ * r * dy_m - alpha * m
            d_x = (x * _per_instance(alpha, x)).add_(_per_instance(delta, x))
            d_x.addcmul_(dy, _per_instance(beta.expand(n, c), x))
            if u is not None:
                d_x.addcmul_(u, _per_instance((-r2 * s).expand(n, c), x))
        return d_dy, d_x, d_w


def instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` with the analytic double backward above.

    Under autocast the map arrives in bf16/fp16 while the affine parameters stay float32; the
    fused kernels take one dtype (CUDA refuses the mix), and autocast runs ``group_norm`` in
    float32, so the map is brought up to the parameters' dtype and the output is float32, as
    ``F.group_norm`` gives under autocast."""
    if x.dtype != weight.dtype and x.is_floating_point():
        x = x.to(weight.dtype)
    return _InstanceNormFn.apply(x, weight, bias, eps)


class InstanceNorm(nn.GroupNorm):
    """GroupNorm(C, C, affine=True) -- the DC/MTT "instancenorm" -- with the same parameters and
    state dict, computed by :func:`instance_norm`."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)
