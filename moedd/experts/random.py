"""Random real images: the baseline every distillation method must beat.

Each expert draws IPC images per class uniformly without replacement from its own shard
(DC-repo ``get_images``; not IDC's deterministic first-IPC rule, algorithms.md §8.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moedd.config import RandomExpertConfig
from moedd.experts.base import ExpertMethod, register_expert


@register_expert
class RandomReal(ExpertMethod):
    """Random real images of the expert's shard, in normalised space; no optimisation."""

    name = "random"
    config_cls = RandomExpertConfig

    def init_images(self) -> Tensor:
        gen = self.ctx.generator(it=-1)
        return torch.stack([self.ctx.sample_real(k, self.ctx.ipc, gen)[0] for k in range(self.ctx.noe)])
