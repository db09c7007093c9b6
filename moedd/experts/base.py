"""The Expert interface: NoE experts of one base method, optimised jointly.

Each expert k owns the synthetic images of shard k and only ever sees real images of shard k.
All experts of a run live in one tensor ``syn`` of shape (NoE, C·IPC, ch, H, W), so one step can
embed every expert with the *same* feature network and add the distance-correlation term that
pushes their representations apart (DESIGN.md). Labels are fixed and class-major:
``labels = [0]*IPC + [1]*IPC + ...``.

Randomness: everything random in iteration ``it`` derives from ``(seed, it)`` through
:meth:`DistillContext.generator` and :meth:`DistillContext.seed_for`, so a resumed run replays
exactly the same draws as an uninterrupted one without saving any RNG state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor

from moedd.registry import Registry


@dataclass
class DistillContext:
    """Everything an expert method needs, passed explicitly (no globals).

    Attributes:
        shard_images: per expert, uint8 images (N_k, ch, H, W) of its shard, on ``device``.
        shard_labels: per expert, int64 labels (N_k,), on ``device``.
        num_classes: number of classes C.
        ipc: synthetic images per class per expert.
        mean, std: per-channel normalisation (tuples) of the prepared training set.
        device: where the work happens.
        net: registered name of the matching network.
        dcor_weight: λ of the diversity term (0 = off).
        seed: base seed of the run.
        trajectories: teacher trajectories (MTT), or None.
    """

    shard_images: list[Tensor]
    shard_labels: list[Tensor]
    num_classes: int
    ipc: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    net: str = "convnet3"
    dcor_weight: float = 0.0
    seed: int = 0
    trajectories: Any = None
    """Teacher trajectories of the experts' shards (``moedd.trajectories``; MTT only)."""

    def __post_init__(self) -> None:
        c = len(self.mean)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, c, 1, 1)
        # per expert: (C, m_k) table of shard-local indices of each class, padded with -1
        self.class_tables = [self._class_table(y) for y in self.shard_labels]

    @property
    def noe(self) -> int:
        return len(self.shard_images)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.shard_images[0].shape[1:])

    def _class_table(self, labels: Tensor) -> Tensor:
        counts = torch.bincount(labels, minlength=self.num_classes)
        table = torch.full((self.num_classes, int(counts.max())), -1, dtype=torch.long, device=labels.device)
        order = torch.argsort(labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
        table[labels[order], pos] = order
        return table

    def normalize(self, images_u8: Tensor) -> Tensor:
        """uint8 images -> float32 normalised with the dataset mean/std."""
        return (images_u8.float().div_(255.0) - self._mean) / self._std

    def seed_for(self, it: int, stream: int = 0) -> int:
        """A seed that depends only on (run seed, iteration, stream)."""
        return (self.seed * 1_000_003 + it * 97 + stream) % (2**63 - 1)

    def generator(self, it: int, stream: int = 0) -> torch.Generator:
        """A fresh generator on the device for iteration ``it``."""
        return torch.Generator(device=self.device).manual_seed(self.seed_for(it, stream))

    def sample_real(self, k: int, per_class: int, gen: torch.Generator) -> tuple[Tensor, int]:
        """Random real images of expert k's shard, class-major, normalised.

        Draws ``n = min(per_class, smallest class of the shard)`` distinct images per class.

        Returns:
            images (C·n, ch, H, W) and n.
        """
        pick = self.sample_indices(k, per_class, gen)
        return self.normalize(self.shard_images[k][pick.flatten()]), pick.shape[1]

    def sample_indices(self, k: int, per_class: int, gen: torch.Generator) -> Tensor:
        """(C, n) shard-local indices of distinct random images of every class of shard k,
        ``n = min(per_class, smallest class of the shard)``."""
        table = self.class_tables[k]
        valid = table >= 0
        n = min(per_class, int(valid.sum(1).min()))
        keys = torch.rand(table.shape, generator=gen, device=table.device).masked_fill_(~valid, 2.0)
        return torch.gather(table, 1, keys.argsort(1)[:, :n])

    def labels(self) -> Tensor:
        """The fixed, class-major labels of one expert's synthetic images."""
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(self.ipc)


@dataclass(frozen=True)
class RunSpec:
    """What a method may check before any work: the run's shape and its extra inputs."""

    noe: int
    ipc: int
    num_classes: int
    image_shape: tuple[int, ...]
    net: str
    device: torch.device
    trajectories: Any = None


class ExpertMethod(ABC):
    """A base distillation method run by NoE experts jointly.

    Subclasses set ``name`` (the registry key), ``config_cls``, ``space`` and ``decoding``,
    and implement :meth:`init_images` and :meth:`step`.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[BaseModel]]
    space: ClassVar[str] = "normalized"
    decoding: ClassVar[str] = "none"

    def __init__(self, cfg: BaseModel, ctx: DistillContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def check_inputs(cls, cfg: BaseModel, spec: RunSpec) -> None:
        """Raise ConfigError (one line) for inputs this method cannot use; called before any work."""

    @property
    def iterations(self) -> int:
        """Number of optimisation steps (0 for methods that only select images)."""
        return int(getattr(self.cfg, "iterations", 0))

    @abstractmethod
    def init_images(self) -> Tensor:
        """Initial synthetic images of every expert: (NoE, C·IPC, ch, H, W)."""

    def setup(self, syn: Tensor) -> None:
        """Create optimisers etc. for the leaf tensor ``syn`` (called once, before resume)."""

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        """One optimisation step of all experts; returns detached scalar tensors to log."""
        raise NotImplementedError(f"{self.name} has no optimisation steps")

    def learned_lr(self) -> float | None:
        """A learning rate learned with the images (MTT); None for other methods."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints (optimiser momentum, model queues, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


EXPERTS: Registry[type[ExpertMethod]] = Registry("expert")


def register_expert(cls: type[ExpertMethod]) -> type[ExpertMethod]:
    """Class decorator: register an expert method under its ``name``."""
    return EXPERTS.register(cls.name)(cls)


def frozen_random_net(ctx: DistillContext, it: int, stream: int = 1) -> torch.nn.Module:
    """A freshly initialised matching network for iteration ``it``, parameters frozen.

    Initialised on the CPU under a forked RNG seeded from (seed, it), so the weights do not
    depend on the device or on anything that ran before (resume replays the same nets).
    """
    from moedd.nets import create_net

    ch, h, _ = ctx.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed_for(it, stream))
        net = create_net(ctx.net, ctx.num_classes, channels=ch, image_size=h)
    from moedd.device import memory_format_for

    net = net.to(ctx.device, memory_format=memory_format_for(net, ctx.device))
    net.requires_grad_(False)
    return net
