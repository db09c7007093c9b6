"""Herding: real images whose running mean embedding stays closest to the class mean (a coreset
baseline, Welling 2009, as the DC and IDC papers use it; docs/methods.md §Baselines).

Each expert selects IPC real images per class from its own shard, greedily: with μ the mean
embedding of the class and s_t the sum of the t embeddings chosen so far, step t picks the
unchosen image x minimising ||(t+1)·μ − s_t − ψ(x)||₂, i.e. the image that keeps the mean of the
chosen set closest to μ. There is no optimisation (``iterations`` 0); the images are stored as
they are, normalised like every other set.

The embedding ψ is ``net.embed`` (the flattened output of the last conv block) of a network of
``distill.net`` (ConvNet-3) trained by SGD for ``train_epochs`` epochs on the expert's OWN shard,
without augmentation. This is where a mixture differs from IDC's herding, which embeds with a
network trained on the full training set: in moedd an expert only ever sees its shard, so its
embedding network does too (one network per expert; ``train_epochs`` 0 herds in the feature space
of the untrained network instead). [INFERRED] the schedule: plain SGD at the expert networks'
settings (``net_lr``, ``net_momentum``, ``net_weight_decay``), batches of ``batch_size``, no
learning-rate decay; the papers do not state how their feature network was trained.

Randomness: expert k's network is initialised and its batches are drawn from generators seeded
by (seed, k), so the selection is reproducible.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from moedd.config import NetTraining
from moedd.device import memory_format_for
from moedd.experts.base import ExpertMethod, frozen_random_net, register_expert

_STREAM_NET, _STREAM_BATCHES = 7, 8  # with the expert index in place of the iteration


class HerdingConfig(NetTraining):
    """``experts.herding``: herding selection of real images in a shard-trained feature space."""

    preset: str = "auto"
    """Row of ``presets.herding`` to apply: auto (the prepared data's identity) | cifar10 | cifar100 | none (moedd.params)."""
    iterations: Literal[0] = 0
    train_epochs: int = Field(20, ge=0)
    """Epochs the embedding network of each expert trains on the expert's shard (0 = untrained)."""
    batch_size: int = Field(256, ge=1)
    """Real images per SGD step of the embedding network, and per no-grad embedding forward."""


def herd(features: Tensor, n: int) -> Tensor:
    """Indices of ``n`` rows of ``features`` (m, D) chosen by herding, in the order chosen."""
    mu = features.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(len(features), dtype=torch.bool, device=features.device)
    chosen = []
    for t in range(n):
        dist = ((t + 1) * mu - total - features).norm(dim=1).masked_fill(~free, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total += features[i]
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


@register_expert
class Herding(ExpertMethod):
    """Herding experts: per class, the real images of the own shard that herd the class mean."""

    name = "herding"
    config_cls = HerdingConfig
    optimises = False
    scales = {"smoke": {"train_epochs": 1, "batch_size": 32},
              "cpu": {"train_epochs": 5}}
    cfg: HerdingConfig

    def embedding_net(self, k: int) -> torch.nn.Module:
        """Expert k's feature network: initialised from (seed, k), trained on shard k."""
        ctx, cfg = self.ctx, self.cfg
        net = frozen_random_net(ctx, k, stream=_STREAM_NET).requires_grad_(True)
        opt = cfg.net_optimizer(net)
        fmt = memory_format_for(net, ctx.device)
        gen = ctx.generator(k, _STREAM_BATCHES)
        images, labels = ctx.shard_images[k], ctx.shard_labels[k]
        net.train()
        for _ in range(cfg.train_epochs):
            order = torch.randperm(len(labels), generator=gen, device=ctx.device)
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = F.cross_entropy(net(ctx.normalize(images[idx]).contiguous(memory_format=fmt)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return net.eval().requires_grad_(False)

    def embed(self, net: torch.nn.Module, images_u8: Tensor) -> Tensor:
        """ψ of uint8 images, in no-grad batches of ``batch_size``."""
        fmt, b = memory_format_for(net, self.ctx.device), self.cfg.batch_size
        with torch.no_grad():
            return torch.cat([net.embed(self.ctx.normalize(images_u8[i:i + b]).contiguous(memory_format=fmt)).float()
                              for i in range(0, len(images_u8), b)])

    def init_images(self) -> Tensor:
        ctx = self.ctx
        out = []
        for k in range(ctx.noe):
            feats = self.embed(self.embedding_net(k), ctx.shard_images[k])
            picks = []
            for row in ctx.class_tables[k]:  # class c: its shard-local indices, padded with -1
                members = row[row >= 0]
                picks.append(members[herd(feats[members], ctx.ipc)])
            out.append(ctx.normalize(ctx.shard_images[k][torch.cat(picks)]))
        return torch.stack(out)
