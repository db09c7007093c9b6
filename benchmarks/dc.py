"""The DatasetCondensation rows (VICO-UoE/DatasetCondensation, ``--reference-dc``): DM
iterations/s against ``main_DM.py``'s inner loop, evaluation epochs/s and the 10,000-image test
pass per network against ``utils.epoch`` as ``utils.evaluate_synset`` calls it.

Standard sizes: CIFAR shapes, 10 classes x 5000 training images, ``batch_real`` 256, IPC 10,
DSA ``color_crop_cutout_flip_scale_rotate``; evaluation on 100 synthetic images, batch 256.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import types
import warnings
from typing import Any

import numpy as np
import torch

from moedd.device import memory_format_for
from moedd.evaluate import TrainingSet, test_accuracy, train_network
from moedd.nets import create_net
from moedd.params import load_params

from .checkouts import checkout, common_shims
from .harness import (
    DSA_STRATEGY, NETS, NUM_CLASSES, NUM_TEST, SHAPE, Data, Row, log, median, our_method, our_params, profile_step,
    sync, timed,
)


def import_dc(path: str) -> types.ModuleType:
    """Import the reference ``utils`` module from a DatasetCondensation checkout (see ``common_shims``)."""
    root = checkout(path, "--reference-dc", ("utils.py", "networks.py"), "DatasetCondensation")
    common_shims()
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


def our_dm(data: Data, device: torch.device, noe: int, bf16: bool):
    """Our DM method at the bench settings; returns (method, syn)."""
    return our_method("dm", our_params(10, bf16), data, device, noe)


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
            row.ours_samples.append(timed(ours_step, device))
            if with_ref:
                row.ref_samples.append(timed(ref_dm.step, device))
            log(f"  rep {r + 1}/{reps}: ours {row.ours_samples[-1]:.3f}s"
                + (f", reference {row.ref_samples[-1]:.3f}s" if with_ref else ""))
        row.ours = 1.0 / median(row.ours_samples)
        if with_ref:
            row.ref = 1.0 / median(row.ref_samples)
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
                sync(device)
                stamps.append(time.perf_counter())

            sync(device)
            t0 = time.perf_counter()
            train_network(name, data, params.evaluate, params.fusion, seed=0, num_classes=NUM_CLASSES,
                          on_epoch=on_epoch)
            row.ours_samples += np.diff([t0, *stamps]).tolist()[1:]
            if U is not None:
                trainer = RefTrainer(U, NETS[name], images, labels, device)
                for e in range(n_ep + 1):
                    dt = timed(trainer.epoch, device)
                    if e:
                        row.ref_samples.append(dt)
        row.ours = 1.0 / median(row.ours_samples)
        if row.ref_samples:
            row.ref = 1.0 / median(row.ref_samples)
        log(f"  ours {row.ours:.3f} epochs/s" + (f", reference {row.ref:.3f} epochs/s" if row.ref else ""))
        rows.append(row)
    return rows


def test_batch_size() -> int:
    """Our test pass's batch (``evaluate.test_batch_size``, its default)."""
    return load_params(None).evaluate.test_batch_size


def bench_test(data: Data, device: torch.device, U: types.ModuleType | None, nets: list[str], n_images: int,
               reps: int, goal: float, bf16: bool = False) -> list[Row]:
    """Test pass: ``test_accuracy`` (batch = evaluate.test_batch_size) vs reference ``epoch('test')`` (batch 256).

    Measured on the first ``n_images`` test images and reported as seconds per 10,000 images
    (time is linear in the number of images). Warm-up: one pass over 256 images per side. With
    ``bf16``, a second row per network: ours under bf16 autocast (``evaluate.test_precision:
    bf16``) against the same fp32 reference passes, timed in the same alternation.
    """
    rows = []
    batch = test_batch_size()
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
        half = Row("test", f"{label}, {name}, bf16 autocast", "s", goal=goal) if bf16 else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = create_net(name, NUM_CLASSES)
        net = net.to(device, memory_format=memory_format_for(net, device))  # the layout evaluate_synthetic trains in
        test_accuracy(net, x[:256], y[:256], batch_size=batch)  # warm-up
        if half is not None:
            test_accuracy(net, x[:256], y[:256], batch_size=batch, dtype=torch.bfloat16)
        ref_net = None
        if U is not None:
            ref_net = U.get_network(NETS[name], SHAPE[0], NUM_CLASSES, SHAPE[1:]).to(device)
            ref_test_pass(U, ref_net, warm_loader, device)
        for _ in range(reps):
            row.ours_samples.append(timed(lambda: test_accuracy(net, x, y, batch_size=batch), device) * scale)
            if half is not None:
                half.ours_samples.append(timed(lambda: test_accuracy(net, x, y, batch_size=batch, dtype=torch.bfloat16),
                                               device) * scale)
            if ref_net is not None:
                row.ref_samples.append(timed(lambda: ref_test_pass(U, ref_net, loader, device), device) * scale)
        for r in (row, half):
            if r is None:
                continue
            r.ours = median(r.ours_samples)
            if ref_net is not None:
                r.ref_samples = list(row.ref_samples)
                r.ref = median(r.ref_samples)
            log(f"  {r.what}: ours {r.ours:.2f}s" + (f", reference {r.ref:.2f}s" if r.ref else "") + " per 10k")
            rows.append(r)
    return rows


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
