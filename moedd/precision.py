"""Precision rules that change results (unlike ``moedd.device``, whose choices change only speed)."""

from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype when that is wider: features of half-precision
    networks are reduced in float32, and a float64 run (the tests' exactness checks) stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
