"""What every benchmark section shares: the standard sizes, the timing protocol, the result row,
the random CIFAR-shaped data, and our side built as the library builds it.

Timing protocol: every measured thing runs once untimed (warm-up) and then N times; the median is
reported. Ours and the reference alternate repetition by repetition (:func:`alternate`), so slow
drift of the machine (other processes, turbo) hits both sides alike. On CUDA every timing is
bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from moedd.data import Prepared, make_partition
from moedd.distill import build_method, start_images
from moedd.evaluate import normalize_test
from moedd.params import load_params

NUM_CLASSES, PER_CLASS, NUM_TEST, SHAPE = 10, 5000, 10_000, (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NETS = {"convnet3": "ConvNet", "vgg11": "VGG11", "resnet18": "ResNet18", "alexnet": "AlexNet"}
"""Our registry name -> the reference repositories' ``get_network`` name."""


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Row:
    """One line of the result table. ``unit`` is it/s, epochs/s (higher is better), s or GiB (lower);
    ``speedup`` is ours/reference for rates and reference/ours for seconds and GiB (>1: ours better)."""

    section: str
    what: str
    unit: str
    ours: float | None = None
    ref: float | None = None
    goal: float | None = None  # minimum speedup (ours vs reference) asked for; None = informational
    ours_samples: list[float] = field(default_factory=list)  # raw seconds per repetition
    ref_samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.ours is None or self.ref is None or self.ours <= 0 or self.ref <= 0:
            return None
        return self.ref / self.ours if self.unit in ("s", "GiB") else self.ours / self.ref

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.speedup is None:
            return None
        return self.speedup >= self.goal


def alternate(row: Row, ours: Callable[[], Any], ref: Callable[[], Any] | None, reps: int,
              device: torch.device, warm_ours: Callable[[], Any] | None = None,
              warm_ref: Callable[[], Any] | None = None) -> None:
    """Fill ``row`` with seconds per call: warm-up once each (``warm_*`` when given, else the timed
    call itself), then ``reps`` timed calls, ours and the reference alternating."""
    (warm_ours or ours)()
    if ref is not None:
        (warm_ref or ref)()
    for r in range(reps):
        row.ours_samples.append(timed(ours, device))
        if ref is not None:
            row.ref_samples.append(timed(ref, device))
        log(f"  rep {r + 1}/{reps}: ours {row.ours_samples[-1]:.3f}s"
            + (f", reference {row.ref_samples[-1]:.3f}s" if ref is not None else ""))
    row.ours = median(row.ours_samples)
    if row.ref_samples:
        row.ref = median(row.ref_samples)


@dataclass(frozen=True)
class Sizes:
    """Base of a section's knobs that set the amount of work, on both sides alike; the defaults
    are the standard setting, and a row measured at other sizes gets no goal."""

    @property
    def standard(self) -> bool:
        return self == type(self)()

    def describe(self) -> str:
        return ", ".join(f"{f.name} {getattr(self, f.name)}" for f in fields(self))

    @property
    def reduced_note(self) -> str:
        """The note of a row measured at other than the standard sizes."""
        return "" if self.standard else f"reduced size ({self.describe()}): a harness check, not the standard setting"


# --------------------------------------------------------------------------------------- data


@dataclass
class Data:
    prepared: Prepared
    images_all: torch.Tensor  # reference: float32 normalised train images on the device
    indices_class: list[list[int]]  # reference: per-class indices (as main_DM.py builds them)
    test_x: torch.Tensor  # float32 normalised test images on the device
    test_y: torch.Tensor


def make_data(device: torch.device, with_reference: bool, seed: int = 0) -> Data:
    """Random CIFAR-shaped data held in memory (no downloads): 10 x 5000 train, 10,000 test;
    speed does not depend on the pixel values."""
    g = torch.Generator().manual_seed(seed)
    n = NUM_CLASSES * PER_CLASS
    train_x = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    train_y = torch.arange(NUM_CLASSES).repeat(PER_CLASS)  # interleaved classes, like CIFAR's shuffle
    test_x = torch.randint(0, 256, (NUM_TEST, *SHAPE), generator=g, dtype=torch.uint8)
    test_y = torch.arange(NUM_CLASSES).repeat(NUM_TEST // NUM_CLASSES)
    prepared = Prepared(
        "bench-random", [f"c{i}" for i in range(NUM_CLASSES)], train_x, train_y, test_x, test_y,
        CIFAR_MEAN, CIFAR_STD, "bench-random-digest",
    )
    images_all, indices_class = torch.empty(0), []
    if with_reference:
        images_all = normalize_test(train_x, CIFAR_MEAN, CIFAR_STD, device)
        labels = train_y.tolist()
        indices_class = [[] for _ in range(NUM_CLASSES)]
        for i, lab in enumerate(labels):
            indices_class[lab].append(i)
    tx = normalize_test(test_x, CIFAR_MEAN, CIFAR_STD, device)
    return Data(prepared, images_all, indices_class, tx, test_y.to(device))


# --------------------------------------------------------------------------------------- ours


def our_params(budget: int, bf16: bool, epochs: int = 1):
    """The params of the DM and evaluation rows: the defaults, DM's real batch at the reference's 256."""
    return load_params(None, {
        "experts.dm.batch_real": 256, "experts.dm.bf16": bf16, "distill.budget": budget,
        "evaluate.epochs": epochs,
    })


def no_preset(method: str) -> dict[str, str]:
    """``experts.<method>.preset: none`` where the config has presets: a row that writes every knob
    itself cannot then differ from the reference through a dataset preset."""
    cfg = load_params(None).experts.for_method(method)
    return {f"experts.{method}.preset": "none"} if "preset" in type(cfg).model_fields else {}


def our_method(name: str, params: Any, data: Data, device: torch.device, noe: int):
    """Our expert method ``name`` as a distill run builds and starts it (``build_method``, then
    ``start_images``); returns (method, syn)."""
    prep = data.prepared
    part = make_partition(prep.train_labels, prep.num_classes, noe, seed=0, data_digest=prep.digest)
    method = build_method(name, params, prep, part, device)
    return method, start_images(method)


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(fn and fn())


# ---------------------------------------------------------------------------------- profiling


def profile_step(step: Callable[[], Any], device: torch.device, top: int) -> str:
    """Profile one (already warm) call of ``step``: a summary line, then the top ops by self time
    (device time on CUDA).

    The summary says whether the step is bound by the device or by the host: the profiled wall
    time, and on CUDA the kernels' total time (GPU busy) and the number of kernel launches; a
    busy share far below 100 % means the host (Python, autograd, dispatch, launches, syncs) is
    what to shorten. The profiler adds host overhead, so the wall time is above the benchmark's.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - t0
    avg = prof.key_averages()
    aten = sum(e.count for e in avg if e.key.startswith("aten::"))
    summary = f"profiled wall {wall:.3f} s, {aten} aten op calls (nested included)"
    if cuda:
        # the kernels' own (device-type) events, as the table's "Self CUDA time total" sums them
        busy = sum(e.self_device_time_total for e in avg
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
        launches = sum(e.count for e in avg if "LaunchKernel" in e.key)
        syncs = sum(e.count for e in avg if "Synchronize" in e.key)
        summary += (f", GPU busy {busy:.3f} s ({100 * busy / max(wall, 1e-9):.0f} % of wall), "
                    f"{launches} kernel launches, {syncs} synchronize calls")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return summary + "\n" + avg.table(sort_by=key, row_limit=top, max_name_column_width=48)
