"""Device choice and process set-up shared by every stage."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available; use device=auto or cpu")
    return dev


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_process() -> None:
    """Keep freed memory in the process instead of returning it to the OS.

    glibc gives large freed blocks (the activation buffers of a DM step) back with munmap and
    page-faults them in again on the next step; on the CPU this made step times swing by up to
    1.7x. Equivalent to MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>, but set from inside
    the process so users need not remember the variables. No-op off glibc or with CUDA only.
    Also lets CUDA use TF32 matmuls/convolutions (the DD reference code does the same by default).
    """
    if os.environ.get("MOEDD_NO_MALLOPT"):
        return
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            libc = ctypes.CDLL(libc_name)
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes an int
        except (OSError, AttributeError):
            pass
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_for(net: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The faster activation layout for ``net`` on ``device``.

    channels_last on CUDA (tensor-core convolutions). On the CPU, oneDNN convolutions also prefer
    channels_last, but GroupNorm (our instance norm) is several times slower in that layout at
    16x16 and 8x8 maps, so nets with GroupNorm stay contiguous there (measured in
    benchmarks/README.md: VGG11/ResNet18 inference 2.1 s vs 4.3 s, 9.6 s vs 11.9 s).

    ``MOEDD_LAYOUT=contiguous`` or ``channels_last`` overrides the choice for every net (a
    benchmarking knob: the layout changes speed, not results; on CUDA the instance norm's fused
    kernels take NCHW only, so there a GroupNorm net pays a layout copy per norm, and which
    layout wins is measured by ``benchmarks/gpu_session.sh``).

    Raises:
        ValueError: MOEDD_LAYOUT is set to something else.
    """
    forced = os.environ.get("MOEDD_LAYOUT", "auto")
    if forced != "auto":
        if forced not in _LAYOUTS:
            raise ValueError(f"MOEDD_LAYOUT={forced!r}: use auto, contiguous or channels_last")
        return _LAYOUTS[forced]
    if device.type == "cuda":
        return torch.channels_last
    has_gn = any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    return torch.contiguous_format if has_gn else torch.channels_last
