#!/usr/bin/env python
"""Speed benchmark: moedd vs. the reference code of each method, timed the same way on the same machine.

Prints DM iterations/s and evaluation epochs/s (+ the 10,000-image test pass) per network at
the standard sizes (CIFAR shapes 3x32x32, 10 classes x 5000 training images, batch_real 256,
IPC 10) next to the reference implementation (VICO-UoE/DatasetCondensation: ``main_DM.py`` for
DM, ``utils.epoch`` as called by ``utils.evaluate_synset`` for evaluation), and seconds per IDM
iteration and per IDC inner step at their CIFAR-10 IPC 10 settings next to uitrbn/IDM
(``IDM_cifar10.py``'s loop body) and snu-mllab/Efficient-Dataset-Condensation (``condense.py``'s
inner-loop body), and seconds and peak memory per MTT iteration (CIFAR-10 IPC 10) and seconds per
teacher epoch next to GeorgeCazenavette/mtt-distillation (``distill.py``'s loop body, ``buffer.py``'s
epoch). This is a benchmark, not a test: it asserts nothing and needs no dataset (random
CIFAR-shaped tensors are used).

The references are NOT vendored: pass the paths of checkouts with ``--reference-dc PATH``,
``--reference-idm PATH``, ``--reference-idc PATH``, ``--reference-mtt PATH``; they are imported at
run time in this same process, so both sides share the interpreter, the thread pool and the
allocator settings (``moedd.device.tune_process``). Exception: the MTT rows run each side in its
own child process (``bench.py --_mtt-worker ours|ref``), because peak memory is per process.
Without a reference path only our numbers are printed for its rows.

Usage::

    python benchmarks/bench.py --reference-dc /tmp/dc-ref --only dm,train,test   # ~4.5 min on 2 CPU cores
    python benchmarks/bench.py --reference-dc /tmp/dc-ref --quick                # ~1 min (+ IDM/IDC rows)
    python benchmarks/bench.py --only idm,idc --reference-idm /tmp/idm-ref --reference-idc /tmp/idc-ref
    python benchmarks/bench.py --only mtt,teacher --reference-mtt /tmp/mtt-ref
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
import functools
import importlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:  # run from a checkout without installing: make `import moedd` find the repo
    import moedd  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moedd.params import load_params
from moedd.data import Prepared, make_partition
from moedd.device import resolve_device, tune_process
from moedd.distill import build_method
from moedd.data.zca import ZCA
from moedd.evaluate import TrainingSet, normalize_test, test_accuracy, train_network
from moedd.experts.mtt import peak_memory_gb
from moedd.experts._idc_graph import STREAM_MATCH, STREAM_MIX, STREAM_NET, StaticInnerSteps
from moedd.nets import create_net
from moedd.trajectories import flat_params, init_teacher, train_teacher

NUM_CLASSES, PER_CLASS, NUM_TEST, SHAPE = 10, 5000, 10_000, (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
# our registry name -> reference get_network name
NETS = {"convnet3": "ConvNet", "vgg11": "VGG11", "resnet18": "ResNet18", "alexnet": "AlexNet"}
SECTIONS = ("dm", "train", "test", "idm", "idc", "mtt", "teacher")
PROFILED = ("dm", "idc", "mtt")


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


def _common_shims() -> None:
    """Stand-ins for module-level imports of the reference repositories that this environment lacks.

    ``scipy.ndimage.interpolation`` (removed in SciPy 2; only the reference's non-differentiable
    ``augment`` uses ``rotate``) and ``torchvision`` (only dataset loading and image saving use
    it). Neither is on a timed code path; each is stubbed only when it cannot be imported.
    """
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


def _checkout(path: str, flag: str, files: tuple[str, ...], what: str) -> Path:
    root = Path(path).expanduser().resolve()
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise SystemExit(f"{flag} {path}: no {', '.join(missing)} there (a {what} checkout?)")
    return root


@contextlib.contextmanager
def _isolated_imports(root: Path):
    """Import from the checkout ``root`` without clashing with other checkouts' module names.

    The three reference repositories reuse top-level names (``utils``, ``networks``, ``train``,
    ``data``, ...). While the block runs, modules of those names are taken out of
    ``sys.modules`` and ``root`` is first on ``sys.path``; afterwards the checkout's modules are
    dropped from ``sys.modules`` again and the previous ones restored. The imported functions
    keep working: they reach their own module's globals, not ``sys.modules``. Warnings raised at
    import time (deprecations in old code) are silenced; the warning filters are restored.
    """
    names = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir()}
    clash = lambda n: n.split(".")[0] in names  # noqa: E731
    saved = {n: m for n, m in sys.modules.items() if clash(n)}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.path.remove(str(root))
        for n in [n for n in sys.modules if clash(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def import_reference(path: str) -> types.ModuleType:
    """Import the reference ``utils`` module from a DatasetCondensation checkout (see ``_common_shims``)."""
    root = _checkout(path, "--reference-dc", ("utils.py", "networks.py"), "DatasetCondensation")
    _common_shims()
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


# ------------------------------------------------------------------------- reference: IDM, IDC


@dataclass(frozen=True)
class IDMSizes:
    """The IDM knobs that set the amount of work (standard = CIFAR-10 IPC 10 of IDM's command.txt)."""

    batch_real: int = 256
    model_train_steps: int = 10
    trained_bs: int = 256

    @property
    def standard(self) -> bool:
        return self == IDMSizes()

    def describe(self) -> str:
        return (f"batch_real {self.batch_real}, model_train_steps {self.model_train_steps}, "
                f"trained_bs {self.trained_bs}")


@dataclass(frozen=True)
class IDCSizes:
    """The IDC knobs that set the amount of work (standard = ``condense.py --reproduce -d cifar10 -f 2 --ipc 10``)."""

    batch_real: int = 64
    n_data: int = 2000

    @property
    def standard(self) -> bool:
        return self == IDCSizes()

    def describe(self) -> str:
        return f"batch_real {self.batch_real}, n_data {self.n_data}"


# IDM's command.txt, CIFAR10/10: --model ConvNet --ipc 10 --dsa_strategy color_crop_cutout_flip_scale_rotate
# --init real --lr_img 0.2 --net_train_real --outer_loop 1 --mismatch_lambda 0 --net_decay --embed_last 1000
# --syn_ce --ce_weight 0.5 --train_net_num 1 --aug  (the rest: IDM_cifar10.py's argparse defaults)
IDM_ARGS = dict(
    model="ConvNet", ipc=10, dsa_strategy=DSA_STRATEGY, lr_img=0.2, lr_net=0.01, net_decay=True, embed_last=1000,
    syn_ce=True, ce_weight=0.5, train_net_num=1, aug=True, aug_num=1, outer_loop=1, net_num=100, net_begin=0,
    net_end=100000, net_generate_interval=30, net_push_num=1, fetch_net_num=2, ij_selection="random",
)
# IDC's README command for these settings (condense.py reads argument.py's parser at import)
IDC_ARGV = ["condense.py", "--reproduce", "-d", "cifar10", "-f", "2", "--ipc", "10"]


def import_reference_idm(path: str) -> types.ModuleType:
    """Import ``dc_utils`` (get_network, DiffAugment, ParamDiffAug, number_sign_augment, downscale)
    from a uitrbn/IDM checkout.

    ``IDM_cifar10.py`` itself is not imported: its loop is the body of ``main()`` (nothing to
    call), and it imports ``torchnet`` and MTT's ``utils`` (``kornia``) for dataset loading;
    :class:`RefIDM` is that loop body. ``dc_utils`` needs only the ``_common_shims``.
    """
    root = _checkout(path, "--reference-idm", ("IDM_cifar10.py", "dc_utils.py", "dc_networks.py"), "uitrbn/IDM")
    _common_shims()
    with _isolated_imports(root):
        return importlib.import_module("dc_utils")


class _ClassErrorMeter:
    """torchnet's ``meter.ClassErrorMeter(topk=[1], accuracy=True)``, used when torchnet is not installed.

    It IS on the timed path of IDM's loop (``add`` for every class and every network-training
    step, ``value`` for the CE weight), so this is an equivalent of pytorch/tnt's implementation
    for top-1, including its costs: every ``add`` copies the logits and targets to the host and
    ranks them with ``topk`` there (a device sync on CUDA).
    """

    def __init__(self, accuracy: bool = True) -> None:
        self.accuracy = accuracy
        self.reset()

    def reset(self) -> None:
        self.sum, self.n = 0, 0

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        out = output.cpu().squeeze().numpy()
        tgt = target.cpu().squeeze().numpy()
        if np.ndim(out) == 1:
            out = out[np.newaxis]
        pred = torch.from_numpy(out).topk(1, 1, True, True)[1].numpy()
        correct = pred == tgt[:, np.newaxis].repeat(pred.shape[1], 1)
        self.sum += out.shape[0] - correct[:, 0:1].sum()
        self.n += out.shape[0]

    def value(self) -> list[float]:
        err = float(self.sum) / self.n
        return [(1.0 - err) * 100.0 if self.accuracy else err * 100.0]


def _class_error_meter() -> Any:
    try:
        import torchnet  # type: ignore[import-not-found]

        return torchnet.meter.ClassErrorMeter(accuracy=True)
    except ImportError:
        return _ClassErrorMeter(accuracy=True)


class RefIDM:
    """One iteration of the ``for it in range(args.Iteration+1)`` loop of IDM's ``IDM_cifar10.py``.

    Set-up (untimed) as ``main()`` does it: real data as ``images_all``/``labels_all``/``indices_class``
    on the device (the normalised tensors the DM reference uses), ``--init real`` with ``--aug``
    (four half-size real images per synthetic image), SGD(lr_img, momentum 0.5) on the images, and
    the first 3 queue networks (``get_network``, SGD with ``--net_decay``, an accuracy meter each).
    :meth:`step` is the loop body, in order: push a network every ``net_generate_interval``
    iterations; draw ``train_net_num`` networks; per class, ``get_images``, ``number_sign_augment``
    (partition & expansion, factor 2), siamese ``DiffAugment`` of real and synthetic images with one
    clock seed, ``embed_channel_avg(…, last=1000)``, mean-feature MSE, a second forward ``net(img_syn)``
    for the logits, the CE metric (``.item()``), the batch accuracy meter, the CE term weighted by
    the network's running accuracy × ce_weight, and one image SGD step per class; then
    ``fetch_net_num`` random queue networks each take ``model_train_steps`` SGD steps on
    ``get_images(c=None, n=trained_bs)``. Left out: the evaluation block (never reached before
    iteration 100), the ``print`` every 10 iterations, and the two ``args.ipc == 1 and not
    args.aug`` branches (not taken at IPC 10 with ``--aug``).
    """

    def __init__(self, D: types.ModuleType, data: Data, device: torch.device, sizes: IDMSizes) -> None:
        a = argparse.Namespace(**IDM_ARGS, batch_real=sizes.batch_real, model_train_steps=sizes.model_train_steps,
                               trained_bs=sizes.trained_bs, device=str(device), dsa=True,
                               dsa_param=D.ParamDiffAug())
        self.D, self.args = D, a
        self.images_all, self.indices_class = data.images_all, data.indices_class
        self.labels_all = data.prepared.train_labels.to(device)
        self.num_classes, self.channel, self.im_size = NUM_CLASSES, SHAPE[0], SHAPE[1:]
        ipc, im_size = a.ipc, self.im_size
        self.image_syn = torch.randn(size=(NUM_CLASSES * ipc, self.channel, *im_size), dtype=torch.float,
                                     requires_grad=True, device=a.device)
        self.label_syn = torch.tensor(np.array([np.ones(ipc) * i for i in range(NUM_CLASSES)]), dtype=torch.long,
                                      requires_grad=False, device=a.device).view(-1)
        half = im_size[0] // 2
        for c in range(NUM_CLASSES):  # init == 'real' with --aug
            rows = slice(c * ipc, (c + 1) * ipc)
            self.image_syn.data[rows, :, :half, :half] = D.downscale(self.get_images(c, ipc), 0.5).detach().data
            self.image_syn.data[rows, :, half:, :half] = D.downscale(self.get_images(c, ipc), 0.5).detach().data
            self.image_syn.data[rows, :, :half, half:] = D.downscale(self.get_images(c, ipc), 0.5).detach().data
            self.image_syn.data[rows, :, half:, half:] = D.downscale(self.get_images(c, ipc), 0.5).detach().data
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=a.lr_img, momentum=0.5)
        self.optimizer_img.zero_grad()
        self.net_list: list[torch.nn.Module] = []
        self.optimizer_list: list[torch.optim.Optimizer] = []
        self.acc_meters: list[Any] = []
        for _ in range(3):
            self._append_net()
        self.criterion = torch.nn.CrossEntropyLoss().to(a.device)

    def get_images(self, c: int | None = None, n: int = 0) -> Any:  # get random n images from class c
        if c is not None:
            idx_shuffle = np.random.permutation(self.indices_class[c])[:n]
            return self.images_all[idx_shuffle]
        indices_flat = [_ for sublist in self.indices_class for _ in sublist]
        idx_shuffle = np.random.permutation(indices_flat)[:n]
        return self.images_all[idx_shuffle], self.labels_all[idx_shuffle]

    def _append_net(self) -> None:
        a = self.args
        net = self.D.get_network(a.model, self.channel, self.num_classes, self.im_size).to(a.device)  # a random model
        net.train()
        if a.net_decay:
            optimizer_net = torch.optim.SGD(net.parameters(), lr=a.lr_net, momentum=0.9, weight_decay=0.0005)
        else:
            optimizer_net = torch.optim.SGD(net.parameters(), lr=a.lr_net)
        optimizer_net.zero_grad()
        self.net_list.append(net)
        self.optimizer_list.append(optimizer_net)
        self.acc_meters.append(_class_error_meter())

    def step(self, it: int) -> float:
        D, args, ipc, channel, im_size = self.D, self.args, self.args.ipc, self.channel, self.im_size
        num_classes, image_syn, label_syn = self.num_classes, self.image_syn, self.label_syn
        net_list, get_images = self.net_list, self.get_images
        if it % args.net_generate_interval == 0:
            for _ in range(args.net_push_num):  # append and pop net list
                if len(net_list) == args.net_num:
                    net_list.pop(0)
                    self.optimizer_list.pop(0)
                    self.acc_meters.pop(0)
                self._append_net()
        _ = list(range(len(net_list)))
        if len(_[args.net_begin: args.net_end]) > 10:
            _ = _[args.net_begin: args.net_end]
        random.shuffle(_)
        net_index_list = _[:args.train_net_num]  # ij_selection == 'random'
        train_net_list = [net_list[ind] for ind in net_index_list]
        train_acc_list = [self.acc_meters[ind] for ind in net_index_list]
        embed_list = [net.module.embed_channel_avg if torch.cuda.device_count() > 1 else net.embed_channel_avg
                      for net in train_net_list]
        loss_avg = 0.0
        for _ in range(args.outer_loop):
            loss_avg = 0
            metrics = {"syn": 0.0, "real": 0.0}
            acc_avg = {"syn": _class_error_meter()}
            for image_sign, image_temp in [["syn", image_syn]]:  # 'BN' not in args.model
                loss = torch.tensor(0.0).to(args.device)
                for net_ind in range(len(train_net_list)):
                    net = train_net_list[net_ind]
                    net.eval()
                    embed = embed_list[net_ind]
                    net_acc = train_acc_list[net_ind]
                    for c in range(num_classes):
                        loss_c = torch.tensor(0.0).to(args.device)
                        img_real = get_images(c, args.batch_real)
                        img_syn = image_temp[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
                        lab_syn = label_syn[c * ipc:(c + 1) * ipc]
                        if args.aug:
                            img_syn, lab_syn = D.number_sign_augment(img_syn, lab_syn)
                        img_real_list, img_syn_list = [], []
                        for _aug_i in range(args.aug_num):  # args.dsa
                            seed = int(time.time() * 1000) % 100000
                            img_real_list.append(D.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param))
                            img_syn_list.append(D.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param))
                        img_real = torch.cat(img_real_list)
                        img_syn = torch.cat(img_syn_list)
                        output_real = embed(img_real, last=args.embed_last).detach()
                        output_syn = embed(img_syn, last=args.embed_last)
                        loss_c += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
                        logits_syn = net(img_syn)
                        metrics[image_sign] += F.cross_entropy(logits_syn, lab_syn.repeat(args.aug_num)).detach().item()
                        acc_avg[image_sign].add(logits_syn.detach(), lab_syn.repeat(args.aug_num))
                        syn_ce_loss = 0
                        if args.syn_ce:
                            weight_i = net_acc.value()[0] if net_acc.n != 0 else 0
                            syn_ce_loss += F.cross_entropy(logits_syn, lab_syn.repeat(args.aug_num)) * weight_i
                            loss_c += syn_ce_loss * args.ce_weight
                        self.optimizer_img.zero_grad()
                        loss_c.backward()
                        self.optimizer_img.step()
                        loss += loss_c.item()
                if image_sign == "syn":
                    loss_avg += loss.item()
            loss_avg /= num_classes
            shuffled_net_index = list(range(len(net_list)))
            random.shuffle(shuffled_net_index)
            for j in range(min(args.fetch_net_num, len(shuffled_net_index))):
                training_net_idx = shuffled_net_index[j]
                net_train = net_list[training_net_idx]
                net_train.train()
                optimizer_net_train = self.optimizer_list[training_net_idx]
                acc_meter_net_train = self.acc_meters[training_net_idx]
                for _i in range(args.model_train_steps):
                    img_real_, lab_real_ = get_images(c=None, n=args.trained_bs)
                    real_logit = net_train(img_real_)
                    syn_cls_loss = self.criterion(real_logit, lab_real_)
                    optimizer_net_train.zero_grad()
                    syn_cls_loss.backward()
                    optimizer_net_train.step()
                    acc_meter_net_train.add(real_logit.detach(), lab_real_)
        return float(loss_avg)


