"""The IDC rows (snu-mllab/Efficient-Dataset-Condensation, ``--reference-idc``): seconds per IDC
inner step against the inner-loop body of ``condense.condense``, at the README's
``condense.py --reproduce -d cifar10 -f 2 --ipc 10``.

An inner step: gradient matching (mse) of every class (64 real images, the 40 decoded synthetic
images, DiffAug ``color_crop_cutout``), then the network update on ``n_data`` 2000 real images
(batches of 64, DiffAug ``color_crop``, CutMix with p 0.5). On CUDA a second row replays our
inner step as one CUDA graph (``experts.idc.cuda_graph``). :class:`IDCSizes` can shrink the work
on both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moedd.experts._idc_graph import STREAM_MATCH, STREAM_MIX, STREAM_NET, StaticInnerSteps
from moedd.params import load_params

from .checkouts import checkout, common_shims, isolated_imports, stub_if_missing
from .harness import NUM_CLASSES, SHAPE, Data, Row, alternate, log, no_preset, our_method, profile_step, Sizes


@dataclass(frozen=True)
class IDCSizes(Sizes):
    """The IDC knobs that set the amount of work (standard = ``condense.py --reproduce -d cifar10 -f 2 --ipc 10``)."""

    batch_real: int = 64
    n_data: int = 2000


# IDC's README command for these settings (condense.py reads argument.py's parser at import)
IDC_ARGV = ["condense.py", "--reproduce", "-d", "cifar10", "-f", "2", "--ipc", "10"]


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


def import_idc(path: str, device: torch.device) -> types.SimpleNamespace:
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
    root = checkout(path, "--reference-idc", ("condense.py", "train.py", "data.py", "argument.py"),
                     "snu-mllab/Efficient-Dataset-Condensation")
    common_shims()

    class EfficientNet:  # stand-in
        @classmethod
        def from_name(cls, *a: Any, **k: Any) -> Any:
            raise NotImplementedError("efficientnet_pytorch is not installed (bench stub)")

    stub_if_missing("efficientnet_pytorch", EfficientNet=EfficientNet)
    argv = sys.argv
    with isolated_imports(root), _cuda_literals_on(device), contextlib.redirect_stdout(sys.stderr):
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


def idc_params(sizes: IDCSizes, args: argparse.Namespace | None, cuda_graph: bool = False):
    """Our IDC settings = the reference's ``args`` for ``IDC_ARGV`` (the literal values when the
    reference is not given); every knob written out, as in :func:`idm_params`."""
    ref = {"batch_syn_max": 128, "lr_img": 5e-3, "mom_img": 0.5, "lr": 0.01, "momentum": 0.9,
           "weight_decay": 5e-4, "mix_p": 0.5, "beta": 1.0, "factor": 2, "aug_type": "color_crop_cutout",
           "metric": "mse", "ipc": 10}
    if args is not None:
        ref = {k: getattr(args, k) for k in ref}
    net_aug = "_".join(a for a in ref["aug_type"].split("_") if a != "cutout")  # diffaug(): mixup_net 'cut'
    return load_params(None, {"distill.budget": ref["ipc"], **no_preset("idc"), **{f"experts.idc.{k}": v for k, v in {
        "batch_real": sizes.batch_real, "batch_syn_max": ref["batch_syn_max"], "lr_img": ref["lr_img"],
        "momentum": ref["mom_img"], "n_data": sizes.n_data, "net_lr": ref["lr"], "net_momentum": ref["momentum"],
        "net_weight_decay": ref["weight_decay"], "mix_p": ref["mix_p"], "mix_beta": ref["beta"],
        "factor": ref["factor"], "match_dsa_strategy": ref["aug_type"], "net_dsa_strategy": net_aug,
        "metric": ref["metric"], "cuda_graph": cuda_graph,
    }.items()}})


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
    row = Row("idc", "IDC inner step, IPC 10 (s)", "s", goal=goal if sizes.standard else None,
              note=sizes.reduced_note)
    alternate(row, ours_inner, ref_inner, reps, device)
    rows = [row]
    if device.type == "cuda":  # experts.idc.cuda_graph: the inner step replayed as one CUDA graph
        g_row = Row("idc", "IDC inner step, CUDA graph, IPC 10 (s)", "s", goal=row.goal,
                    note="; ".join(x for x in (row.note, "experts.idc.cuda_graph: true; CutMix drawn on the device") if x))
        try:
            alternate(g_row, idc_graph_side(data, device, R, sizes), ref_inner, reps, device)
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
