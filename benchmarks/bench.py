#!/usr/bin/env python
"""Speed benchmark: moedd vs. the DC reference code, timed the same way on the same machine.

Prints DM iterations/s and evaluation epochs/s (+ the 10,000-image test pass) per network at
the standard sizes (CIFAR shapes 3x32x32, 10 classes x 5000 training images, batch_real 256,
IPC 10) next to the reference implementation (VICO-UoE/DatasetCondensation: ``main_DM.py`` for
DM, ``utils.epoch`` as called by ``utils.evaluate_synset`` for evaluation). This is a benchmark,
not a test: it asserts nothing and needs no dataset (random CIFAR-shaped tensors are used).

The reference is NOT vendored: pass the path of a checkout with ``--reference-dc PATH``; it is
imported at run time (``utils.py``, ``networks.py``) in this same process, so both sides share
the interpreter, the thread pool and the allocator settings (``moedd.device.tune_process``).
Without ``--reference-dc`` only our numbers are printed.

Usage::

    python benchmarks/bench.py --reference-dc /tmp/dc-ref            # full (~4.5 min on 2 CPU cores)
    python benchmarks/bench.py --reference-dc /tmp/dc-ref --quick    # ~1 min
    python benchmarks/bench.py --json bench.json --device cuda

Timing protocol: every measured thing runs once untimed (warm-up) and then N times; the median
is reported. Reference and ours alternate repetition by repetition, so slow drift of the machine
(other processes, turbo) hits both sides alike. On CUDA every timing is bracketed by
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # run from a checkout without installing: make `import moedd` find the repo
    import moedd  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moedd.config import load_params
from moedd.data import Prepared, make_partition
from moedd.device import resolve_device, tune_process
from moedd.distill import build_method
from moedd.evaluate import TrainingSet, normalize_test, test_accuracy, train_network
from moedd.nets import create_net

NUM_CLASSES, PER_CLASS, NUM_TEST, SHAPE = 10, 5000, 10_000, (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# our registry name -> reference get_network name
NETS = {"convnet3": "ConvNet", "vgg11": "VGG11", "resnet18": "ResNet18", "alexnet": "AlexNet"}


# ------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Row:
    """One line of the result table. ``unit`` is it/s, epochs/s (higher is better) or s (lower)."""

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
        return self.ref / self.ours if self.unit == "s" else self.ours / self.ref

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.speedup is None:
            return None
        return self.speedup >= self.goal


# --------------------------------------------------------------------------------------- data


@dataclass
class Data:
    prepared: Prepared
    images_all: torch.Tensor  # reference: float32 normalised train images on the device
    indices_class: list[list[int]]  # reference: per-class indices (as main_DM.py builds them)
    test_x: torch.Tensor  # float32 normalised test images on the device
    test_y: torch.Tensor


def make_data(device: torch.device, with_reference: bool, seed: int = 0) -> Data:
    """Random CIFAR-shaped data held in memory (no downloads): 10 x 5000 train, 10,000 test."""
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


# ---------------------------------------------------------------------------------- reference


def _stub_module(name: str, **attrs: Any) -> None:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def import_reference(path: str) -> types.ModuleType:
    """Import the reference ``utils`` module from a DatasetCondensation checkout.

    Shims, only where this environment lacks what the reference imports at module level (none
    of it is used by the code timed here): ``scipy.ndimage.interpolation`` (removed in SciPy 2)
    and ``torchvision`` (only ``get_dataset`` uses it).
    """
    root = Path(path).expanduser().resolve()
    if not (root / "utils.py").exists() or not (root / "networks.py").exists():
        raise SystemExit(f"--reference-dc {path}: no utils.py/networks.py there (a DatasetCondensation checkout?)")
    try:
        importlib.import_module("scipy.ndimage.interpolation")
    except ImportError:
        try:
            from scipy.ndimage import rotate
        except ImportError:  # pragma: no cover
            def rotate(*a: Any, **k: Any) -> Any:
                raise NotImplementedError("scipy is not installed")
        _stub_module("scipy.ndimage.interpolation", rotate=rotate)
    try:
        importlib.import_module("torchvision")
    except ImportError:  # pragma: no cover
        _stub_module("torchvision", datasets=types.SimpleNamespace(), transforms=types.SimpleNamespace())
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("utils")
    finally:
        sys.path.remove(str(root))


class RefDM:
    """The inner DM iteration of ``main_DM.py`` (model ConvNet, no BN), reproduced line by line."""

    def __init__(self, U: types.ModuleType, data: Data, device: torch.device, ipc: int, batch_real: int) -> None:
        self.U, self.device, self.ipc, self.batch_real = U, device, ipc, batch_real
        self.images_all, self.indices_class = data.images_all, data.indices_class
        self.channel, self.im_size, self.num_classes = SHAPE[0], SHAPE[1:], NUM_CLASSES
        self.dsa_param, self.dsa_strategy = U.ParamDiffAug(), DSA_STRATEGY
        self.image_syn = torch.randn(size=(self.num_classes * ipc, self.channel, *self.im_size),
                                     dtype=torch.float, requires_grad=True, device=device)
        for c in range(self.num_classes):  # init == 'real'
            self.image_syn.data[c * ipc:(c + 1) * ipc] = self.get_images(c, ipc).detach().data
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=1.0, momentum=0.5)
        self.optimizer_img.zero_grad()

    def get_images(self, c: int, n: int) -> torch.Tensor:  # get random n images from class c
        idx_shuffle = np.random.permutation(self.indices_class[c])[:n]
        return self.images_all[idx_shuffle]

    def step(self) -> float:
        U, args_device, ipc, channel, im_size = self.U, self.device, self.ipc, self.channel, self.im_size
        net = U.get_network("ConvNet", channel, self.num_classes, im_size).to(args_device)  # get a random model
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        embed = net.module.embed if torch.cuda.device_count() > 1 else net.embed  # for GPU parallel
        loss_avg = 0
        loss = torch.tensor(0.0).to(args_device)
        for c in range(self.num_classes):
            img_real = self.get_images(c, self.batch_real)
            img_syn = self.image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
            seed = int(time.time() * 1000) % 100000
            img_real = U.DiffAugment(img_real, self.dsa_strategy, seed=seed, param=self.dsa_param)
            img_syn = U.DiffAugment(img_syn, self.dsa_strategy, seed=seed, param=self.dsa_param)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        self.optimizer_img.zero_grad()
        loss.backward()
        self.optimizer_img.step()
        loss_avg += loss.item()
        return loss_avg / self.num_classes


def ref_args(U: types.ModuleType, device: torch.device) -> argparse.Namespace:
    """The fields of main_DM.py's ``args`` that ``utils.epoch`` reads."""
    return argparse.Namespace(
        device=str(device), dsa=True, dsa_param=U.ParamDiffAug(), dsa_strategy=DSA_STRATEGY,
        dc_aug_param=None, batch_train=256, lr_net=0.01,
    )