class _PixelSet:
    """The torchvision CIFAR-10 training set as IDC's ``load_resized_data`` gives it to
    ``ClassMemDataLoader`` (``ToTensor``: float images in [0, 1]), built from the bench tensors.

    ``ClassMemDataLoader`` reads ``dataset[i][0]`` of every image once (here: views into one
    device tensor, so no copy), ``dataset.targets`` and ``dataset.nclass``.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, nclass: int) -> None:
        self.pixels, self.targets, self.nclass = pixels, labels.tolist(), nclass

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self.targets):
            raise IndexError(i)
        return self.pixels[i], self.targets[i]


@contextlib.contextmanager
def _cuda_literals_on(device: torch.device):
    """While IDC's ``train.py`` is imported on a machine without CUDA: ``torch.tensor(..., device='cuda')``
    creates the tensor on ``device`` instead. Only its module-level ``mean_torch``/``std_torch``
    tables do that; nothing timed reads them."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.tensor

    def tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = device
        return original(*args, **kwargs)

    torch.tensor = tensor  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.tensor = original  # type: ignore[assignment]


def import_reference_idc(path: str, device: torch.device) -> types.SimpleNamespace:
    """Import IDC's ``condense``, ``train``, ``data`` and ``argument`` from a snu-mllab/Efficient-Dataset-Condensation checkout.

    ``args`` comes from the reference's own ``argument.py``, parsed with ``IDC_ARGV`` (its README
    command for CIFAR-10 IPC 10, factor 2: ``--reproduce`` applies ``misc/reproduce.py``).

    Shims (each is named in the README):

    * ``efficientnet_pytorch`` is stubbed when missing (``train.py``/``test.py`` import it; only
      ``net_type='efficient'`` uses it).
    * Without CUDA, ``train.py``'s module-level ``torch.tensor(..., device='cuda')`` tables are put
      on ``device`` (:func:`_cuda_literals_on`; unused by the timed code), and ``train_epoch``'s CutMix
      partner permutation ``random_indices(target, nclass)`` -- whose default is ``device='cuda'`` --
      is the reference function with ``device=<bench device>``. On CUDA neither applies.
    * ``misc.utils.rand_bbox`` (CutMix box) calls ``np.int``, which NumPy 2 removed: when it is
      missing, ``misc.utils`` gets a copy of the numpy module namespace with ``int = int`` (what
      ``np.int`` was: the builtin). The process-wide numpy is not changed.
    """
    root = _checkout(path, "--reference-idc", ("condense.py", "train.py", "data.py", "argument.py"),
                     "snu-mllab/Efficient-Dataset-Condensation")
    _common_shims()
    try:
        importlib.import_module("efficientnet_pytorch")
    except ImportError:
        class EfficientNet:  # noqa: D401 - stand-in
            @classmethod
            def from_name(cls, *a: Any, **k: Any) -> Any:
                raise NotImplementedError("efficientnet_pytorch is not installed (bench stub)")

        _stub_module("efficientnet_pytorch", EfficientNet=EfficientNet)
    argv = sys.argv
    with _isolated_imports(root), _cuda_literals_on(device), contextlib.redirect_stdout(sys.stderr):
        condense = importlib.import_module("condense")
        train, data, mutils = sys.modules["train"], sys.modules["data"], sys.modules["misc.utils"]
        try:
            sys.argv = list(IDC_ARGV)
            argument = importlib.import_module("argument")
        finally:
            sys.argv = argv
    if not hasattr(np, "int"):
        np_compat = types.ModuleType("numpy")
        np_compat.__dict__.update(np.__dict__)
        np_compat.int = int  # type: ignore[attr-defined]
        mutils.np = np_compat
    if device.type != "cuda":
        train.random_indices = functools.partial(mutils.random_indices, device=device)
    return types.SimpleNamespace(condense=condense, train=train, data=data, args=argument.args)


