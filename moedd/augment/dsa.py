"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021), fully batched.

DSA augments real and synthetic images with the *same* random transformation so that the
matching loss (gradients, distributions, trajectories) compares like with like, and every op is
differentiable so the loss back-propagates into the synthetic pixels. Ops, parameter values and
the "one group per draw" rule (mode 'S') follow the DC-repo ``DiffAugment``; see
``docs/methods.md`` §DSA.

Deviations from the reference, on purpose:

* Randomness comes from an explicit ``torch.Generator`` (on the tensor's device). The reference
  re-seeds the global RNG before every draw from a clock-derived seed; we never touch the global
  RNG nor the clock, so a run is reproducible from its generator state.
* Siamese mode draws one group and one parameter set *per unit* (usually per class) in a single
  batched call, instead of one call per class in which every sample copies the parameters of
  sample 0. Passing real+synthetic images of all classes at once with ``unit = class id`` gives the
  same distribution as the reference's per-class calls, at a fraction of the kernel launches.
* All ops run on the whole batch without Python loops over samples; the translation ('crop') is
  implemented with zero padding and one ``gather`` (same result as the reference's 1-px pad + clamped
  indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GROUPS: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

UnitDraw = tuple[Tensor | None, list[tuple[Tensor, ...]]]
"""One siamese draw: the group of each unit (None with a one-group strategy) and, per group of
the strategy, its parameter tensors (one value per unit)."""


@dataclass(frozen=True)
class DSAParams:
    """Parameters of DSA (defaults = DC-repo ``ParamDiffAug``).

    Attributes:
        strategy: underscore-separated groups; each call draws ONE of them (per unit or per call).
        prob_flip: probability of a horizontal flip in the 'flip' group.
        ratio_scale: s_x, s_y ~ U[1/ratio_scale, ratio_scale].
        ratio_rotate: maximum rotation angle in degrees.
        ratio_crop_pad: maximum translation as a fraction of the side (rounded to pixels).
        ratio_cutout: cutout square side as a fraction of the image side.
        brightness: x + (u - 0.5) * brightness.
        saturation: m + (x - m) * (u * saturation), m = mean over channels.
        contrast: m + (x - m) * (u + contrast), m = per-image mean.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        bad = [g for g in self.strategy.split("_") if g not in GROUPS]
        if bad:
            raise ValueError(
                f"unknown DSA group(s) {bad} in strategy {self.strategy!r}; "
                f"known groups: {', '.join(GROUPS)}"
            )

    @property
    def groups(self) -> tuple[str, ...]:
        """The strategy's groups, in order."""
        return tuple(self.strategy.split("_"))


# ---------------------------------------------------------------- ops with explicit parameters


def _col(u: Tensor, x: Tensor) -> Tensor:
    return u.to(x.dtype).view(-1, 1, 1, 1)


def affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warps ``x`` (N,C,H,W) by per-sample 2x3 matrices ``theta`` (N,2,3); bilinear, zero pad."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def scale(x: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """Scales sampling coordinates by per-sample ``sx`` (width) and ``sy`` (height)."""
    z = torch.zeros_like(sx)
    return affine(x, torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1))


def rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotates by per-sample ``angle`` in radians (reference matrix [[c, -s, 0], [s, c, 0]])."""
    c, s, z = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return affine(x, torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1))


def flip(x: Tensor, do_flip: Tensor) -> Tensor:
    """Flips the last dim of the samples where the bool vector ``do_flip`` is true."""
    return torch.where(do_flip.view(-1, 1, 1, 1), x.flip(3), x)


def color(x: Tensor, ub: Tensor, us: Tensor, uc: Tensor, brightness: float = 1.0,
          saturation: float = 2.0, contrast: float = 0.5) -> Tensor:
    """Brightness, then saturation, then contrast, with per-sample uniforms ``ub, us, uc``."""
    x = x + (_col(ub, x) - 0.5) * brightness
    m = x.mean(dim=1, keepdim=True)
    x = m + (x - m) * (_col(us, x) * saturation)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + (x - m) * (_col(uc, x) + contrast)


def translate(x: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Integer shift: ``out[i, :, h, w] = x[i, :, h + tx_i, w + ty_i]``, zeros outside.

    Differentiable w.r.t. ``x`` (pad + one ``gather`` over flattened pixels); indices are
    clamped onto a 1-px zero border, so any shift size works without a host sync.
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1)).flatten(2)
    rows = (torch.arange(h, device=x.device) + tx.view(-1, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device) + ty.view(-1, 1) + 1).clamp(0, w + 1)
    idx = (rows[:, :, None] * (w + 2) + cols[:, None, :]).view(n, 1, h * w)
    return xp.gather(2, idx.expand(n, c, h * w)).view(n, c, h, w)


