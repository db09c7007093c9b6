"""Differentiable augmentations used during distillation and evaluation."""

from moedd.augment.dsa import (
    DSA,
    GROUPS,
    DSAParams,
    affine,
    color,
    cutout,
    flip,
    rotate,
    scale,
    translate,
)

__all__ = [
    "DSA",
    "GROUPS",
    "DSAParams",
    "affine",
    "color",
    "cutout",
    "flip",
    "rotate",
    "scale",
    "translate",
]