class RefIDC:
    """One INNER step of IDC's ``condense()`` (``for ot in range(args.inner_loop)``), CIFAR-10 IPC 10, factor 2.

    Set-up (untimed), as ``condense()`` does it: ``ClassMemDataLoader(trainset, batch_real)`` (its
    ``--load_memory`` default: all training images resident on the device), ``Synthesizer`` with
    ``init('mix')``, ``diffaug(args)``, SGD(lr_img, mom_img) on the images, and the outer
    iteration's network (``define_model``: ConvNet-3, instance norm, width 128; SGD(lr 0.01,
    momentum 0.9, wd 5e-4); ``CrossEntropyLoss``), plus the clamp of the images to [0, 1].
    :meth:`inner_step` is the inner-loop body: for each class, ``loader_real.class_sample(c)``,
    ``synset.sample(c, batch_syn_max)``, ``aug(cat(real, syn))``, ``matchloss`` (gradient
    matching, mse), ``loss.item()``, one image SGD step; then ``train_epoch(…, n_data=args.n_data,
    aug=aug_rand, mixup='cut')`` on ``loader_real``. Left out: the ``TimeStamp`` bookkeeping (its
    ``args.time`` switch is off by default) and the per-outer-iteration logging.
    """

    def __init__(self, R: types.SimpleNamespace, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 sizes: IDCSizes) -> None:
        args = argparse.Namespace(**vars(R.args))
        args.batch_real, args.n_data = sizes.batch_real, sizes.n_data
        self.R, self.args = R, args
        # loader.device is a torch.device, so train_epoch's `if train_loader.device == 'cpu': .cuda()`
        # is skipped, as it is on the reference's GPU (the data already sits on the device)
        with contextlib.redirect_stdout(sys.stderr):
            self.loader_real = R.data.ClassMemDataLoader(_PixelSet(pixels, labels, NUM_CLASSES),
                                                         batch_size=args.batch_real, device=device)
            self.nclass = NUM_CLASSES
            nch, hs, ws = SHAPE
            self.synset = R.condense.Synthesizer(args, self.nclass, nch, hs, ws, device=device)
            self.synset.init(self.loader_real, init_type=args.init)
            self.aug, self.aug_rand = R.condense.diffaug(args, device=device)
        self.optim_img = torch.optim.SGD(self.synset.parameters(), lr=args.lr_img, momentum=args.mom_img)
        # the outer iteration's network (it % fix_iter == 0)
        self.model = R.train.define_model(args, self.nclass).to(device)
        self.model.train()
        self.optim_net = torch.optim.SGD(self.model.parameters(), args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.synset.data.data = torch.clamp(self.synset.data.data, min=0.0, max=1.0)

    def inner_step(self) -> float:
        args, synset, loader_real, model, R = self.args, self.synset, self.loader_real, self.model, self.R
        loss_total = 0.0
        for c in range(self.nclass):  # update synset
            img, lab = loader_real.class_sample(c)
            img_syn, lab_syn = synset.sample(c, max_size=args.batch_syn_max)
            n = img.shape[0]
            img_aug = self.aug(torch.cat([img, img_syn]))
            loss = R.condense.matchloss(args, img_aug[:n], img_aug[n:], lab, lab_syn, model)
            loss_total += loss.item()
            self.optim_img.zero_grad()
            loss.backward()
            self.optim_img.step()
        if args.n_data > 0:  # net update
            for _ in range(args.net_epoch):
                R.train.train_epoch(args, loader_real, model, self.criterion, self.optim_net, n_data=args.n_data,
                                    aug=self.aug_rand, mixup=args.mixup_net)
        return loss_total / self.nclass


# ------------------------------------------------------------------------------ reference: MTT


@dataclass(frozen=True)
class MTTSizes:
    """The MTT knobs that set the amount of work (standard = the CIFAR-10 IPC 10 row, algorithms.md §7.3)."""

    ipc: int = 10
    syn_steps: int = 30

    @property
    def standard(self) -> bool:
        return self == MTTSizes()

    def describe(self) -> str:
        return f"IPC {self.ipc} (batch_syn all {NUM_CLASSES * self.ipc}), syn_steps {self.syn_steps}"


# The CIFAR-10 IPC 10 row of the author-provided table (algorithms.md §7.3; presets.mtt.cifar10.10):
# distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30 --expert_epochs 2 --max_start_epoch 20 --zca
# --lr_img 100 --lr_lr 1e-5 --lr_teacher 0.001 (batch_syn: all); the rest: distill.py's argparse defaults.
MTT_ARGS = dict(
    model="ConvNet", expert_epochs=2, max_start_epoch=20, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.001,
    dsa="True", dsa_strategy=DSA_STRATEGY, zca=True, no_aug=False, texture=False,
)
MTT_TEACHERS = 2
"""Teachers in the stand-in trajectory buffer (both sides draw one per iteration; timing does not depend on which)."""
MTT_WORKER_SIDES = ("ours", "ref", "graph")  # graph: ours with experts.mtt.cuda_graph (CUDA only)


def import_reference_mtt(path: str) -> types.SimpleNamespace:
    """Import ``utils`` (get_network, DiffAugment, ParamDiffAug, epoch, TensorDataset) and
    ``reparam_module.ReparamModule`` from a GeorgeCazenavette/mtt-distillation checkout.

    ``distill.py`` and ``buffer.py`` are not imported: their loops are the bodies of ``main()``
    (nothing to call); :class:`RefMTT` and :class:`RefTeacher` are those bodies. Shims: the
    ``_common_shims``, and ``kornia`` is stubbed when it cannot be imported (``utils`` imports it at
    module level; only ``get_dataset``'s ZCA fitting, ``K.enhance.ZCAWhitening``, uses it, which
    is not on a timed path). ``wandb`` (imported by ``distill.py`` only) is not needed.
    """
    root = _checkout(path, "--reference-mtt", ("distill.py", "buffer.py", "utils.py", "reparam_module.py"),
                     "GeorgeCazenavette/mtt-distillation")
    _common_shims()
    try:
        importlib.import_module("kornia")
    except ImportError:
        def _no_zca(*a: Any, **k: Any) -> Any:
            raise NotImplementedError("kornia is not installed (bench stub; only get_dataset's ZCA uses it)")
        _stub_module("kornia", enhance=types.SimpleNamespace(ZCAWhitening=_no_zca))
    with _isolated_imports(root):
        utils = importlib.import_module("utils")
        reparam = importlib.import_module("reparam_module")
    return types.SimpleNamespace(utils=utils, ReparamModule=reparam.ReparamModule)


@dataclass
class MTTInputs:
    """What both MTT workers start from, built identically (and deterministically) in each process.

    Attributes:
        prepared: a small random pool (2·IPC images per class) that our method is built on.
        zca: the transform of the stand-in trajectories (see :func:`bench_zca`).
        images: (C·IPC, 3, 32, 32) the synthetic images, ZCA space, class-major, on the device:
            the first IPC pool images of every class (MTT's ``pix_init real``). Both sides start here.
        trajectories: per teacher, float32 (epochs+1, P) flat ConvNet-3 parameters on the CPU.
    """

    prepared: Prepared
    zca: ZCA
    images: torch.Tensor
    trajectories: list[torch.Tensor]

    @property
    def epochs(self) -> int:
        return len(self.trajectories[0]) - 1


def bench_zca(pool_u8: torch.Tensor, eps: float, digest: str) -> ZCA:
    """A ZCA transform of the pool with the identity as eigenbasis and the per-pixel variances as
    eigenvalues (a diagonal ZCA), instead of an eigendecomposition of the full 3072 x 3072
    covariance (``fit_zca``: about a minute on 2 CPU cores, per worker). Neither MTT step reads the
    transform; only the values of the images depend on it, and the step's cost does not."""
    x = pool_u8.reshape(len(pool_u8), -1).double().div_(255.0)
    mean, var = x.mean(0), x.var(0)
    return ZCA(mean.float(), torch.eye(x.shape[1]), var, float(eps), len(pool_u8), digest)


def mtt_inputs(sizes: MTTSizes, device: torch.device, seed: int = 0) -> MTTInputs:
    """Random pool, stand-in ZCA, synthetic images and teacher trajectories (see :class:`MTTInputs`).

    The trajectories are those of a real ConvNet-3 in shape only: teacher i is a freshly initialised
    ``convnet3`` (seed ``seed + i``) whose flat parameters drift by a fixed random direction
    (N(0, 2e-3²) per element) each epoch, for ``max_start_epoch + expert_epochs`` epochs. The MTT
    step's cost does not depend on the values.
    """
    g = torch.Generator().manual_seed(seed)
    per_class = 2 * sizes.ipc
    n = NUM_CLASSES * per_class
    train_x = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    train_y = torch.arange(NUM_CLASSES).repeat(per_class)
    test_x = torch.randint(0, 256, (NUM_CLASSES, *SHAPE), generator=g, dtype=torch.uint8)
    test_y = torch.arange(NUM_CLASSES)
    prepared = Prepared("bench-mtt-pool", [f"c{i}" for i in range(NUM_CLASSES)], train_x, train_y, test_x, test_y,
                        CIFAR_MEAN, CIFAR_STD, "bench-mtt-pool-digest")
    zca = bench_zca(train_x, 0.1, prepared.digest)
    first = torch.cat([torch.nonzero(train_y == c).flatten()[:sizes.ipc] for c in range(NUM_CLASSES)])
    images = zca.apply_u8(train_x[first]).to(device)
    epochs = MTT_ARGS["max_start_epoch"] + MTT_ARGS["expert_epochs"]
    trajectories = []
    for i in range(MTT_TEACHERS):
        theta0 = flat_params(init_teacher("convnet3", NUM_CLASSES, SHAPE, seed + i))
        drift = torch.randn(theta0.shape, generator=g) * 2e-3
        trajectories.append(theta0 + torch.arange(epochs + 1, dtype=torch.float32)[:, None] * drift)
    return MTTInputs(prepared, zca, images, trajectories)


@dataclass
class BenchTrajectories:
    """In-memory stand-in for :class:`moedd.trajectories.Trajectories` (what the MTT expert reads:
    ``meta``, ``zca``, ``count``, ``load``), holding :attr:`MTTInputs.trajectories`."""

    meta: dict[str, Any]
    zca: ZCA | None
    trajectories: list[torch.Tensor]

    def count(self, shard: int) -> int:
        return len(self.trajectories)

    def load(self, shard: int, index: int) -> torch.Tensor:
        return self.trajectories[index]


class RefMTT:
    """One iteration of the ``for it in range(0, args.Iteration+1)`` loop of mtt-distillation's ``distill.py``.

    Set-up (untimed) as ``main()`` does it, from :class:`MTTInputs`: ``image_syn`` = the same
    ZCA-space images as ours, ``label_syn`` class-major, ``syn_lr`` = lr_teacher, SGD(lr_img,
    momentum 0.5) on the images and SGD(lr_lr, momentum 0.5) on ``syn_lr``, ``CrossEntropyLoss``,
    and the replay buffer as ``buffer.py`` writes it (a list of trajectories, each a list of
    ``epochs + 1`` lists of per-parameter tensors; here views of the same flat trajectories ours
    reads) and ``--load_all`` (all of it in memory, a random trajectory per iteration).
    :meth:`step` is the loop body, in order: ``get_network(..., dist=False)`` +
    ``ReparamModule`` (a fresh student), ``num_params``, the trajectory and start epoch
    (``np.random.randint``), flat start and target parameters on the device, ``syn_steps``
    student steps (``torch.randperm`` index chunks of ``batch_syn``, ``DiffAugment`` per sample,
    the reparametrised forward, CE, ``torch.autograd.grad(create_graph=True)``, the SGD update of
    the flat parameters), the normalised parameter distance (``mse_loss(reduction='sum')`` / num_params,
    twice), ``zero_grad`` x 2, ``backward``, the two SGD steps, and ``grand_loss.item()`` (the
    loop prints it every 10 iterations; here every iteration, as our side reads its loss).
    Left out: the evaluation/saving block (every ``eval_it`` = 100 iterations) and the ``wandb.log``
    calls; their host copies (``grand_loss.detach().cpu()``, ``syn_lr.detach().cpu()``) are kept.
    """

    def __init__(self, R: types.SimpleNamespace, inputs: MTTInputs, device: torch.device, sizes: MTTSizes) -> None:
        U = R.utils
        a = argparse.Namespace(**MTT_ARGS, ipc=sizes.ipc, syn_steps=sizes.syn_steps, device=str(device))
        a.dsa = a.dsa == "True"
        a.dsa_param = U.ParamDiffAug()
        a.batch_syn = NUM_CLASSES * a.ipc  # args.batch_syn is None -> num_classes * ipc
        a.distributed = False  # torch.cuda.device_count() > 1: the bench uses one device
        self.R, self.args = R, a
        self.channel, self.im_size, self.num_classes = SHAPE[0], SHAPE[1:], NUM_CLASSES
        shapes = [p.shape for p in U.get_network(a.model, self.channel, NUM_CLASSES, self.im_size, dist=False).parameters()]
        numels = [math.prod(s) for s in shapes]
        if sum(numels) != inputs.trajectories[0].shape[1]:
            raise SystemExit("--reference-mtt: its ConvNet has a different parameter count than ours (convnet3)")
        self.buffer = [[[t.view(s) for t, s in zip(snap.split(numels), shapes)] for snap in traj]
                       for traj in inputs.trajectories]
        self.label_syn = torch.tensor(np.array([np.ones(a.ipc, dtype=np.int_) * i for i in range(NUM_CLASSES)]),
                                      dtype=torch.long, requires_grad=False, device=a.device).view(-1)
        self.image_syn = inputs.images.detach().clone().to(a.device).requires_grad_(True)
        self.syn_lr = torch.tensor(a.lr_teacher).to(a.device).detach().requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=a.lr_img, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=a.lr_lr, momentum=0.5)
        self.optimizer_img.zero_grad()
        self.criterion = torch.nn.CrossEntropyLoss().to(a.device)

    def step(self) -> float:
        R, U, args, buffer = self.R, self.R.utils, self.args, self.buffer
        channel, num_classes, im_size = self.channel, self.num_classes, self.im_size
        image_syn, label_syn, syn_lr, criterion = self.image_syn, self.label_syn, self.syn_lr, self.criterion
        _ = syn_lr.detach().cpu()  # wandb.log({"Synthetic_LR": syn_lr.detach().cpu()}, step=it)
        student_net = U.get_network(args.model, channel, num_classes, im_size, dist=False).to(args.device)  # get a random model
        student_net = R.ReparamModule(student_net)
        student_net.train()
        num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])
        expert_trajectory = buffer[np.random.randint(0, len(buffer))]  # args.load_all
        start_epoch = np.random.randint(0, args.max_start_epoch)
        starting_params = expert_trajectory[start_epoch]
        target_params = expert_trajectory[start_epoch + args.expert_epochs]
        target_params = torch.cat([p.data.to(args.device).reshape(-1) for p in target_params], 0)
        student_params = [torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0).requires_grad_(True)]
        starting_params = torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0)
        syn_images = image_syn
        y_hat = label_syn.to(args.device)
        param_loss_list = []
        param_dist_list = []
        indices_chunks: list[torch.Tensor] = []
        for _step in range(args.syn_steps):
            if not indices_chunks:
                indices = torch.randperm(len(syn_images))
                indices_chunks = list(torch.split(indices, args.batch_syn))
            these_indices = indices_chunks.pop()
            x = syn_images[these_indices]
            this_y = y_hat[these_indices]
            if args.dsa and (not args.no_aug):
                x = U.DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
            forward_params = student_params[-1]  # not args.distributed
            x = student_net(x, flat_param=forward_params)
            ce_loss = criterion(x, this_y)
            grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - syn_lr * grad)
        param_loss = torch.tensor(0.0).to(args.device)
        param_dist = torch.tensor(0.0).to(args.device)
        param_loss += torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
        param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
        param_loss_list.append(param_loss)
        param_dist_list.append(param_dist)
        param_loss /= num_params
        param_dist /= num_params
        param_loss /= param_dist
        grand_loss = param_loss
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        _ = {"Grand_Loss": grand_loss.detach().cpu(), "Start_Epoch": start_epoch}  # wandb.log(...)
        for _ in student_params:
            del _
        return grand_loss.item()