def cutout(x: Tensor, ox: Tensor, oy: Tensor, side_h: int, side_w: int) -> Tensor:
    """Zeros a box per sample: rows ``[o - side//2, o - side//2 + side - 1]`` clamped to the image.

    ``ox`` indexes rows (H), ``oy`` columns (W); same rule as the reference's clamped indices.
    """
    if side_h <= 0 or side_w <= 0:
        return x

    def band(o: Tensor, side: int, size: int) -> Tensor:
        lo = (o - side // 2).clamp(0, size - 1).view(-1, 1)
        hi = (o - side // 2 + side - 1).clamp(0, size - 1).view(-1, 1)
        r = torch.arange(size, device=x.device)
        return (r >= lo) & (r <= hi)

    hole = band(ox, side_h, x.shape[2])[:, :, None] & band(oy, side_w, x.shape[3])[:, None, :]
    return x * (~hole).unsqueeze(1).to(x.dtype)


# ---------------------------------------------------------------- random DSA


class DSA:
    """Differentiable Siamese Augmentation with per-unit or per-sample random parameters.

    Args:
        params: the DSA parameters; defaults to the CIFAR setting of the reference.
    """

    def __init__(self, params: DSAParams | None = None) -> None:
        self.params = params if params is not None else DSAParams()
        self.groups = self.params.groups

    def __repr__(self) -> str:
        return f"DSA({self.params!r})"

    def _sizes(self, h: int, w: int, ratio: float) -> tuple[int, int]:
        return int(h * ratio + 0.5), int(w * ratio + 0.5)

    def _draw(self, group: str, n: int, x: Tensor, gen: torch.Generator) -> tuple[Tensor, ...]:
        """Draws ``n`` parameter sets of ``group`` (each a tensor of length ``n``)."""
        p, dev = self.params, x.device

        def u() -> Tensor:
            return torch.rand(n, device=dev, generator=gen)

        if group == "color":
            return u(), u(), u()
        if group == "flip":
            return (u() < p.prob_flip,)
        if group == "scale":
            lo = 1.0 / p.ratio_scale
            return u() * (p.ratio_scale - lo) + lo, u() * (p.ratio_scale - lo) + lo
        if group == "rotate":
            return ((u() - 0.5) * (2.0 * math.radians(p.ratio_rotate)),)
        h, w = x.shape[-2:]
        if group == "crop":
            kh, kw = self._sizes(h, w, p.ratio_crop_pad)
            return (torch.randint(-kh, kh + 1, (n,), device=dev, generator=gen),
                    torch.randint(-kw, kw + 1, (n,), device=dev, generator=gen))
        sh, sw = self._sizes(h, w, p.ratio_cutout)  # cutout
        return (torch.randint(0, h + 1 - sh % 2, (n,), device=dev, generator=gen),
                torch.randint(0, w + 1 - sw % 2, (n,), device=dev, generator=gen))

    def _op(self, group: str, x: Tensor, prm: tuple[Tensor, ...]) -> Tensor:
        """Applies ``group`` to ``x`` with per-sample parameters ``prm``."""
        p = self.params
        if group == "color":
            return color(x, *prm, p.brightness, p.saturation, p.contrast)
        if group == "crop":
            return translate(x, *prm)
        if group == "cutout":
            return cutout(x, *prm, *self._sizes(x.shape[2], x.shape[3], p.ratio_cutout))
        return {"flip": flip, "scale": scale, "rotate": rotate}[group](x, *prm)

    def _apply(self, x: Tensor, group_idx: Tensor, prm: list[tuple[Tensor, ...]]) -> Tensor:
        """Applies to sample i the group ``groups[group_idx[i]]`` with params ``prm[g][k][i]``.

        Samples are sorted by group (one host sync: the per-group counts), each group's op runs
        on its contiguous slice, and the results are scattered back with ``index_copy``.
        """
        counts = torch.bincount(group_idx, minlength=len(self.groups)).tolist()
        for g, cnt in enumerate(counts):  # a single group present: no gather/scatter needed
            if cnt == x.shape[0]:
                return self._op(self.groups[g], x, prm[g])
        order = torch.argsort(group_idx, stable=True)
        chunks = [
            self._op(self.groups[g], x.index_select(0, idx),
                     tuple(t.index_select(0, idx) for t in prm[g]))
            for g, idx in enumerate(order.split(counts)) if idx.numel() > 0
        ]
        y = torch.cat(chunks)
        return torch.empty_like(y).index_copy(0, order, y)

    def siamese(self, x: Tensor, unit: Tensor, n_units: int,
                generator: torch.Generator) -> Tensor:
        """Augments ``x`` so that samples of the same unit share group AND parameters.

        Args:
            x: float images (N,C,H,W), any memory format.
            unit: long tensor (N,) with values in ``[0, n_units)`` on ``x``'s device, typically
                class ids; real and synthetic images of one class get the identical transform.
            n_units: number of units; each draws its group and parameters independently.
            generator: RNG on ``x``'s device (the only source of randomness).

        Returns:
            The augmented images, same shape and dtype as ``x``.
        """
        return self.apply_units(x, unit, self.draw_units(n_units, x, generator))

    def draw_units(self, n_units: int, like: Tensor, generator: torch.Generator) -> UnitDraw:
        """The group (when the strategy has several) and the parameters of ``n_units`` units,
        for images shaped like ``like``; :meth:`apply_units` applies them to any batch of such
        images (so real and synthetic batches can share one draw without replaying the RNG)."""
        g_unit = None
        if len(self.groups) > 1:
            g_unit = torch.randint(len(self.groups), (n_units,), device=like.device, generator=generator)
        return g_unit, [self._draw(g, n_units, like, generator) for g in self.groups]

    def apply_units(self, x: Tensor, unit: Tensor, draw: UnitDraw, static: bool = False) -> Tensor:
        """Applies a :meth:`draw_units` draw: sample i gets unit ``unit[i]``'s group and parameters.

        ``static`` gates every group's op per sample (:meth:`gated`) instead of sorting the
        samples by group, which needs the per-group counts on the host (a sync, and kernels that
        change with the draw): same result, for code captured in a CUDA graph.
        """
        g_unit, prm_units = draw
        prm = [tuple(t.index_select(0, unit) for t in p) for p in prm_units]
        if g_unit is None:
            return self._op(self.groups[0], x, prm[0])
        if static:
            return self.gated(x, g_unit.index_select(0, unit), prm)
        return self._apply(x, g_unit.index_select(0, unit), prm)

    def per_sample(self, x: Tensor, generator: torch.Generator, host: torch.Generator) -> Tensor:
        """One group for the whole call, independent parameters per sample (reference mode 'S'
        without seed); used while training evaluation networks and unrolling MTT students.

        Args:
            x: float images (N,C,H,W), any memory format.
            generator: RNG on ``x``'s device (the per-sample parameters).
            host: CPU RNG for the call's group. The group decides which ops run, so it must be
                known on the host; drawing it there (as the reference does, with the global CPU
                RNG) keeps the call free of device syncs -- on a GPU a device draw read back with
                ``.item()`` would stall the host at every call until the queued kernels finish.

        Returns:
            The augmented images, same shape and dtype as ``x``.
        """
        g = 0
        if len(self.groups) > 1:
            g = int(torch.randint(len(self.groups), (1,), generator=host))
        group = self.groups[g]
        return self._op(group, x, self._draw(group, x.shape[0], x, generator))

    def per_sample_static(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """:meth:`per_sample` with no host decision, for code captured in a CUDA graph.

        The group is drawn on the device (uniform, one per call, as mode 'S'), the parameters of
        EVERY group are drawn, and every group's op runs, gated by ``torch.where`` on the drawn
        group: the kernels (and their order) are the same at every call, which a graph needs,
        and the output is bitwise the drawn group's op on ``x`` (see :meth:`gated`). It costs
        all the groups' ops per call, which only pays where launches, not arithmetic, bound
        the step; with one group in the strategy it is :meth:`per_sample` without the host draw.

        Args:
            x: float images (N,C,H,W), any memory format.
            generator: RNG on ``x``'s device (the group and the parameters).
        """
        n = x.shape[0]
        if len(self.groups) == 1:
            group = self.groups[0]
            return self._op(group, x, self._draw(group, n, x, generator))
        pick = torch.randint(len(self.groups), (1,), device=x.device, generator=generator)
        return self.gated(x, pick, [self._draw(g, n, x, generator) for g in self.groups])

    def gated(self, x: Tensor, pick: Tensor, prm: list[tuple[Tensor, ...]]) -> Tensor:
        """Applies group ``groups[pick]`` with parameters ``prm``; ``pick`` is a device tensor of
        shape (1,) (one group for the batch) or (N,) (one per sample: DSA's ops act on each
        sample alone, so gating per sample gives each sample its own group's op).

        Every group's op runs in turn on the running result and is kept only where it is the
        picked one; the groups before the picked one leave ``x`` untouched (``where`` copies its
        other operand exactly) and the ones after it are discarded, so the result equals
        ``_op(groups[pick], x, prm[pick])`` bit for bit, and gradients reach ``x`` through that op only.
        """
        out = x
        for g, (group, p) in enumerate(zip(self.groups, prm, strict=True)):
            out = torch.where((pick == g).view(-1, 1, 1, 1), self._op(group, out, p), out)
        return out
