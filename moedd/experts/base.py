"""The Expert interface: NoE experts of one base method, optimised jointly.

Each expert k owns the synthetic images of shard k and only ever sees real images of shard k.
All experts of a run live in one tensor ``syn`` of shape (NoE, C·IPC, ch, H, W), so one step can
embed every expert with the *same* feature network and add the distance-correlation term that
pushes their representations apart (:meth:`DistillContext.diversity`). Labels are fixed and class-major:
``labels = [0]*IPC + [1]*IPC + ...``.

Randomness: everything random in iteration ``it`` derives from ``(seed, it)`` through
:meth:`DistillContext.generator` and :meth:`DistillContext.seed_for`, so a resumed run replays
exactly the same draws as an uninterrupted one without saving any RNG state.

Experts on ranks (``torchrun``, ``moedd.distributed``): a process may optimise only some of the
run's experts (``DistillContext.local``, a contiguous block). It still draws every expert's random
numbers in expert order (the draws of the others are cheap index keys, thrown away), so each
expert gets exactly the draws it gets in the one-process run; only its own experts' images are
gathered and embedded. The diversity term then spans the ranks (:meth:`DistillContext.diversity`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor

from moedd.device import memory_format_for
from moedd.nets import create_net
from moedd.precision import at_least_float32
from moedd.moe import diversity_term, ranked_diversity_term
from moedd.registry import Registry


@dataclass
class DistillContext:
    """Everything an expert method needs, passed explicitly (no globals).

    Attributes:
        shard_images: per expert of the run, uint8 images (N_k, ch, H, W) of its shard, on
            ``device`` (all of them also on a rank: IDC's and IDM's shared networks train on
            their union).
        shard_labels: per expert of the run, int64 labels (N_k,), on ``device``.
        num_classes: number of classes C.
        ipc: synthetic images per class per expert.
        mean, std: per-channel normalisation (tuples) of the prepared training set.
        device: where the work happens.
        net: registered name of the matching network.
        dcor_weight: λ of the diversity term (0 = off).
        dcor_estimator: which dCor² it minimises (``moedd.moe.dcor.ESTIMATORS``).
        seed: base seed of the run.
        trajectories: teacher trajectories (MTT), or None.
        local: the experts this process optimises (a contiguous block of ``range(total_noe)``,
            one rank's share under ``torchrun``); None = all of them.
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
    dcor_estimator: str = "bias_corrected"
    seed: int = 0
    trajectories: Any = None
    """Teacher trajectories of the experts' shards (``moedd.trajectories``; MTT only)."""
    local: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        c = len(self.mean)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, c, 1, 1)
        # per expert of the run: (C, m_k) table of shard-local indices of each class, padded with -1
        self.class_tables = [self._class_table(y) for y in self.shard_labels]
        # per expert of the run: its smallest class (host ints, read once: no device syncs in the loop)
        self.min_counts = [int((t >= 0).sum(1).min()) for t in self.class_tables]
        if self.local is not None and list(self.local) != list(range(self.local[0], self.local[0] + len(self.local))):
            raise ValueError(f"local experts must be a contiguous block, got {self.local}")

    @property
    def experts(self) -> tuple[int, ...]:
        """The experts this process optimises (run-wide indices), in order."""
        return tuple(range(self.total_noe)) if self.local is None else self.local

    @property
    def noe(self) -> int:
        """The experts this process optimises: the first dimension of its ``syn``."""
        return len(self.experts)

    @property
    def total_noe(self) -> int:
        """The experts of the run, on every rank."""
        return len(self.shard_images)

    @property
    def ranked(self) -> bool:
        """Whether other processes optimise the run's other experts (the term spans ranks)."""
        return self.noe < self.total_noe

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
        return self.normalize_pixels(images_u8.float().div_(255.0))

    def normalize_pixels(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels -> the dataset's normalised space."""
        return (pixels - self._mean) / self._std

    def images(self, j: int) -> Tensor:
        """The uint8 shard of this process's j-th expert."""
        return self.shard_images[self.experts[j]]

    def pixels(self, j: int, idx: Tensor) -> Tensor:
        """This process's j-th expert's shard images ``idx`` as float pixels in [0, 1]."""
        return self.images(j)[idx].float().div_(255.0)

    @property
    def diverse(self) -> bool:
        """Whether the diversity term is on: a positive weight and more than one expert in the run."""
        return self.dcor_weight > 0 and self.total_noe > 1

    @property
    def dcor_share(self) -> float:
        """The part of λ this process's loss carries: λ, or λ/world when the experts are on ranks
        (each rank adds 1/world of the term, so the ranks' losses sum to the run's objective)."""
        return self.dcor_weight * self.noe / self.total_noe if self.ranked else self.dcor_weight

    def diversity(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """MoE-DD's diversity term for this process's experts' ``features`` (noe, C, n, D):
        (λ·dCor, or its rank's share, to add to the objective; dCor over all the run's experts,
        detached, for logging); zeros when :attr:`diverse` is false. On ranks the features of
        every rank are gathered with autograd (``moedd.moe.dcor.ranked_diversity_term``)."""
        weight = self.dcor_weight if self.diverse else 0.0
        if self.ranked and weight:
            return ranked_diversity_term(features, weight, self.dcor_estimator)
        return diversity_term(features, weight, self.dcor_estimator)

    def seed_for(self, it: int, stream: int = 0) -> int:
        """A seed that depends only on (run seed, iteration, stream)."""
        return (self.seed * 1_000_003 + it * 97 + stream) % (2**63 - 1)

    def generator(self, it: int, stream: int = 0) -> torch.Generator:
        """A fresh generator on the device for iteration ``it``."""
        return torch.Generator(device=self.device).manual_seed(self.seed_for(it, stream))

    def sample_real_each(self, per_class: int, gen: torch.Generator) -> list[tuple[Tensor, int]]:
        """Random real images of each of this process's experts' shards, class-major, normalised:
        per expert, ``n = min(per_class, smallest class of its shard)`` distinct images per class
        (C·n, ch, H, W) and n. The run's experts draw from ``gen`` in expert order."""
        picks = self.sample_indices_each(per_class, gen)
        return [(self.normalize(self.images(j)[p.flatten()]), p.shape[1]) for j, p in enumerate(picks)]

    def sample_real_all(self, per_class: int, gen: torch.Generator) -> tuple[Tensor, int]:
        """:meth:`sample_real_each` concatenated, cut to the same n per class over the run's
        experts (shards of very unequal size are equalised to the smallest draw): images
        (noe·C·n, ch, H, W) and n."""
        c = self.num_classes
        batches = self.sample_real_each(per_class, gen)
        n = min(min(per_class, m) for m in self.min_counts)
        return torch.cat([x if m == n else x.view(c, m, *x.shape[1:])[:, :n].flatten(0, 1) for x, m in batches]), n

    def sample_indices_each(self, per_class: int, gen: torch.Generator, repeat: bool = False) -> list[Tensor]:
        """:meth:`sample_indices` of this process's experts: every expert of the run draws from
        ``gen`` in turn, so each gets the draws of the one-process run; the others' are dropped."""
        draws = [self.sample_indices(k, per_class, gen, repeat) for k in range(self.total_noe)]
        return [draws[k] for k in self.experts]

    def sample_indices(self, k: int, per_class: int, gen: torch.Generator, repeat: bool = False) -> Tensor:
        """(C, n) shard-local indices of random images of every class of the run's expert k's shard.

        Without ``repeat``: n = min(per_class, smallest class of the shard), distinct within a
        class. With ``repeat`` (IDC's draws): n = per_class; when that exceeds the smallest class,
        fresh draws of the smallest class's size are concatenated (distinct within each draw).
        """
        table = self.class_tables[k]
        valid = table >= 0
        per = min(per_class, self.min_counts[k])
        picks = []
        for _ in range(math.ceil(per_class / per) if repeat else 1):
            keys = torch.rand(table.shape, generator=gen, device=table.device).masked_fill_(~valid, 2.0)
            picks.append(torch.gather(table, 1, keys.argsort(1)[:, :per]))
        return picks[0] if len(picks) == 1 else torch.cat(picks, 1)[:, :per_class]

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

    Subclasses set ``name`` (the registry key), ``config_cls`` (the class of the params section
    ``experts.<name>``, defined in the method's module), ``scales``, ``space`` and ``decoding``,
    and implement :meth:`init_images` and :meth:`step`.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[BaseModel]]
    scales: ClassVar[dict[str, dict[str, Any]]] = {}
    """Settings of ``experts.<name>`` per run scale other than ``paper`` (``moedd.scale``): the
    class defaults are the paper's sizes; ``cpu`` is the size of the CPU numbers in
    docs/results.md; ``smoke`` runs the method end to end in seconds on tiny data (3 classes of
    24 32x32 images, budget 4), which is also what the test suite uses."""
    needs_trajectories: ClassVar[bool] = False
    """Whether the method distills against teacher trajectories (``moedd trajectories``, MTT)."""
    optimises: ClassVar[bool] = True
    """False for methods that select real images (no iterations, so no loss curve): they run in the
    ``grid.baselines`` stages, which declare no plot."""
    space: ClassVar[str] = "normalized"
    decoding: ClassVar[str] = "none"
    spreads: ClassVar[bool] = False
    """Whether its experts can run on ranks (``torchrun``; :attr:`DistillContext.local`): the
    method draws through the context's per-expert helpers and its term through
    :meth:`DistillContext.diversity`, so each rank replays exactly its experts' one-process run."""

    def __init__(self, cfg: BaseModel, ctx: DistillContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    @classmethod
    def calibration_probe(cls, cfg: BaseModel) -> tuple[BaseModel, float]:
        """A configuration whose iteration ``moedd plan`` times instead of ``cfg``'s, and the
        factor that turns its time into ``cfg``'s (default: ``cfg`` itself, 1)."""
        return cfg, 1.0

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

    def image_lr(self) -> float | None:
        """The learning rate of this method's image updates (``lr_img``), in its own image space;
        None for methods that do not optimise images. A heterogeneous mixture steps the
        cross-method diversity term with it (``moedd.experts.mixture``)."""
        lr = getattr(self.cfg, "lr_img", None) if self.optimises else None
        return float(lr) if lr is not None else None

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
    ch, h, _ = ctx.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed_for(it, stream))
        net = create_net(ctx.net, ctx.num_classes, channels=ch, image_size=h)
    net = net.to(ctx.device, memory_format=memory_format_for(net, ctx.device))
    net.requires_grad_(False)
    return net


def siamese_features(net: torch.nn.Module, dsa: Any, ctx: DistillContext, real: Tensor, n_real: int, syn: Tensor,
                     n_syn: int, gen: torch.Generator, chunk: int = 0, bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Embed real images (no grad) and synthetic images (with grad) under the SAME augmentation
    per class (siamese DSA: the generator's state is replayed for the second call).

    Args:
        net: the embedding network (``net.embed``).
        dsa: a ``moedd.augment.DSA`` (drawn per class: unit = class).
        real: (NoE·C·n_real, ...) expert-major, class-major real images; ``syn`` likewise with
            ``n_syn`` images per class.
        chunk: real images per no-grad forward (speed and memory only); 0 = 128 on a CPU (keeps
            activations cache- and allocator-friendly), the whole batch elsewhere.
        bf16: run the network under bfloat16 autocast.

    Returns:
        real and synthetic features, in float32 or wider (float64 inputs stay float64).
    """
    c, dev = ctx.num_classes, ctx.device
    classes = torch.arange(c, device=dev)
    unit_real = classes.repeat_interleave(n_real).repeat(ctx.noe)
    unit_syn = classes.repeat_interleave(n_syn).repeat(ctx.noe)
    cl = memory_format_for(net, dev)
    chunk = chunk or (128 if dev.type == "cpu" else len(real))
    state = gen.get_state()
    with torch.no_grad(), _autocast(dev, bf16):
        aug = dsa.siamese(real, unit_real, c, gen).contiguous(memory_format=cl)
        f_real = at_least_float32(torch.cat([net.embed(aug[i:i + chunk]) for i in range(0, len(aug), chunk)]))
    gen.set_state(state)
    with _autocast(dev, bf16):
        f_syn = at_least_float32(net.embed(dsa.siamese(syn, unit_syn, c, gen).contiguous(memory_format=cl)))
    return f_real, f_syn


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def mixture_metrics(per_expert: Tensor, dcor: Tensor, dcor_weight: float, total: Tensor | None = None) -> dict[str, Tensor]:
    """The metrics every expert method logs (detached tensors: no host sync).

    "loss" = the objective (``total`` when given, e.g. with IDM's CE term; else match + λ·dcor),
    "match" = Σ over experts of ``per_expert`` (NoE,), "dcor", and "match_e{k}" per expert.
    """
    per_expert = per_expert.detach()
    match = per_expert.sum()
    loss = match + dcor_weight * dcor if total is None else total.detach()
    out = {"loss": loss, "match": match, "dcor": dcor.detach()}
    out.update({f"match_e{k}": per_expert[k] for k in range(len(per_expert))})
    return out
