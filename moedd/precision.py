"""Precision rules that change results (unlike ``moedd.device``, whose choices change only speed)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU of compute capability >= 8.0, or a
    CPU with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; elsewhere oneDNN emulates it, slower
    than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the test pass for ``evaluate.test_precision``: ``fp32``, ``bf16``, or ``auto``
    (bf16 where :func:`native_bf16`, else fp32)."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype when that is wider: features of half-precision
    networks are reduced in float32, and a float64 run (the tests' exactness checks) stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
