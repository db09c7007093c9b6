"""The mtt-distillation rows (GeorgeCazenavette/mtt-distillation, ``--reference-mtt``): seconds
and peak memory per MTT iteration against the loop body of ``distill.py``, and seconds per
teacher epoch against ``buffer.py``'s.

MTT at the CIFAR-10 IPC 10 row of the author-provided table (docs/methods.md §10.3): NoE 1, 100
synthetic images in ZCA space, ``syn_steps`` 30 unrolled student steps of ``batch_syn`` = all
images, ``expert_epochs`` 2, ``max_start_epoch`` 20, per-sample DSA, ConvNet-3 (instance norm),
the learnable learning rate. Each MTT side runs in its own worker process (``bench.py
--_mtt-worker ours|ref|graph``), because peak memory is per process; the teacher row runs in
this process. :class:`MTTSizes` can shrink the work on both sides alike.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedd.data import Prepared, make_partition
from moedd.data.zca import ZCA
from moedd.distill import build_method
from moedd.evaluate import normalize_test
from moedd.experts.mtt import peak_memory_gb
from moedd.params import load_params
from moedd.trajectories import flat_params, init_teacher, train_teacher

from .checkouts import checkout, common_shims, isolated_imports, stub_if_missing
from .harness import (
    CIFAR_MEAN, CIFAR_STD, DSA_STRATEGY, NUM_CLASSES, SHAPE, Row, alternate, log, median, no_preset, profile_step,
    Sizes, timed,
)

BENCH_SCRIPT = Path(__file__).resolve().with_name("bench.py")
"""The script a worker process runs (``bench.py --_mtt-worker SIDE``)."""


@dataclass(frozen=True)
class MTTSizes(Sizes):
    """The MTT knobs that set the amount of work (standard = the CIFAR-10 IPC 10 row, docs/methods.md §10.3)."""

    ipc: int = 10
    syn_steps: int = 30

    def describe(self) -> str:
        return f"IPC {self.ipc} (batch_syn all {NUM_CLASSES * self.ipc}), syn_steps {self.syn_steps}"


# The CIFAR-10 IPC 10 row of the author-provided table (docs/methods.md §10.3; the mtt cifar10 IPC 10 preset):
# distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30 --expert_epochs 2 --max_start_epoch 20 --zca
# --lr_img 100 --lr_lr 1e-5 --lr_teacher 0.001 (batch_syn: all); the rest: distill.py's argparse defaults.
MTT_ARGS = dict(
    model="ConvNet", expert_epochs=2, max_start_epoch=20, lr_img=100.0, lr_lr=1e-5, lr_teacher=0.001,
    dsa="True", dsa_strategy=DSA_STRATEGY, zca=True, no_aug=False, texture=False,
)


MTT_TEACHERS = 2
"""Teachers in the stand-in trajectory buffer (both sides draw one per iteration; timing does not depend on which)."""


MTT_WORKER_SIDES = ("ours", "ref", "graph")  # graph: ours with experts.mtt.cuda_graph (CUDA only)


def import_mtt(path: str) -> types.SimpleNamespace:
    """Import ``utils`` (get_network, DiffAugment, ParamDiffAug, epoch, TensorDataset) and
    ``reparam_module.ReparamModule`` from a GeorgeCazenavette/mtt-distillation checkout.

    ``distill.py`` and ``buffer.py`` are not imported: their loops are the bodies of ``main()``
    (nothing to call); :class:`RefMTT` and :class:`RefTeacher` are those bodies. Shims: the
    ``common_shims``, and ``kornia`` is stubbed when it cannot be imported (``utils`` imports it at
    module level; only ``get_dataset``'s ZCA fitting, ``K.enhance.ZCAWhitening``, uses it, which
    is not on a timed path). ``wandb`` (imported by ``distill.py`` only) is not needed.
    """
    root = checkout(path, "--reference-mtt", ("distill.py", "buffer.py", "utils.py", "reparam_module.py"),
                     "GeorgeCazenavette/mtt-distillation")
    common_shims()

    def no_zca(*a: Any, **k: Any) -> Any:
        raise NotImplementedError("kornia is not installed (bench stub; only get_dataset's ZCA uses it)")

    stub_if_missing("kornia", enhance=types.SimpleNamespace(ZCAWhitening=no_zca))
    with isolated_imports(root):
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


def mtt_params(sizes: MTTSizes, cuda_graph: bool = False):
    """Our MTT settings = the reference run's (``MTT_ARGS``), every knob written out (``preset: none``).

    ``grid`` lists NoE 1 only (its budget check would refuse IPC 1 at the default NoE 2 of a
    reduced harness check). ``max_memory_gb`` is raised so that our pre-run memory estimate (a guard against runs that
    cannot fit) never refuses the benchmark: peak memory is what the MTT rows measure.
    """
    a = MTT_ARGS
    return load_params(None, {"distill.budget": sizes.ipc, "distill.net": "convnet3", "grid.noe": [1],
                              "grid.mtt_noe": [1], **no_preset("mtt"),
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
    return RefMTT(import_mtt(reference), inputs, device, sizes).step


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
        samples.append(timed(step, device))
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
        cmd = [sys.executable, str(BENCH_SCRIPT), "--_mtt-worker", side, "--device", device.type,
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
    reduced = sizes.reduced_note
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
        t_row.ours = median(t_row.ours_samples)
    if "ref" in got:
        t_row.ref_samples, m_row.ref = got["ref"]
        t_row.ref = median(t_row.ref_samples)
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
            g_row.ours = median(g_row.ours_samples)
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
    alternate(row, ours_on(x, yd), ref.epoch if ref is not None else None, reps, device,
               warm_ours=ours_on(x[:512], yd[:512]), warm_ref=warm_ref.epoch if warm_ref is not None else None)
    return [row]


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