class RefTeacher:
    """One teacher epoch of mtt-distillation's ``buffer.py``.

    Set-up (untimed) as ``main()`` does it: ``TensorDataset`` of all training images on the CPU
    (``images_all.to("cpu")``) + ``DataLoader(batch_train 256, shuffle)``, ``CrossEntropyLoss``,
    ``args`` with its defaults (``lr_teacher`` 0.01, ``mom`` 0, ``l2`` 0, DSA
    ``color_crop_cutout_flip_scale_rotate``, ``ParamDiffAug``). :meth:`epoch` is one teacher
    reduced to one epoch: ``get_network`` + SGD (the set-up of a teacher, ``timestamps`` of its
    initial parameters), then one pass of the ``for e in range(args.train_epochs)`` loop:
    ``utils.epoch('train', ..., aug=True)`` and the ``timestamps`` append. The per-epoch test pass
    (``epoch('test')`` over the 10,000 test images) is left out: ours tests once per teacher.
    """

    def __init__(self, R: types.SimpleNamespace, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        U = R.utils
        self.U = U
        self.args = argparse.Namespace(
            dataset="CIFAR10", model="ConvNet", device=str(device), dsa=True, dsa_strategy=DSA_STRATEGY,
            dsa_param=U.ParamDiffAug(), lr_teacher=0.01, mom=0.0, l2=0.0, batch_train=256, decay=False,
        )
        self.criterion = torch.nn.CrossEntropyLoss().to(device)
        dst_train = U.TensorDataset(images.detach().cpu(), labels.detach().cpu())
        self.trainloader = torch.utils.data.DataLoader(dst_train, batch_size=self.args.batch_train, shuffle=True,
                                                       num_workers=0)

    def epoch(self) -> float:
        U, args = self.U, self.args
        teacher_net = U.get_network(args.model, SHAPE[0], NUM_CLASSES, SHAPE[1:]).to(args.device)  # get a random model
        teacher_net.train()
        lr = args.lr_teacher
        teacher_optim = torch.optim.SGD(teacher_net.parameters(), lr=lr, momentum=args.mom, weight_decay=args.l2)
        teacher_optim.zero_grad()
        timestamps = [[p.detach().cpu() for p in teacher_net.parameters()]]
        train_loss, train_acc = U.epoch("train", dataloader=self.trainloader, net=teacher_net, optimizer=teacher_optim,
                                        criterion=self.criterion, args=args, aug=True)
        timestamps.append([p.detach().cpu() for p in teacher_net.parameters()])
        return float(train_loss)


# ---------------------------------------------------------------------------------------- ours


def our_params(budget: int, bf16: bool, epochs: int = 1):
    return load_params(None, {
        "experts.dm.batch_real": 256, "experts.dm.bf16": bf16, "distill.budget": budget,
        "evaluate.epochs": epochs,
    })


def our_method(name: str, params: Any, data: Data, device: torch.device, noe: int):
    """Build our expert method ``name`` exactly as ``moedd.distill.optimise`` does; returns (method, syn)."""
    prep = data.prepared
    part = make_partition(prep.train_labels, prep.num_classes, noe, seed=0, data_digest=prep.digest)
    method = build_method(name, params, prep, part, device)
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    return method, syn


def our_dm(data: Data, device: torch.device, noe: int, bf16: bool):
    """Our DM method at the bench settings; returns (method, syn)."""
    return our_method("dm", our_params(10, bf16), data, device, noe)


def _no_preset(method: str) -> dict[str, str]:
    """``experts.<method>.preset: none`` where the config has presets: the bench writes every knob itself."""
    cfg = load_params(None).experts.for_method(method)
    return {f"experts.{method}.preset": "none"} if "preset" in type(cfg).model_fields else {}


def idm_params(sizes: IDMSizes):
    """Our IDM settings = the reference run's (``IDM_ARGS``); every knob written out, so neither the
    config defaults nor a dataset preset (``experts.idm.preset``) can make the two sides differ."""
    a = IDM_ARGS
    return load_params(None, {"distill.budget": a["ipc"], **_no_preset("idm"), **{f"experts.idm.{k}": v for k, v in {
        "lr_img": a["lr_img"], "momentum": 0.5, "batch_real": sizes.batch_real, "ce_weight": a["ce_weight"],
        "net_num": a["net_num"], "net_generate_interval": a["net_generate_interval"],
        "train_net_num": a["train_net_num"], "fetch_net_num": a["fetch_net_num"],
        "model_train_steps": sizes.model_train_steps, "trained_bs": sizes.trained_bs, "net_lr": a["lr_net"],
        "net_momentum": 0.9, "net_weight_decay": 0.0005, "factor": 2, "dsa_strategy": a["dsa_strategy"],
    }.items()}})


def idc_params(sizes: IDCSizes, args: argparse.Namespace | None, cuda_graph: bool = False):
    """Our IDC settings = the reference's ``args`` for ``IDC_ARGV`` (the literal values when the
    reference is not given); every knob written out, as in :func:`idm_params`."""
    ref = {"batch_syn_max": 128, "lr_img": 5e-3, "mom_img": 0.5, "lr": 0.01, "momentum": 0.9,
           "weight_decay": 5e-4, "mix_p": 0.5, "beta": 1.0, "factor": 2, "aug_type": "color_crop_cutout",
           "metric": "mse", "ipc": 10}
    if args is not None:
        ref = {k: getattr(args, k) for k in ref}
    net_aug = "_".join(a for a in ref["aug_type"].split("_") if a != "cutout")  # diffaug(): mixup_net 'cut'
    return load_params(None, {"distill.budget": ref["ipc"], **_no_preset("idc"), **{f"experts.idc.{k}": v for k, v in {
        "batch_real": sizes.batch_real, "batch_syn_max": ref["batch_syn_max"], "lr_img": ref["lr_img"],
        "momentum": ref["mom_img"], "n_data": sizes.n_data, "net_lr": ref["lr"], "net_momentum": ref["momentum"],
        "net_weight_decay": ref["weight_decay"], "mix_p": ref["mix_p"], "mix_beta": ref["beta"],
        "factor": ref["factor"], "match_dsa_strategy": ref["aug_type"], "net_dsa_strategy": net_aug,
        "metric": ref["metric"], "cuda_graph": cuda_graph,
    }.items()}})


def mtt_params(sizes: MTTSizes, cuda_graph: bool = False):
    """Our MTT settings = the reference run's (``MTT_ARGS``), every knob written out (``preset: none``).

    ``grid`` lists NoE 1 only (its budget check would refuse IPC 1 at the default NoE 2 of a
    reduced harness check). ``max_memory_gb`` is raised so that our pre-run memory estimate (a guard against runs that
    cannot fit) never refuses the benchmark: peak memory is what the MTT rows measure.
    """
    a = MTT_ARGS
    return load_params(None, {"distill.budget": sizes.ipc, "distill.net": "convnet3", "grid.noe": [1],
                              "grid.mtt_noe": [1], **_no_preset("mtt"),
                              **{f"experts.mtt.{k}": v for k, v in {
        "syn_steps": sizes.syn_steps, "expert_epochs": a["expert_epochs"], "max_start_epoch": a["max_start_epoch"],
        "lr_img": a["lr_img"], "lr_lr": a["lr_lr"], "lr_teacher": a["lr_teacher"], "momentum": 0.5,
        "zca": a["zca"], "dsa_strategy": a["dsa_strategy"], "max_memory_gb": 1.0e6, "cuda_graph": cuda_graph,
    }.items()}})


def our_mtt(inputs: MTTInputs, device: torch.device, sizes: MTTSizes, cuda_graph: bool = False):
    """Our MTT method (NoE 1) on :class:`MTTInputs`; returns (method, syn).

    Built as ``moedd.distill.optimise`` builds it (``build_method`` with the trajectories, then
    ``setup``), except that ``syn`` is the shared :attr:`MTTInputs.images` instead of
    ``init_images()`` (which draws other real images), so both sides start from the same images.
    """
    prep = inputs.prepared
    traj = BenchTrajectories({
        "noe": 1, "num_teachers": len(inputs.trajectories), "epochs": inputs.epochs, "space": "zca",
        "net": "convnet3", "param_count": int(inputs.trajectories[0].shape[1]),
    }, inputs.zca, inputs.trajectories)
    part = make_partition(prep.train_labels, prep.num_classes, 1, seed=0, data_digest=prep.digest)
    method = build_method("mtt", mtt_params(sizes, cuda_graph), prep, part, device, trajectories=traj)
    syn = inputs.images.unsqueeze(0).detach().clone().requires_grad_(True)
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


def _alternate(row: Row, ours: Callable[[], Any], ref: Callable[[], Any] | None, reps: int,
               device: torch.device, warm_ours: Callable[[], Any] | None = None,
               warm_ref: Callable[[], Any] | None = None) -> None:
    """Warm-up once each (``warm_*`` when given, else the timed call itself), then ``reps`` timed
    calls, ours and the reference alternating (seconds)."""
    (warm_ours or ours)()
    if ref is not None:
        (warm_ref or ref)()
    for r in range(reps):
        row.ours_samples.append(_timed(ours, device))
        if ref is not None:
            row.ref_samples.append(_timed(ref, device))
        log(f"  rep {r + 1}/{reps}: ours {row.ours_samples[-1]:.3f}s"
            + (f", reference {row.ref_samples[-1]:.3f}s" if ref is not None else ""))
    row.ours = _median(row.ours_samples)
    if row.ref_samples:
        row.ref = _median(row.ref_samples)


def bench_idm(data: Data, device: torch.device, D: types.ModuleType | None, reps: int, sizes: IDMSizes,
              goal: float) -> list[Row]:
    """IDM: seconds per iteration, ``method.step(syn, it)`` (NoE 1, IPC 10) vs :class:`RefIDM` ``.step(it)``.

    Both sides start with the same queue (3 networks, plus the one both push at iteration 0, the
    untimed warm-up) and then run iterations 1, 2, ..., so they push networks at the same
    iterations (every 30th: none unless ``reps`` >= 30).
    """
    log("IDM iteration: building")
    method, syn = our_method("idm", idm_params(sizes), data, device, 1)
    ref = RefIDM(D, data, device, sizes) if D is not None else None
    its = {"ours": 0, "ref": 0}

    def ours_step() -> None:
        out = method.step(syn, its["ours"])
        float(out["loss"])
        its["ours"] += 1

    def ref_step() -> None:
        assert ref is not None
        ref.step(its["ref"])
        its["ref"] += 1

    row = Row("idm", "IDM iteration, IPC 10 (s)", "s", goal=goal if sizes.standard else None)
    if not sizes.standard:
        row.note = f"reduced size ({sizes.describe()}): a harness check, not the standard setting"
    _alternate(row, ours_step, ref_step if ref is not None else None, reps, device)
    return [row]


def idc_sides(data: Data, device: torch.device, R: types.SimpleNamespace | None,
              sizes: IDCSizes) -> tuple[Callable[[], None], Callable[[], float] | None]:
    """One IDC inner step of ours and of the reference (None without ``R``), ready to call.

    Ours: ``method.match_phase(net, syn, gen)`` + ``method.train_net(net, opt, gen, rng)``, with the
    network, its optimiser and the generators set up as ``IDC.step`` sets them up for outer
    iteration 0 (and the images clamped, as there); reference: :meth:`RefIDC.inner_step`. Outer
    set-up is untimed on both sides; successive inner steps reuse (and train) the same network,
    as in both loops.
    """
    params = idc_params(sizes, R.args if R is not None else None)
    method, syn = our_method("idc", params, data, device, 1)
    cfg, ctx = method.cfg, method.ctx
    with torch.no_grad():
        syn.clamp_(0.0, 1.0)
    net = method.fresh_net(0)
    net_opt = torch.optim.SGD(net.parameters(), lr=cfg.net_lr, momentum=cfg.net_momentum,
                              weight_decay=cfg.net_weight_decay)
    gen_match, gen_net = ctx.generator(0, STREAM_MATCH), ctx.generator(0, STREAM_NET)
    rng = np.random.default_rng(ctx.seed_for(0, STREAM_MIX))
    ref = None
    if R is not None:
        pixels = data.prepared.train_images.to(device).float().div_(255.0)
        ref = RefIDC(R, pixels, data.prepared.train_labels, device, sizes)

    def ours_inner() -> None:
        method.match_phase(net, syn, gen_match)
        method.train_net(net, net_opt, gen_net, rng)

    return ours_inner, (ref.inner_step if ref is not None else None)


def bench_idc(data: Data, device: torch.device, R: types.SimpleNamespace | None, reps: int, sizes: IDCSizes,
              goal: float) -> list[Row]:
    """IDC: seconds per INNER step (matching over the 10 classes + network update on n_data real
    images), the two sides of :func:`idc_sides` alternating."""
    log("IDC inner step: building")
    ours_inner, ref_inner = idc_sides(data, device, R, sizes)
    row = Row("idc", "IDC inner step, IPC 10 (s)", "s", goal=goal if sizes.standard else None)
    if not sizes.standard:
        row.note = f"reduced size ({sizes.describe()}): a harness check, not the standard setting"
    _alternate(row, ours_inner, ref_inner, reps, device)
    rows = [row]
    if device.type == "cuda":  # experts.idc.cuda_graph: the inner step replayed as one CUDA graph
        g_row = Row("idc", "IDC inner step, CUDA graph, IPC 10 (s)", "s", goal=row.goal,
                    note="; ".join(x for x in (row.note, "experts.idc.cuda_graph: true; CutMix drawn on the device") if x))
        try:
            _alternate(g_row, idc_graph_side(data, device, R, sizes), ref_inner, reps, device)
        except (RuntimeError, AttributeError) as err:  # capture refused: say so, keep the other rows
            g_row.note = f"capture failed: {str(err).splitlines()[0][:200]}"
        rows.append(g_row)
    return rows


def idc_graph_side(data: Data, device: torch.device, R: types.SimpleNamespace | None,
                   sizes: IDCSizes) -> Callable[[], None]:
    """Our IDC inner step replayed as a CUDA graph (``experts.idc.cuda_graph``), set up for
    outer iteration 0 as :func:`idc_sides` sets up the eager one; the first call captures."""
    params = idc_params(sizes, R.args if R is not None else None, cuda_graph=True)
    method, syn = our_method("idc", params, data, device, 1)
    with torch.no_grad():
        syn.clamp_(0.0, 1.0)
    static = StaticInnerSteps(method, syn, capture=True)
    static.begin(0)
    return static.step


def mtt_side(side: str, inputs: MTTInputs, device: torch.device, sizes: MTTSizes,
             reference: str | None) -> Callable[[], float]:
    """One MTT iteration of ``side`` ("ours": ``method.step``, NoE 1; "graph": the same with
    ``experts.mtt.cuda_graph``; "ref": :meth:`RefMTT.step`), ready to call (returns the
    iteration's loss); successive calls are successive iterations. A "graph" side whose capture
    failed (it then runs eagerly) raises at its first call, so its row is never an eager time."""
    if side in ("ours", "graph"):
        method, syn = our_mtt(inputs, device, sizes, cuda_graph=side == "graph")
        its = [0]

        def step() -> float:
            out_ = method.step(syn, its[0])
            its[0] += 1
            if side == "graph" and float(out_["cuda_graph"]) != 1.0:
                raise SystemExit("MTT graph side: the CUDA graph was not captured (see the warning above)")
            return float(out_["loss"])

        return step
    if reference is None:
        raise SystemExit("--_mtt-worker ref needs --reference-mtt PATH")
    return RefMTT(import_reference_mtt(reference), inputs, device, sizes).step


def mtt_worker(side: str, device: torch.device, sizes: MTTSizes, reps: int, reference: str | None, out: str) -> int:
    """Time one side of the MTT rows in THIS process (started by :func:`bench_mtt`) and write a JSON result.

    Each side runs in its own process because peak memory is per process (``VmHWM``) or per
    CUDA context (``max_memory_allocated``). Both sides build the same :class:`MTTInputs` first,
    so their baselines match. Protocol: 1 untimed iteration, then ``reps`` timed ones.
    """
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's affine_grid/meshgrid warnings
    step = mtt_side(side, mtt_inputs(sizes, device), device, sizes, reference)
    before = _worker_peak_gb(device)
    name = {"ours": "ours", "ref": "reference", "graph": "ours, CUDA graph"}[side]
    log(f"  MTT {name} (own process {os.getpid()}): warm-up")
    loss = step()
    samples = []
    for r in range(reps):
        samples.append(_timed(step, device))
        log(f"  MTT {name} rep {r + 1}/{reps}: {samples[-1]:.3f}s")
    result = {"side": side, "samples": samples, "peak_gb": _worker_peak_gb(device), "before_gb": before,
              "first_loss": loss, "pid": os.getpid()}
    Path(out).write_text(json.dumps(result))
    return 0


def _worker_peak_gb(device: torch.device) -> float:
    """This worker's own peak memory: on Linux CPUs ``VmHWM`` (the peak resident set of the current
    address space, which starts afresh at exec), else :func:`peak_memory_gb`. ``ru_maxrss`` is
    not used there: Linux carries it across fork+exec, so a worker started by a parent holding
    4 GiB (the IDM/IDC rows' data) would report at least 4 GiB."""
    if device.type == "cpu":
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
        except OSError:
            pass
    return peak_memory_gb(device)


def _run_mtt_worker(side: str, device: torch.device, sizes: MTTSizes, reps: int,
                    reference: str | None) -> tuple[dict[str, Any] | None, str]:
    """Run :func:`mtt_worker` in a fresh interpreter (``bench.py --_mtt-worker SIDE``); (result or None, error)."""
    with tempfile.TemporaryDirectory(prefix="moedd-bench-mtt-") as tmp:
        out = Path(tmp) / f"{side}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_mtt-worker", side, "--device", device.type,
               "--mtt-ipc", str(sizes.ipc), "--mtt-syn-steps", str(sizes.syn_steps), "--mtt-reps", str(reps),
               "--_mtt-out", str(out)]
        if reference is not None:
            cmd += ["--reference-mtt", reference]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
        if proc.returncode != 0 or not out.exists():
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
            return None, f"{'ours' if side == 'ours' else 'reference'} worker failed: {why}"
        return json.loads(out.read_text()), ""