class RefTrainer:
    """``evaluate_synset``'s set-up and training epoch on 100 synthetic images (IPC 10 x 10 classes)."""

    def __init__(self, U: types.ModuleType, model: str, images: torch.Tensor, labels: torch.Tensor,
                 device: torch.device) -> None:
        self.U, self.args = U, ref_args(U, device)
        self.net = U.get_network(model, SHAPE[0], NUM_CLASSES, SHAPE[1:]).to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
        self.criterion = torch.nn.CrossEntropyLoss().to(device)
        dst_train = U.TensorDataset(images.to(device), labels.to(device))
        self.loader = torch.utils.data.DataLoader(dst_train, batch_size=256, shuffle=True, num_workers=0)

    def epoch(self) -> None:
        self.U.epoch("train", self.loader, self.net, self.optimizer, self.criterion, self.args, aug=True)


def ref_test_pass(U: types.ModuleType, net: torch.nn.Module, loader: Any, device: torch.device) -> None:
    criterion = torch.nn.CrossEntropyLoss().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    U.epoch("test", loader, net, opt, criterion, ref_args(U, device), aug=False)


# ---------------------------------------------------------------------------------------- ours


def our_params(budget: int, bf16: bool, epochs: int = 1):
    return load_params(None, {
        "experts.dm.batch_real": 256, "experts.dm.bf16": bf16, "distill.budget": budget,
        "evaluate.epochs": epochs,
    })


def our_dm(data: Data, device: torch.device, noe: int, bf16: bool):
    """Build our DM method exactly as ``moedd.distill.optimise`` does; returns (method, syn)."""
    params = our_params(10, bf16)
    prep = data.prepared
    part = make_partition(prep.train_labels, prep.num_classes, noe, seed=0, data_digest=prep.digest)
    method = build_method("dm", params, prep, part, device)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    return method, syn


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(fn and fn())


