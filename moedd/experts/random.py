"""Random real images: the baseline every distillation method must beat.

Each expert draws IPC images per class uniformly without replacement from its own shard
(DC-repo ``get_images``; not IDC's deterministic first-IPC rule, docs/methods.md §Baselines).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from moedd.config import Section
from moedd.experts.base import ExpertMethod, register_expert


class RandomConfig(Section):
    """``experts.random``: random real images of the expert's own shard (no optimisation)."""

    iterations: Literal[0] = 0


@register_expert
class RandomReal(ExpertMethod):
    """Random real images of the expert's shard, in normalised space; no optimisation."""

    name = "random"
    spreads = True
    config_cls = RandomConfig
    optimises = False

    def init_images(self) -> Tensor:
        gen = self.ctx.generator(it=-1)
        return torch.stack([x for x, _ in self.ctx.sample_real_each(self.ctx.ipc, gen)])