def bench_mtt(device: torch.device, reference: str | None, reps: int, sizes: MTTSizes, goal: float,
              mem_goal: float, rounds: int = 2) -> list[Row]:
    """MTT: seconds per iteration and peak memory, ``method.step(syn, it)`` (NoE 1) vs :class:`RefMTT` ``.step()``.

    Each side runs in its own worker process (:func:`mtt_worker`), so repetitions cannot alternate
    within a process. Instead the workers alternate in ``rounds`` rounds, ABBA order (ours, ref;
    ref, ours; …), each with ``ceil(reps / rounds)`` timed iterations; the row is the median over
    all of a side's iterations, so a drift of the machine's speed hits both sides alike (on the
    2-core VM a side's speed moved by 20 % between minutes). The memory row is the peak resident
    set of the whole worker (``VmHWM``: interpreter, torch, set-up and the unrolled graph) on
    the CPU, ``torch.cuda.max_memory_allocated`` on CUDA, the highest over a side's workers;
    lower is better, its "speedup" is reference / ours.
    """
    reduced = "" if sizes.standard else f"reduced size ({sizes.describe()}): a harness check, not the standard setting"
    t_row = Row("mtt", f"MTT iteration, CIFAR-10 IPC {sizes.ipc} (s)", "s", goal=goal if sizes.standard else None)
    m_row = Row("mtt", "MTT peak memory (GiB)", "GiB", goal=mem_goal if sizes.standard else None)
    notes, base = [reduced] if reduced else [], []
    rounds = max(1, rounds)
    per_round = max(1, -(-reps // rounds))
    sides = [s for s in ("ours", "ref") if s == "ours" or reference is not None]
    if device.type == "cuda":  # experts.mtt.cuda_graph: a third worker, its own rows
        sides.append("graph")
    got: dict[str, tuple[list[float], float]] = {}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            name = {"ours": "ours", "ref": "reference", "graph": "ours, CUDA graph"}[side]
            log(f"MTT iteration, {name} (round {r + 1}/{rounds}): starting a worker process")
            res, err = _run_mtt_worker(side, device, sizes, per_round, reference)
            if res is None:
                notes.append(err)
                continue
            if r == 0:
                base.append(f"{name} {res['before_gb']:.2f} GiB")
            samples, peak = got.get(side, ([], 0.0))
            got[side] = (samples + res["samples"], max(peak, res["peak_gb"]))
    if "ours" in got:
        t_row.ours_samples, m_row.ours = got["ours"]
        t_row.ours = _median(t_row.ours_samples)
    if "ref" in got:
        t_row.ref_samples, m_row.ref = got["ref"]
        t_row.ref = _median(t_row.ref_samples)
    t_row.note = "; ".join(dict.fromkeys(notes))
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) of the worker process"
    m_row.note = "; ".join([*dict.fromkeys(notes), f"{what}; before the first iteration: {', '.join(base) or '—'}"])
    rows = [t_row, m_row]
    if "graph" in sides:  # same reference samples; ours replayed as one CUDA graph per iteration
        g_row = Row("mtt", f"MTT iteration, CUDA graph, IPC {sizes.ipc} (s)", "s", goal=t_row.goal,
                    ref=t_row.ref, ref_samples=t_row.ref_samples)
        gm_row = Row("mtt", "MTT peak memory, CUDA graph (GiB)", "GiB", goal=m_row.goal, ref=m_row.ref)
        if "graph" in got:
            g_row.ours_samples, gm_row.ours = got["graph"]
            g_row.ours = _median(g_row.ours_samples)
        else:
            g_row.note = gm_row.note = "the graph worker failed (capture refused?): see the log"
        g_row.note = "; ".join(x for x in (g_row.note, "experts.mtt.cuda_graph: true; DSA groups drawn on the device") if x)
        rows += [g_row, gm_row]
    return rows


def bench_teacher(device: torch.device, R: types.SimpleNamespace | None, n_images: int, reps: int,
                  goal: float) -> list[Row]:
    """Teacher training: seconds per epoch on ``n_images`` random CIFAR-shaped images.

    Ours: ``train_teacher(images, labels, 10, "convnet3", params.trajectories, epochs=1, seed)``
    (a fresh teacher per repetition; defaults = ``buffer.py``'s: SGD lr 0.01, momentum 0, weight
    decay 0, batch 256, per-sample DSA), images already normalised on the device. Reference:
    :meth:`RefTeacher.epoch`. Warm-up: one such call per side on the first 512 images (a full
    warm-up epoch would double the section's time); then ``reps`` timed epochs, alternating.
    """
    log(f"Teacher epoch ({n_images} images): building")
    g = torch.Generator().manual_seed(3)
    x_u8 = torch.randint(0, 256, (n_images, *SHAPE), generator=g, dtype=torch.uint8)
    y = torch.arange(NUM_CLASSES).repeat(math.ceil(n_images / NUM_CLASSES))[:n_images]
    x = normalize_test(x_u8, CIFAR_MEAN, CIFAR_STD, device)
    yd = y.to(device)
    cfg = load_params(None).trajectories
    seed = [0]

    def ours_on(xs: torch.Tensor, ys: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            seed[0] += 1
            return train_teacher(xs, ys, NUM_CLASSES, "convnet3", cfg, epochs=1, seed=seed[0])
        return run

    ref = warm_ref = None
    if R is not None:
        ref = RefTeacher(R, x, y, device)
        warm_ref = RefTeacher(R, x[:512], y[:512], device)
    row = Row("teacher", f"Teacher epoch, {n_images} real img (s)", "s", goal=goal if n_images == 50_000 else None)
    if n_images != 50_000:
        row.note = f"{n_images} images instead of 50,000: a harness check, not the standard setting"
    _alternate(row, ours_on(x, yd), ref.epoch if ref is not None else None, reps, device,
               warm_ours=ours_on(x[:512], yd[:512]), warm_ref=warm_ref.epoch if warm_ref is not None else None)
    return [row]


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
        _sync(device)
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


def profile_idc(data: Data, device: torch.device, R: types.SimpleNamespace | None, sizes: IDCSizes,
                top: int = 15) -> str:
    """Top ops of one warm IDC inner step of ours (and of the reference when given)."""
    ours, ref = idc_sides(data, device, R, sizes)
    ours()
    out = f"ours (moedd IDC inner step, {sizes.describe()}):\n" + profile_step(ours, device, top)
    if ref is not None:
        ref()
        out += "\nreference (condense.py inner-loop body):\n" + profile_step(ref, device, top)
    return out


def profile_mtt(device: torch.device, reference: str | None, sizes: MTTSizes, top: int = 15) -> str:
    """Top ops of one warm MTT iteration of ours (and of the reference when given), one side at a
    time in this process (each side's graph is freed before the next is built)."""
    inputs = mtt_inputs(sizes, device)
    out = ""
    for side in ("ours", "ref"):
        if side == "ref" and reference is None:
            continue
        step = mtt_side(side, inputs, device, sizes, reference)
        step()
        what = "ours (moedd MTT iteration" if side == "ours" else "reference (distill.py loop body"
        out += f"{what}, {sizes.describe()}):\n" + profile_step(step, device, top) + "\n"
        del step
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


def _checkout_commit(path: str) -> str:
    """``@<short commit> `` of a reference checkout when it is a git work tree, else ``""``."""
    import subprocess

    if not (Path(path).expanduser() / ".git").exists():  # e.g. a `git archive` extract
        return ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(path).expanduser(), capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"@{rev} " if rev else ""


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
    if unit == "GiB":
        return f"{v:.2f} GiB"
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
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--reference-dc", metavar="PATH", help="DatasetCondensation checkout to compare against")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, small test pass, no extra DM rows (~1 min on CPU)")
    p.add_argument("--reference-idm", metavar="PATH", help="uitrbn/IDM checkout to compare the IDM row against")
    p.add_argument("--reference-idc", metavar="PATH",
                   help="snu-mllab/Efficient-Dataset-Condensation checkout to compare the IDC row against")
    p.add_argument("--reference-mtt", metavar="PATH",
                   help="GeorgeCazenavette/mtt-distillation checkout to compare the MTT and teacher rows against")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of sections: {', '.join(SECTIONS)} (none: only what --profile asks for)")
    p.add_argument("--nets", default=",".join(NETS), help="evaluation networks (default: all four)")
    p.add_argument("--dm-reps", type=int, help="timed DM iterations per row (default 5; quick 2)")
    p.add_argument("--train-epochs", type=int, help="timed training epochs per net (default 6; quick 2)")
    p.add_argument("--test-images", type=int, help="test images per timed pass, reported per 10k "
                   "(default: 10000 on CUDA, 1000 on CPU; quick 256 on CPU)")
    p.add_argument("--test-reps", type=int, help="timed test passes per net (default 3; quick 1)")
    p.add_argument("--idm-reps", type=int, help="timed IDM iterations per side (default 5; quick 2)")
    p.add_argument("--idc-reps", type=int, help="timed IDC inner steps per side (default 5; quick 2)")
    p.add_argument("--mtt-reps", type=int, help="timed MTT iterations per side (default 6; quick 2)")
    p.add_argument("--mtt-rounds", type=int, help="MTT worker rounds per side, alternating ABBA (default 2; quick 1)")
    p.add_argument("--teacher-images", type=int, default=50_000,
                   help="real images per teacher epoch (50000; fewer: a harness check, the row gets no goal)")
    p.add_argument("--teacher-reps", type=int, help="timed teacher epochs per side (default 3; quick 1)")
    g = p.add_argument_group("reduced IDM/IDC/MTT sizes, for checking the harness (both sides alike; rows get no goal)")
    g.add_argument("--idm-batch-real", type=int, default=IDMSizes.batch_real, help="real images per class (256)")
    g.add_argument("--idm-train-steps", type=int, default=IDMSizes.model_train_steps,
                   help="model_train_steps per trained queue net (10)")
    g.add_argument("--idm-trained-bs", type=int, default=IDMSizes.trained_bs, help="queue-net training batch (256)")
    g.add_argument("--idc-batch-real", type=int, default=IDCSizes.batch_real,
                   help="real images per class for matching and per network-training batch (64)")
    g.add_argument("--idc-n-data", type=int, default=IDCSizes.n_data, help="real samples per network update (2000)")
    g.add_argument("--mtt-ipc", type=int, default=MTTSizes.ipc, help="MTT images per class (10; batch_syn = all)")
    g.add_argument("--mtt-syn-steps", type=int, default=MTTSizes.syn_steps, help="MTT unrolled student steps (30)")
    p.add_argument("--_mtt-worker", choices=MTT_WORKER_SIDES, help=argparse.SUPPRESS)  # internal: one MTT side
    p.add_argument("--_mtt-out", help=argparse.SUPPRESS)  # internal: where that worker writes its JSON
    p.add_argument("--no-noe2", action="store_true", help="skip the NoE=2 DM row")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 DM row")
    p.add_argument("--profile", nargs="?", const="dm", metavar="SECTIONS",
                   help="also profile one warm step of ours and of the reference (torch.profiler: GPU busy share, "
                        f"kernel launches, top ops) for a comma list of {', '.join(PROFILED)} (default dm)")
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
    mtt_sizes = MTTSizes(a.mtt_ipc, a.mtt_syn_steps)
    mtt_reps = a.mtt_reps or (2 if a.quick else 6)
    mtt_rounds = a.mtt_rounds or (1 if a.quick else 2)
    if a._mtt_worker:  # a child of bench_mtt: one side of the MTT rows, in its own process
        return mtt_worker(a._mtt_worker, device, mtt_sizes, mtt_reps, a.reference_mtt, a._mtt_out)
    sections = {s.strip() for s in a.only.split(",") if s.strip() and s.strip() != "none"}
    unknown = sections - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}")
    profiled = {s.strip() for s in (a.profile or "").split(",") if s.strip()}
    if profiled - set(PROFILED):
        raise SystemExit(f"--profile: unknown section(s) {sorted(profiled - set(PROFILED))}; one of {', '.join(PROFILED)}")
    nets = [n.strip() for n in a.nets.split(",") if n.strip()]
    for n in nets:
        if n not in NETS:
            raise SystemExit(f"--nets: {n} is not one of {', '.join(NETS)}")
    dm_reps = a.dm_reps or (2 if a.quick else 5)
    train_epochs = a.train_epochs or (2 if a.quick else 6)
    test_images = min(a.test_images or (NUM_TEST if cuda else (256 if a.quick else 1000)), NUM_TEST)
    test_reps = a.test_reps or (1 if a.quick else 3)
    idm_reps = a.idm_reps or (2 if a.quick else 5)
    idc_reps = a.idc_reps or (2 if a.quick else 5)
    teacher_reps = a.teacher_reps or (1 if a.quick else 3)
    teacher_images = a.teacher_images
    if teacher_images < 1 or mtt_sizes.ipc < 1 or mtt_sizes.syn_steps < 1:
        raise SystemExit("--teacher-images, --mtt-ipc and --mtt-syn-steps must be >= 1")
    idm_sizes = IDMSizes(a.idm_batch_real, a.idm_train_steps, a.idm_trained_bs)
    idc_sizes = IDCSizes(a.idc_batch_real, a.idc_n_data)
    with_bf16 = not a.no_bf16 and not a.quick and bf16_available(device)
    with_noe2 = not a.no_noe2 and not a.quick

    U = import_reference(a.reference_dc) if a.reference_dc else None
    D_idm = import_reference_idm(a.reference_idm) if a.reference_idm and "idm" in sections else None
    R_idc = import_reference_idc(a.reference_idc, device) if a.reference_idc and "idc" in sections | profiled else None
    R_mtt = None
    if a.reference_mtt and sections & {"mtt", "teacher"} | profiled & {"mtt"}:
        R_mtt = import_reference_mtt(a.reference_mtt)  # checks the checkout; the MTT workers import it again
    info = machine_info(device)
    alloc = allocator_info()
    header = (f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
              + (f", GPU {info['gpu']}" if cuda else "")
              + f"; torch {info['torch']}; device {device}; moedd {info['moedd_git']}; {info['date']}"
              + f"; layout {os.environ.get('MOEDD_LAYOUT', 'auto')} (MOEDD_LAYOUT)")
    print(header, flush=True)
    print(f"allocator: {alloc}", flush=True)
    for flag, path, mod, secs in (("--reference-dc", a.reference_dc, U, {"dm", "train", "test"}),
                                  ("--reference-idm", a.reference_idm, D_idm, {"idm"}),
                                  ("--reference-idc", a.reference_idc, R_idc, {"idc"}),
                                  ("--reference-mtt", a.reference_mtt, R_mtt, {"mtt", "teacher"})):
        if not sections & secs:
            continue
        where = "imported in worker processes (mtt) and in this process (teacher)" if flag == "--reference-mtt" \
            else "imported in this process"
        if mod is None:
            print(f"reference {'/'.join(sorted(secs))}: not given ({flag} PATH); only our numbers", flush=True)
        else:
            print(f"reference {'/'.join(sorted(secs))}: {Path(path).resolve()} {_checkout_commit(path)}"
                  f"({where})", flush=True)

    t_start = time.perf_counter()
    data: Data | None = None  # the 50,000 + 10,000 random images: only the sections that read them build them
    if sections & {"dm", "test", "idm", "idc"}:
        data = make_data(device, with_reference=(U is not None and "dm" in sections) or D_idm is not None)
    rows: list[Row] = []
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's affine_grid/meshgrid warnings
    if "dm" in sections:
        rows += bench_dm(data, device, U, dm_reps, with_bf16, with_noe2, goal=2.0 if cuda else 1.2)
    if "train" in sections:
        rows += bench_train(device, U, nets, train_epochs, goal=1.0)
    if "test" in sections:
        rows += bench_test(data, device, U, nets, test_images, test_reps, goal=1.5)
    if "idm" in sections:
        rows += bench_idm(data, device, D_idm, idm_reps, idm_sizes, goal=2.0 if cuda else 1.3)  # issue 3: 1.3x on the CPU, 2x on a GPU
    if "idc" in sections:
        rows += bench_idc(data, device, R_idc, idc_reps, idc_sizes, goal=2.0 if cuda else 1.3)
    if "mtt" in sections:
        rows += bench_mtt(device, a.reference_mtt if R_mtt is not None else None, mtt_reps, mtt_sizes, goal=2.0 if cuda else 1.3,
                          mem_goal=1.0, rounds=mtt_rounds)
    if "teacher" in sections:
        rows += bench_teacher(device, R_mtt, teacher_images, teacher_reps, goal=1.0)
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
    if "idm" in sections:
        notes.append(f"IDM: median of {idm_reps} iterations after 1 warm-up, alternating; NoE 1, IPC 10, factor 2, "
                     f"{idm_sizes.describe()}, fetch_net_num 2, ce_weight 0.5, DSA {DSA_STRATEGY}; ours "
                     "method.step, reference IDM_cifar10.py's loop body (incl. queue-net training).")
    if "idc" in sections:
        notes.append(f"IDC: median of {idc_reps} inner steps after 1 warm-up, alternating; NoE 1, IPC 10, factor 2, "
                     f"{idc_sizes.describe()}, batch_syn_max 128, CutMix p 0.5, metric mse; ours match_phase + "
                     "train_net, reference condense.py's inner-loop body (per-class matchloss + train_epoch).")
    if "mtt" in sections:
        notes.append(f"MTT: median of {mtt_rounds} x {-(-mtt_reps // mtt_rounds)} iterations per side, each side in its own "
                     f"processes (one per round, 1 warm-up each), {mtt_rounds} rounds in ABBA order; NoE 1, {mtt_sizes.describe()}, expert_epochs 2, ZCA space, DSA {DSA_STRATEGY}, "
                     "ConvNet-3 (instance norm); ours method.step, reference distill.py's loop body. Memory row: "
                     "lower is better, speedup = reference / ours.")
    if "teacher" in sections:
        notes.append(f"teacher: median of {teacher_reps} epochs over {teacher_images} images after a 512-image warm-up, "
                     "alternating; ours train_teacher(epochs=1), reference buffer.py's teacher set-up + "
                     "epoch('train') (no per-epoch test pass); SGD 0.01, momentum 0, batch 256, DSA.")
    notes += [f"{r.what}: {r.note}" for r in rows if r.note and r.section in ("idm", "idc", "mtt", "teacher")]
    unsteady = [f"{r.what} ({side} {max(xs) / min(xs):.1f}x)" for r in rows
                for side, xs in (("ours", r.ours_samples), ("ref", r.ref_samples))
                if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 1.5]
    if unsteady:
        notes.append("WARNING: unsteady machine, repetitions of one measurement differ by more than 1.5x (max/min): "
                     + "; ".join(unsteady) + ". Re-run before trusting these rows.")
    notes.append(f"Total {total:.0f} s.")
    print("\n".join(notes))
    profiles: dict[str, str] = {}
    if "dm" in profiled:
        if data is None or (not data.indices_class and U is not None):
            data = make_data(device, with_reference=True)
        profiles["dm"] = profile_dm(data, device, U)
    if "idc" in profiled:
        if data is None:
            data = make_data(device, with_reference=False)
        profiles["idc"] = profile_idc(data, device, R_idc, idc_sizes)
    if "mtt" in profiled:
        profiles["mtt"] = profile_mtt(device, a.reference_mtt if R_mtt is not None else None, mtt_sizes)
    for name, text in profiles.items():
        print(f"\nprofile of one {name.upper()} step:")
        print(text)
    if a.json:
        out = {
            "machine": info, "allocator": alloc, "reference": a.reference_dc, "reference_idm": a.reference_idm,
            "reference_idc": a.reference_idc, "reference_mtt": a.reference_mtt, "argv": sys.argv,
            "settings": {"dm_reps": dm_reps, "train_epochs": train_epochs, "test_images": test_images,
                         "test_reps": test_reps, "quick": a.quick, "sections": sorted(sections),
                         "idm_reps": idm_reps, "idc_reps": idc_reps, "idm_sizes": asdict(idm_sizes),
                         "idc_sizes": asdict(idc_sizes), "mtt_reps": mtt_reps, "mtt_rounds": mtt_rounds, "mtt_sizes": asdict(mtt_sizes),
                         "teacher_images": teacher_images, "teacher_reps": teacher_reps,
                         "layout": os.environ.get("MOEDD_LAYOUT", "auto")},
            "seconds_total": total,
            "profiles": profiles,
            "rows": [{**asdict(r), "speedup": r.speedup, "met": r.met} for r in rows],
        }
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