# ------------------------------------------------------------------------------------ sections


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_dm(data: Data, device: torch.device, U: types.ModuleType | None, reps: int, bf16: bool,
             noe2: bool, goal: float) -> list[Row]:
    rows: list[Row] = []
    configs = [("DM iteration, NoE=1 (IPC 10)", 1, False, True)]
    if noe2:
        configs.append(("DM iteration, NoE=2 (IPC 5 each)", 2, False, False))
    if bf16:
        configs.append(("DM iteration, NoE=1, bf16 autocast", 1, True, False))
    ref_dm = RefDM(U, data, device, ipc=10, batch_real=256) if U is not None else None
    for what, noe, use_bf16, like_for_like in configs:
        log(f"{what}: building")
        method, syn = our_dm(data, device, noe, use_bf16)
        it = 0

        def ours_step() -> None:
            nonlocal it
            out = method.step(syn, it)
            float(out["loss"])
            it += 1

        with_ref = ref_dm is not None and like_for_like
        ours_step()  # warm-up
        if with_ref:
            ref_dm.step()
        row = Row("dm", what, "it/s", goal=goal if like_for_like else None)
        if not like_for_like:
            row.note = "no reference counterpart" if noe > 1 else "ours only (reference has no bf16 path)"
        for r in range(reps):
            row.ours_samples.append(_timed(ours_step, device))
            if with_ref:
                row.ref_samples.append(_timed(ref_dm.step, device))
            log(f"  rep {r + 1}/{reps}: ours {row.ours_samples[-1]:.3f}s"
                + (f", reference {row.ref_samples[-1]:.3f}s" if with_ref else ""))
        row.ours = 1.0 / _median(row.ours_samples)
        if with_ref:
            row.ref = 1.0 / _median(row.ref_samples)
        rows.append(row)
        del method, syn
    return rows


def synthetic_training_set(device: torch.device, seed: int = 1) -> tuple[TrainingSet, torch.Tensor, torch.Tensor]:
    """100 synthetic images: 2 experts x IPC 5 x 10 classes (ours) = IPC 10 x 10 classes (reference)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(100, *SHAPE, generator=g).to(device)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(5).repeat(2).to(device)
    experts = torch.arange(2).repeat_interleave(50).to(device)
    return TrainingSet(images, labels, experts, 0.01), images, labels


def bench_train(device: torch.device, U: types.ModuleType | None, nets: list[str], epochs: int, goal: float) -> list[Row]:
    """Evaluation training: per-epoch times of ``train_network`` vs the reference ``epoch('train')``.

    The timed epochs are split into blocks (2 when ``epochs`` >= 4, else 1); in every block each
    side trains one fresh network for 1 + ``epochs/blocks`` epochs, ours then the reference. The
    first epoch of a block (which also builds the network and warms up) is dropped; the median of
    all other epochs is reported.
    """
    rows = []
    data, images, labels = synthetic_training_set(device)
    blocks = 2 if epochs >= 4 else 1
    per_block = [epochs // blocks + (1 if b < epochs % blocks else 0) for b in range(blocks)]
    for name in nets:
        log(f"train epoch, {name}")
        row = Row("train", f"eval train epoch, {name} (100 img)", "epochs/s", goal=goal)
        for n_ep in per_block:
            params = our_params(10, False, epochs=n_ep + 1)
            stamps: list[float] = []

            def on_epoch(_e: int) -> None:
                _sync(device)
                stamps.append(time.perf_counter())

            _sync(device)
            t0 = time.perf_counter()
            train_network(name, data, params.evaluate, params.fusion, seed=0, num_classes=NUM_CLASSES,
                          on_epoch=on_epoch)
            row.ours_samples += np.diff([t0, *stamps]).tolist()[1:]
            if U is not None:
                trainer = RefTrainer(U, NETS[name], images, labels, device)
                for e in range(n_ep + 1):
                    dt = _timed(trainer.epoch, device)
                    if e:
                        row.ref_samples.append(dt)
        row.ours = 1.0 / _median(row.ours_samples)
        if row.ref_samples:
            row.ref = 1.0 / _median(row.ref_samples)
        log(f"  ours {row.ours:.3f} epochs/s" + (f", reference {row.ref:.3f} epochs/s" if row.ref else ""))
        rows.append(row)
    return rows


def bench_test(data: Data, device: torch.device, U: types.ModuleType | None, nets: list[str], n_images: int,
               reps: int, goal: float) -> list[Row]:
    """Test pass: ``test_accuracy`` (batch = evaluate.test_batch_size) vs reference ``epoch('test')`` (batch 256).

    Measured on the first ``n_images`` test images and reported as seconds per 10,000 images
    (time is linear in the number of images). Warm-up: one pass over 256 images per side.
    """
    rows = []
    batch = load_params(None).evaluate.test_batch_size
    x, y = data.test_x[:n_images], data.test_y[:n_images]
    scale = NUM_TEST / n_images
    loader = warm_loader = None
    if U is not None:  # the reference's test set lives on the CPU; epoch() moves each batch to the device
        xc, yc = x.cpu(), y.cpu()
        loader = torch.utils.data.DataLoader(U.TensorDataset(xc, yc), batch_size=256, shuffle=False, num_workers=0)
        warm_loader = torch.utils.data.DataLoader(U.TensorDataset(xc[:256], yc[:256]), batch_size=256, shuffle=False)
    for name in nets:
        log(f"test pass, {name}")
        label = "test pass 10k img" + ("" if n_images == NUM_TEST else f" (from {n_images})")
        row = Row("test", f"{label}, {name}", "s", goal=goal)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = create_net(name, NUM_CLASSES).to(device, memory_format=torch.channels_last)
        test_accuracy(net, x[:256], y[:256], batch_size=batch)  # warm-up
        ref_net = None
        if U is not None:
            ref_net = U.get_network(NETS[name], SHAPE[0], NUM_CLASSES, SHAPE[1:]).to(device)
            ref_test_pass(U, ref_net, warm_loader, device)
        for _ in range(reps):
            row.ours_samples.append(_timed(lambda: test_accuracy(net, x, y, batch_size=batch), device) * scale)
            if ref_net is not None:
                row.ref_samples.append(_timed(lambda: ref_test_pass(U, ref_net, loader, device), device) * scale)
        row.ours = _median(row.ours_samples)
        if ref_net is not None:
            row.ref = _median(row.ref_samples)
        log(f"  ours {row.ours:.2f}s" + (f", reference {row.ref:.2f}s" if row.ref else "") + " per 10k")
        rows.append(row)
    return rows


def profile_step(step: Callable[[], Any], device: torch.device, top: int) -> str:
    """Profile one (already warm) call of ``step``; returns the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)


