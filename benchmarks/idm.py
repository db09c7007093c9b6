"""The IDM rows (uitrbn/IDM, ``--reference-idm``): seconds per IDM iteration against the loop
body of ``IDM_cifar10.py``, at the CIFAR-10 IPC 10 row of IDM's ``command.txt``.

Both sides: ConvNet-3 (instance norm), partition & expansion (factor 2), ``batch_real`` 256 per
class, DSA ``color_crop_cutout_flip_scale_rotate``, CE weight 0.5, and the queue-net training
that follows every iteration (``fetch_net_num`` 2 nets x ``model_train_steps`` 10 x
``trained_bs`` 256). :class:`IDMSizes` can shrink the work on both sides alike.
"""

from __future__ import annotations

import argparse
import importlib
import random
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moedd.params import load_params

from .checkouts import checkout, common_shims, isolated_imports
from .harness import (
    DSA_STRATEGY, NUM_CLASSES, SHAPE, Data, Row, alternate, log, no_preset, our_method, Sizes,
)


@dataclass(frozen=True)
class IDMSizes(Sizes):
    """The IDM knobs that set the amount of work (standard = CIFAR-10 IPC 10 of IDM's command.txt)."""

    batch_real: int = 256
    model_train_steps: int = 10
    trained_bs: int = 256


# IDM's command.txt, CIFAR10/10: --model ConvNet --ipc 10 --dsa_strategy color_crop_cutout_flip_scale_rotate
# --init real --lr_img 0.2 --net_train_real --outer_loop 1 --mismatch_lambda 0 --net_decay --embed_last 1000
# --syn_ce --ce_weight 0.5 --train_net_num 1 --aug  (the rest: IDM_cifar10.py's argparse defaults)
IDM_ARGS = dict(
    model="ConvNet", ipc=10, dsa_strategy=DSA_STRATEGY, lr_img=0.2, lr_net=0.01, net_decay=True, embed_last=1000,
    syn_ce=True, ce_weight=0.5, train_net_num=1, aug=True, aug_num=1, outer_loop=1, net_num=100, net_begin=0,
    net_end=100000, net_generate_interval=30, net_push_num=1, fetch_net_num=2, ij_selection="random",
)


def import_idm(path: str) -> types.ModuleType:
    """Import ``dc_utils`` (get_network, DiffAugment, ParamDiffAug, number_sign_augment, downscale)
    from a uitrbn/IDM checkout.

    ``IDM_cifar10.py`` itself is not imported: its loop is the body of ``main()`` (nothing to
    call), and it imports ``torchnet`` and MTT's ``utils`` (``kornia``) for dataset loading;
    :class:`RefIDM` is that loop body. ``dc_utils`` needs only the ``common_shims``.
    """
    root = checkout(path, "--reference-idm", ("IDM_cifar10.py", "dc_utils.py", "dc_networks.py"), "uitrbn/IDM")
    common_shims()
    with isolated_imports(root):
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


def idm_params(sizes: IDMSizes):
    """Our IDM settings = the reference run's (``IDM_ARGS``); every knob written out, so neither the
    config defaults nor a dataset preset (``experts.idm.preset``) can make the two sides differ."""
    a = IDM_ARGS
    return load_params(None, {"distill.budget": a["ipc"], **no_preset("idm"), **{f"experts.idm.{k}": v for k, v in {
        "lr_img": a["lr_img"], "momentum": 0.5, "batch_real": sizes.batch_real, "ce_weight": a["ce_weight"],
        "net_num": a["net_num"], "net_generate_interval": a["net_generate_interval"],
        "train_net_num": a["train_net_num"], "fetch_net_num": a["fetch_net_num"],
        "model_train_steps": sizes.model_train_steps, "trained_bs": sizes.trained_bs, "net_lr": a["lr_net"],
        "net_momentum": 0.9, "net_weight_decay": 0.0005, "factor": 2, "dsa_strategy": a["dsa_strategy"],
    }.items()}})


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

    row = Row("idm", "IDM iteration, IPC 10 (s)", "s", goal=goal if sizes.standard else None,
              note=sizes.reduced_note)
    alternate(row, ours_step, ref_step if ref is not None else None, reps, device)
    return [row]
