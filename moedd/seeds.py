"""The seeds of one evaluation network trained together, as one model (``evaluate.seeds_together``).

On a GPU the seeds of a small ConvNet-3 training are launch-bound: each runs the same small
kernels one after another. Here S seeds' networks are stacked into one: every parameter is
concatenated along its output dimension, the S batches run through ONE grouped convolution per
layer (``groups=S``: seed s sees only its own batch and its own weights), instance norm acts per
channel (so per seed), and the classifier is applied per seed. One backward of Σ_s L_s gives every
seed the gradient of its own loss, and SGD with momentum and weight decay, being elementwise, steps
every seed exactly as its own optimiser would.

Each seed keeps exactly its own initialisation (the network built under its seed, as
``moedd.evaluate.train_network``), batch order, mixup partners and weights, and augmentation (its
own three generators, drawn in the same order as the sequential loop). What differs from the
sequential run is only how the convolutions sum: a grouped convolution is another kernel, so the
parameters agree to rounding, not bit for bit (tests/test_seeds.py derives the bound it checks).

Checkpoints stay per (network, seed): each seed's state is written in the format of
``train_network``'s (its network's state dict, an SGD state dict of its own momentum, its
generators, the epoch), so a unit resumes the same way whichever mode wrote it.

Supported: ConvNet-style networks with instance norm or none (``GroupedConvNet.supports``); batch
norm mixes samples, and the other architectures are compute-bound, so they train seed by seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedd.augment import DSA, DSAParams
from moedd.config import EvaluateConfig, FusionConfig
from moedd.moe import MixupFusion
from moedd.nets import create_net
from moedd.nets.conv import conv2d
from moedd.nets.grouped import GroupedConvNet
from moedd.nets.norm import instance_norm

SeedStateFn = Callable[[int, dict[str, Any]], None]
"""Receives (seed, that seed's training state in ``train_network``'s format)."""


def build_seed_net(net_name: str, seed: int, num_classes: int, ch: int, h: int) -> nn.Module:
    """The evaluation network of ``seed``: built under that seed, as ``train_network`` builds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_net(net_name, num_classes, channels=ch, image_size=h)


def can_stack(net_name: str, num_classes: int, ch: int, h: int) -> bool:
    """Whether ``net_name`` trains with its seeds stacked (a ConvNet with instance norm or none)."""
    with torch.device("meta"):
        return GroupedConvNet.supports(create_net(net_name, num_classes, channels=ch, image_size=h))


class SeedStack:
    """S networks of one ConvNet architecture as one set of stacked leaves (module docstring)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        self.template = GroupedConvNet(nets[0])
        self.s = len(nets)
        per_net = [list(n.parameters()) for n in nets]
        count = len(per_net[0])
        # trunk (conv weight/bias, norm affine): dim 0 is the output channel, so concatenating puts
        # seed s in channel block s, what a grouped convolution with groups=S reads
        self.params = [torch.cat([p[i].detach() for p in per_net]).requires_grad_(True) for i in range(count - 2)]
        # classifier weight (S, K, D) and bias (S, K), applied per seed
        self.params += [torch.stack([p[i].detach() for p in per_net]).requires_grad_(True) for i in (count - 2, count - 1)]

    def forward(self, x: Tensor) -> Tensor:
        """Logits (S, n, K) of the S batches ``x`` (S, n, ch, H, W), batch s through seed s."""
        s, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, s * x.shape[2], *x.shape[3:])
        it = iter(self.params)
        for conv, norm, pool in self.template.blocks:
            w = next(it)
            b = next(it) if conv.bias is not None else None
            h = conv2d(h, w, b, conv.stride, conv.padding, conv.dilation, groups=s)
            if norm is not None:
                h = instance_norm(h, next(it), next(it), norm.eps)
            h = pool(F.relu(h))
        feats = h.reshape(n, s, -1).transpose(0, 1)  # (S, n, D), each seed's features as its flatten(1)
        return torch.einsum("snd,skd->snk", feats, self.params[-2]) + self.params[-1].unsqueeze(1)

    def slices(self, k: int) -> list[Tensor]:
        """Seed k's parameters, in its network's ``parameters()`` order and shapes."""
        out = []
        for p in self.params[:-2]:
            step = p.shape[0] // self.s
            out.append(p[k * step:(k + 1) * step])
        return [*out, self.params[-2][k], self.params[-1][k]]

    def write_back(self, nets: list[nn.Module]) -> None:
        """Copy each seed's parameters into its network."""
        with torch.no_grad():
            for k, net in enumerate(nets):
                for dst, src in zip(net.parameters(), self.slices(k), strict=True):
                    dst.copy_(src)

    def seed_opt_state(self, opt: torch.optim.Optimizer, k: int, template: dict[str, Any]) -> dict[str, Any]:
        """Seed k's part of the stacked SGD state, as the state dict of its own network's SGD."""
        momenta = []
        for p in self.params:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            momenta.append(buf)
        state = {}
        for i, (buf, p) in enumerate(zip(momenta, self.params, strict=True)):
            if buf is None:
                continue
            if i >= len(self.params) - 2:
                state[i] = {"momentum_buffer": buf[k].clone()}
            else:
                step = p.shape[0] // self.s
                state[i] = {"momentum_buffer": buf[k * step:(k + 1) * step].clone()}
        return {"state": state, "param_groups": [{**template["param_groups"][0]}]}

    def load_seed_opt_state(self, opt: torch.optim.Optimizer, states: list[dict[str, Any]]) -> None:
        """The inverse of :meth:`seed_opt_state` for every seed (resume)."""
        for i, p in enumerate(self.params):
            bufs = [st["state"].get(i, st["state"].get(str(i), {})).get("momentum_buffer") for st in states]
            if any(b is None for b in bufs):
                continue
            stacked = torch.stack(bufs) if i >= len(self.params) - 2 else torch.cat(bufs)
            opt.state[p]["momentum_buffer"] = stacked.to(p.device).clone()