def profile_dm(data: Data, device: torch.device, U: types.ModuleType | None, top: int = 15) -> str:
    """Top ops of one warm DM step, NoE=1, of ours (and of the reference when given)."""
    method, syn = our_dm(data, device, 1, False)
    float(method.step(syn, 0)["loss"])
    out = "ours (moedd DM, NoE=1, fp32):\n" + profile_step(lambda: float(method.step(syn, 1)["loss"]), device, top)
    if U is not None:
        ref = RefDM(U, data, device, ipc=10, batch_real=256)
        ref.step()
        out += "\nreference (main_DM.py loop):\n" + profile_step(ref.step, device, top)
    return out


# ------------------------------------------------------------------------------------- output


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["moedd_git"] = _git_state()
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity:
        info["cores_usable"] = len(affinity(0))
    return info


def _git_state() -> str:
    """Commit of the moedd checkout being measured, with ``+dirty`` when files are modified."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def allocator_info() -> str:
    if os.environ.get("MOEDD_NO_MALLOPT"):
        s = "glibc malloc defaults (MOEDD_NO_MALLOPT set: tune_process skipped mallopt)"
    else:
        s = "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1) via moedd.device.tune_process()"
    extra = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    if extra:
        s += "; env: " + " ".join(extra)
    return s + "; applies to ours and the reference alike (same process)"


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:.3f} {unit}" if v < 10 else f"{v:.1f} {unit}"


def render(rows: list[Row]) -> str:
    head = ["what", "ours", "reference", "speedup", "goal", "met?"]
    body = []
    for r in rows:
        sp = r.speedup
        met = {None: "—", True: "yes", False: "**NO**"}[r.met]
        body.append([
            r.what, _fmt(r.ours, r.unit), _fmt(r.ref, r.unit), f"{sp:.2f}x" if sp is not None else "—",
            f"≥{r.goal:g}x" if r.goal is not None else "—", met,
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--reference-dc", metavar="PATH", help="DatasetCondensation checkout to compare against")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, small test pass, no extra DM rows (~1 min on CPU)")
    p.add_argument("--only", default="dm,train,test", help="comma list of sections: dm, train, test")
    p.add_argument("--nets", default=",".join(NETS), help="evaluation networks (default: all four)")
    p.add_argument("--dm-reps", type=int, help="timed DM iterations per row (default 5; quick 2)")
    p.add_argument("--train-epochs", type=int, help="timed training epochs per net (default 6; quick 2)")
    p.add_argument("--test-images", type=int, help="test images per timed pass, reported per 10k "
                   "(default: 10000 on CUDA, 1000 on CPU; quick 256 on CPU)")
    p.add_argument("--test-reps", type=int, help="timed test passes per net (default 3; quick 1)")
    p.add_argument("--no-noe2", action="store_true", help="skip the NoE=2 DM row")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 DM row")
    p.add_argument("--profile", action="store_true", help="also profile one DM step of ours and of the reference (torch.profiler top ops)")
    p.add_argument("--json", metavar="PATH", help="write all numbers (and raw samples) as JSON")
    a = p.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tune_process()
    try:
        device = resolve_device(a.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    cuda = device.type == "cuda"
    sections = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = sections - {"dm", "train", "test"}
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}")
    nets = [n.strip() for n in a.nets.split(",") if n.strip()]
    for n in nets:
        if n not in NETS:
            raise SystemExit(f"--nets: {n} is not one of {', '.join(NETS)}")
    dm_reps = a.dm_reps or (2 if a.quick else 5)
    train_epochs = a.train_epochs or (2 if a.quick else 6)
    test_images = min(a.test_images or (NUM_TEST if cuda else (256 if a.quick else 1000)), NUM_TEST)
    test_reps = a.test_reps or (1 if a.quick else 3)
    with_bf16 = not a.no_bf16 and not a.quick and bf16_available(device)
    with_noe2 = not a.no_noe2 and not a.quick

    U = import_reference(a.reference_dc) if a.reference_dc else None
    info = machine_info(device)
    alloc = allocator_info()
    header = (f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
              + (f", GPU {info['gpu']}" if cuda else "")
              + f"; torch {info['torch']}; device {device}; moedd {info['moedd_git']}; {info['date']}")
    print(header, flush=True)
    print(f"allocator: {alloc}", flush=True)
    if U is None:
        print("reference: not given (--reference-dc PATH); only our numbers", flush=True)
    else:
        print(f"reference: {Path(a.reference_dc).resolve()} (imported in this process)", flush=True)

    t_start = time.perf_counter()
    data = make_data(device, with_reference=U is not None and "dm" in sections)
    rows: list[Row] = []
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's affine_grid/meshgrid warnings
    if "dm" in sections:
        rows += bench_dm(data, device, U, dm_reps, with_bf16, with_noe2, goal=2.0 if cuda else 1.2)
    if "train" in sections:
        rows += bench_train(device, U, nets, train_epochs, goal=1.0)
    if "test" in sections:
        rows += bench_test(data, device, U, nets, test_images, test_reps, goal=1.5)
    total = time.perf_counter() - t_start

    print()
    print(render(rows))
    print()
    notes = []
    if "dm" in sections:
        notes.append(f"DM: median of {dm_reps} iterations after 1 warm-up, ours and reference alternating (batch_real "
                     f"256, IPC 10, 10 classes, DSA {DSA_STRATEGY}); NoE=2 and bf16 rows are ours only.")
    if "train" in sections:
        notes.append(f"train: median of {train_epochs} epochs (warm-up epoch dropped per block of fresh network), 100 "
                     "images, batch 256, DSA; ours also applies mixup fusion (2 experts x 50 images).")
    if "test" in sections:
        notes.append(f"test: median of {test_reps} pass(es) over {test_images} random images, scaled to 10,000, after a "
                     f"256-image warm-up; ours test_accuracy (batch {load_params(None).evaluate.test_batch_size}), "
                     "reference epoch('test') (batch 256, in-memory TensorDataset).")
    unsteady = [f"{r.what} ({side} {max(xs) / min(xs):.1f}x)" for r in rows
                for side, xs in (("ours", r.ours_samples), ("ref", r.ref_samples))
                if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 1.5]
    if unsteady:
        notes.append("WARNING: unsteady machine, repetitions of one measurement differ by more than 1.5x (max/min): "
                     + "; ".join(unsteady) + ". Re-run before trusting these rows.")
    notes.append(f"Total {total:.0f} s.")
    print("\n".join(notes))
    if a.profile:
        if not data.indices_class and U is not None:
            data = make_data(device, with_reference=True)
        print("\nprofile of one DM step:")
        print(profile_dm(data, device, U))
    if a.json:
        out = {
            "machine": info, "allocator": alloc, "reference": a.reference_dc, "argv": sys.argv,
            "settings": {"dm_reps": dm_reps, "train_epochs": train_epochs, "test_images": test_images,
                         "test_reps": test_reps, "quick": a.quick},
            "seconds_total": total,
            "rows": [{**asdict(r), "speedup": r.speedup, "met": r.met} for r in rows],
        }
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
