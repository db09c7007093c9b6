"""2x2 pooling layers with faster CPU paths for contiguous (NCHW) tensors.

PyTorch's CPU pooling kernels are slow on contiguous maps. Max pool: the maximum of the four
strided 2x2 sub-grids is 3-7x faster on 32x32 and 16x16 maps (100x64x32x32: 71 ms vs 10 ms).
Average pool: each window's two rows are added (contiguous rows), then column pairs by a small
(2w x w) matrix product -- 64x128x32x32 input: 3.5 ms, vs 8.3 ms for the sum of the four strided
sub-grids and ~24 ms for the native kernel (pooling was a third of a DM step). The backward passes
are custom too: autograd's backward of four strided slices allocates and zero-fills four
full-size gradient maps (63 ms each for 256x128x32x32 -- a quarter of a network-training step);
the average pool's backward (the un-pool) is the transposed product plus one row copy, the max
pool's writes the gradient once, interleaved. Both backward passes are made of differentiable
ops, so double backward (gradient matching) works.

Same values as the native kernels (max: identical, ties go to the first element of the window in
row-major order as in PyTorch; average: up to float rounding). CUDA, channels_last inputs, odd
sizes and (for max) small maps, where the native kernel wins, use the native kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def _strided_ok(x: Tensor, min_size: int = 2) -> bool:
    h, w = x.shape[-2:]
    return not x.is_cuda and x.is_contiguous() and h % 2 == 0 and w % 2 == 0 and min(h, w) >= min_size


def _interleave(q00: Tensor, q01: Tensor, q10: Tensor, q11: Tensor) -> Tensor:
    """Inverse of taking the four strided sub-grids: (…, h, w) x4 -> (…, 2h, 2w)."""
    *lead, h, w = q00.shape
    rows0 = torch.stack((q00, q01), dim=-1)  # (…, h, w, 2): even rows, columns interleaved
    rows1 = torch.stack((q10, q11), dim=-1)
    return torch.stack((rows0, rows1), dim=-3).reshape(*lead, 2 * h, 2 * w)


@functools.lru_cache(maxsize=32)
def _pair_matrix(w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2w, w): column j sums entries 2j and 2j+1, times 1/4 -- pooling a row of 2w values in pairs."""
    return torch.eye(w, dtype=dtype, device=device).repeat_interleave(2, dim=0).mul_(0.25)


def _avg_pool_2x2(x: Tensor) -> Tensor:
    """Mean of every 2x2 window: the two rows of each window summed (contiguous rows of 2w values),
    then column pairs by a (2w, w) matrix product (64x128x32x32 input: 3.5 ms, vs 8.3 ms for the
    four strided sub-grids summed and ~24 ms for the native kernel; module docstring)."""
    if not _strided_ok(x):
        return torch.nn.functional.avg_pool2d(x, 2)
    *lead, h2, w2 = x.shape
    h, w = h2 // 2, w2 // 2
    rows = x.view(-1, h, 2, w2)
    rows = rows[:, :, 0] + rows[:, :, 1]  # (…, h, 2w)
    return (rows.view(-1, w2) @ _pair_matrix(w, x.dtype, x.device)).view(*lead, h, w)


def _avg_unpool_2x2(g: Tensor) -> Tensor:
    """The adjoint of :func:`_avg_pool_2x2`: every value spread over its 2x2 window, times 1/4 --
    columns by the transposed matrix, then each row written twice (a contiguous copy)."""
    *lead, h, w = g.shape
    if g.is_cuda:
        return (g * 0.25).unsqueeze(-1).unsqueeze(-3).expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)
    cols = g.reshape(-1, w) @ _pair_matrix(w, g.dtype, g.device).t()  # (…·h, 2w)
    return cols.view(-1, h, 1, 2 * w).expand(-1, h, 2, 2 * w).reshape(*lead, 2 * h, 2 * w)


class _AvgPool2x2Fn(torch.autograd.Function):
    """2x2 average pool whose backward is the un-pool and whose double backward is the pool again
    (the two maps are each other's adjoints), so gradient matching and unrolled training (IDC,
    MTT) never differentiate through the expand/reshape of the un-pool: autograd would do that
    with a full-size sum over broadcast dimensions, a tenth of an IDC matching step on the CPU."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _avg_pool_2x2(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return _AvgUnpool2x2Fn.apply(g)


class _AvgUnpool2x2Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return _avg_unpool_2x2(g)

    @staticmethod
    def backward(ctx, gg: Tensor) -> Tensor:  # type: ignore[override]
        return _AvgPool2x2Fn.apply(gg)


class _MaxPool2x2Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        q = (x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        out = torch.maximum(torch.maximum(q[0], q[1]), torch.maximum(q[2], q[3]))
        # the window element that wins (first maximum in row-major order, as PyTorch)
        taken = q[0] == out
        masks = [taken]
        for qi in q[1:3]:
            m = (qi == out) & ~taken
            taken = taken | m
            masks.append(m)
        masks.append(~taken)
        ctx.save_for_backward(*masks)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        m00, m01, m10, m11 = ctx.saved_tensors
        zero = g.new_zeros(())
        return _interleave(torch.where(m00, g, zero), torch.where(m01, g, zero),
                           torch.where(m10, g, zero), torch.where(m11, g, zero))


class AvgPool2x2(nn.AvgPool2d):
    """AvgPool2d(kernel 2, stride 2)."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if not _strided_ok(x):
            return super().forward(x)
        return _AvgPool2x2Fn.apply(x)


class MaxPool2x2(nn.MaxPool2d):
    """MaxPool2d(kernel 2, stride 2); the strided path only for maps of at least 16x16 and when
    no gradient is needed (the native forward+backward is faster than the masked one)."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if not _strided_ok(x, min_size=16):
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:  # fwd+bwd: native 141 ms vs 172 ms here
            return super().forward(x)
        return _MaxPool2x2Fn.apply(x)