def train_seeds_together(
    net_name: str, data: Any, cfg: EvaluateConfig, fusion: FusionConfig, seeds: list[int], num_classes: int,
    on_epoch: Callable[[int, int], None] | None = None, resume: list[dict[str, Any]] | None = None,
    checkpoint: SeedStateFn | None = None, on_stats: Callable[[int, int, float, float], None] | None = None,
) -> list[nn.Module]:
    """:func:`moedd.evaluate.train_network` for every seed of ``seeds`` at once; the trained
    networks in seed order. ``resume``: one state per seed, all at the same epoch (written by
    ``checkpoint`` or by ``train_network``); ``on_epoch`` is called (seed, epochs done) and
    ``on_stats`` (seed, epochs done, training accuracy, mean training loss) after each epoch."""
    device = data.images.device
    ch, h = data.images.shape[1], data.images.shape[2]
    nets = [build_seed_net(net_name, s, num_classes, ch, h).to(device, data.images.dtype) for s in seeds]
    if resume is not None:
        for net, st in zip(nets, resume, strict=True):
            net.load_state_dict(st["net"])
    stack = SeedStack(nets)
    opt = torch.optim.SGD(stack.params, lr=data.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    template = torch.optim.SGD(nets[0].parameters(), lr=data.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay).state_dict()
    gens = [torch.Generator(device=device).manual_seed(s + 7919) for s in seeds]
    hosts = [torch.Generator().manual_seed(s + 15_485_863) for s in seeds]
    rngs = [np.random.default_rng(s) for s in seeds]
    start = 0
    if resume is not None:
        for g, hst, r, st in zip(gens, hosts, rngs, resume, strict=True):
            g.set_state(st["gen"])
            hst.set_state(st["host"])
            r.bit_generator.state = json.loads(st["numpy"])
        stack.load_seed_opt_state(opt, [st["opt"] for st in resume])
        opt.param_groups[0]["lr"] = resume[0]["opt"]["param_groups"][0]["lr"]
        start = int(resume[0]["epoch"])
    dsa = DSA(DSAParams(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    mixer = MixupFusion(data.images, data.labels, data.experts, fusion.p, fusion.alpha) if fusion.kind == "mixup" else None
    n = len(data.labels)
    for epoch in range(start, cfg.epochs):
        if epoch == cfg.epochs // 2:
            opt.param_groups[0]["lr"] = data.lr * 0.1
        orders = [torch.randperm(n, generator=g, device=device) for g in gens]
        correct = torch.zeros(len(seeds), device=device)
        loss_sum = torch.zeros(len(seeds), device=device, dtype=data.images.dtype)
        for i in range(0, n, cfg.batch_size):
            xs, targets = [], []
            for k in range(len(seeds)):
                idx = orders[k][i:i + cfg.batch_size]
                x = data.images[idx]
                target = data.labels[idx] if data.soft is None else data.soft[idx]
                if mixer is not None:
                    x, lam, partner = mixer.mix(x, idx, gens[k], rngs[k])
                    if data.soft is not None:
                        w = lam.view(-1, 1)
                        target = w * target + (1 - w) * data.soft[partner]
                if dsa is not None:
                    x = dsa.per_sample(x, gens[k], hosts[k])
                xs.append(x.contiguous())
                targets.append(target)
            logits = stack.forward(torch.stack(xs))
            losses = [F.cross_entropy(logits[k], targets[k]) for k in range(len(seeds))]
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()  # type: ignore[union-attr]
            opt.step()
            if on_stats is not None:
                idx_labels = torch.stack([data.labels[orders[k][i:i + cfg.batch_size]] for k in range(len(seeds))])
                correct += (logits.detach().argmax(2) == idx_labels).sum(1)
                loss_sum += torch.stack([x.detach() for x in losses]) * idx_labels.shape[1]
        done = epoch + 1
        if on_stats is not None:
            for k, s in enumerate(seeds):
                on_stats(s, done, float(correct[k]) / n, float(loss_sum[k]) / n)
        if checkpoint is not None and done % cfg.checkpoint_every == 0 and done < cfg.epochs:
            stack.write_back(nets)
            group = {**template["param_groups"][0], "lr": opt.param_groups[0]["lr"]}
            for k, s in enumerate(seeds):
                st = stack.seed_opt_state(opt, k, {"param_groups": [group]})
                checkpoint(s, {"epoch": done, "device_type": device.type, "net": nets[k].state_dict(), "opt": st,
                               "gen": gens[k].get_state(), "host": hosts[k].get_state(),
                               "numpy": json.dumps(rngs[k].bit_generator.state)})
        if on_epoch:
            for s in seeds:
                on_epoch(s, done)
    stack.write_back(nets)
    return nets
