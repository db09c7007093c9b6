"""Heterogeneous mixtures: expert k runs the k-th method of ``idc+idm`` on shard k.

MoE-DD calls a distillation expert "an objective function and target dataset"; a mixture gives
each shard its own objective. Each member is the method's own :class:`ExpertMethod` with one
expert (its own config and preset row, a context holding only its shard), so it keeps its image
space (IDC pixels, IDM/DM normalised, MTT ZCA), its decoding, its optimiser and its schedule.

**Joint schedule.** The members differ in iteration counts (DM/IDM 20,000, IDC 2,000 outer
iterations of 100 matching steps, MTT 5,000): each steps on its own clock. The mixture runs
T = max_k n_k global steps; member k takes its local step ``j`` at the global step where
``floor(t·n_k / T)`` moves to ``j + 1``, so its n_k steps are spread evenly over the run and all
members finish together. A checkpoint at global step t therefore holds every member mid-run, and
a resumed run replays the same local steps (each member's randomness derives from its own seed
and local step).

**The diversity term across methods.** Right after member k's own step, k takes one more image
update on λ·dCor between its images and the other members' *current* images (detached): the term
uses whatever the others have reached on their clocks. The features come from a common network:
a freshly initialised ``distill.net`` (ConvNet-3 by default) per update, frozen, applied to every
member's images brought into one input space (the prepared data's mean/std normalisation: IDC's
pixels are normalised, MTT's ZCA images inverted to pixels and normalised) and decoded by each
member's own decoding (a multi-formation image's feature is the mean over its four decoded
images, so every member has IPC rows per class, as the estimator needs). Why that network: it is
the one network every method already embeds images with (DM and IDM match its features, IDC and
MTT train it), a random one per update is what makes DM's and IDM's features informative about
the images rather than about one set of weights, and it needs no teacher. The update is plain SGD
with the member's own image learning rate (``lr_img``; IDC's IPC-scaled rate), i.e. the step the
term contributes to that member's own update in a homogeneous run, without momentum. Members that
select real images (random, herding) do not move; their images still count as "the others".

Where joint optimisation is impossible it is not faked: λ = 0, or a mixture whose members all
select real images, is a set of independent runs on their shards, each exactly the method's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from moedd.errors import ConfigError
from moedd.experts.base import DistillContext, ExpertMethod, frozen_random_net
from moedd.moe.dcor import diversity_term
from moedd.synthetic import decode_grouped

SEPARATORS = (",", "+")
DIVERSITY_STREAM = 7_000
"""Random-stream offset of the common network of the cross-method term (expert k: + k)."""


def parse_methods(expert: str, registered: Sequence[str]) -> list[str]:
    """``idc,idm`` or ``idc+idm`` -> ["idc", "idm"]; a single name -> [name].

    Raises:
        ConfigError: an empty or unknown name (one line, with the choices).
    """
    text = expert.replace(",", "+")
    names = [n.strip() for n in text.split("+")]
    for n in names:
        if not n:
            raise ConfigError(f"--expert {expert!r}: an empty method name (write e.g. idc,idm)")
        if n not in registered:
            raise ConfigError(f"unknown expert '{n}'; choose from: {', '.join(registered)}")
    return names


def mixture_name(methods: Sequence[str]) -> str:
    """The cell's method name: the methods joined by ``+`` in expert order; one distinct method is
    that method (``dm,dm`` is the homogeneous DM run)."""
    return methods[0] if len(set(methods)) == 1 else "+".join(methods)


def is_mixture(name: str) -> bool:
    return any(s in name for s in SEPARATORS) and len(set(name.replace(",", "+").split("+"))) > 1


@dataclass
class ShardTrajectories:
    """The teachers of one shard of a trajectories set (``moedd.trajectories.Trajectories``) seen as
    a one-shard set: what a mixture's MTT member distills against, as shard 0 of its own run."""

    base: Any
    shard: int

    @property
    def meta(self) -> dict[str, Any]:
        return {**self.base.meta, "noe": 1}

    @property
    def zca(self) -> Any:
        return self.base.zca

    @property
    def noe(self) -> int:
        return 1

    @property
    def epochs(self) -> int:
        return int(self.base.epochs)

    def count(self, shard: int) -> int:
        if shard != 0:
            raise IndexError(f"shard {shard} out of range (NoE=1)")
        return int(self.base.count(self.shard))

    def load(self, shard: int, index: int) -> Tensor:
        self.count(shard)
        return self.base.load(self.shard, index)


def shard_teachers(trajectories: Any, k: int) -> ShardTrajectories:
    """The teachers of shard k as a one-shard set, refusing a set made for fewer shards."""
    if int(trajectories.meta["noe"]) <= k:
        raise ConfigError(f"the trajectories were trained for NoE={trajectories.meta['noe']}, the mixture's MTT "
                          f"expert is expert {k}")
    return ShardTrajectories(trajectories, k)


class MixtureConfig(BaseModel):
    """The effective configuration of a mixture: each member's resolved ``experts.<method>``."""

    model_config = ConfigDict(frozen=True)

    methods: list[str]
    members: list[dict[str, Any]]
    iterations: int
    """T = the longest member's iteration count: the global steps of the joint schedule."""


def local_steps(t: int, n: int, total: int) -> range:
    """The local steps a member with ``n`` iterations takes at global step ``t`` of ``total``."""
    if n == 0 or total == 0:
        return range(0)
    return range(math.floor(t * n / total), math.floor((t + 1) * n / total))


class Mixture(ExpertMethod):
    """Members of different methods, one per shard, on their own clocks, pushed apart by the
    cross-method diversity term (module docstring)."""

    name = "mixture"
    config_cls = MixtureConfig

    def __init__(self, cfg: MixtureConfig, ctx: DistillContext, members: list[ExpertMethod], zca: Any = None) -> None:
        super().__init__(cfg, ctx)
        self.members = members
        self.zca = zca
        self.optimises = any(type(m).optimises for m in members)  # type: ignore[misc]
        self.leaves: list[Tensor] = []
        self._syn: Tensor | None = None
        self._last = [torch.zeros((), device=ctx.device) for _ in members]
        self._dcor = torch.zeros((), device=ctx.device)

    @property
    def iterations(self) -> int:
        return self.cfg.iterations

    # ------------------------------------------------------------------ images

    def init_images(self) -> Tensor:
        return torch.cat([m.init_images() for m in self.members])

    def setup(self, syn: Tensor) -> None:
        """One leaf per member (its optimiser owns it); ``syn`` mirrors them after every step."""
        self._syn = syn
        self.leaves = [syn[k:k + 1].detach().clone().requires_grad_(True) for k in range(len(self.members))]
        for m, leaf in zip(self.members, self.leaves, strict=True):
            m.setup(leaf)

    def to_common(self, k: int, x: Tensor) -> Tensor:
        """Member k's stored images (n, ch, H, W) -> decoded, in the normalised input space
        (differentiable): (q·n, ...) quadrant-major, q decoded images per stored image."""
        member = self.members[k]
        if member.space == "zca":
            x = self.ctx.normalize_pixels(member.zca.invert(x))  # type: ignore[attr-defined]
        elif member.space == "pixel":
            x = self.ctx.normalize_pixels(x)
        return decode_grouped(x, member.decoding)

    def features(self, net: torch.nn.Module, k: int, x: Tensor) -> Tensor:
        """(C, IPC, D): the common network's feature of each stored image of member k (the mean
        over its decoded images)."""
        c, ipc = self.ctx.num_classes, self.ctx.ipc
        dec = self.to_common(k, x)
        f = net.embed(dec)
        q = len(dec) // len(x)
        return f.view(q, c, ipc, -1).mean(0)

    def diversity_update(self, k: int, t: int) -> Tensor:
        """One SGD step of member k's images on λ·dCor against the others' current images; the
        dCor before the step (detached)."""
        member, ctx = self.members[k], self.ctx
        lr = member.image_lr()
        net = frozen_random_net(ctx, t, DIVERSITY_STREAM + k)
        leaf = self.leaves[k]
        feats = torch.stack([self.features(net, j, (x if j == k else x.detach())[0])
                             for j, x in enumerate(self.leaves)])
        term, dcor = diversity_term(feats, ctx.dcor_weight, ctx.dcor_estimator)
        if lr is not None and term.requires_grad:
            (grad,) = torch.autograd.grad(term, leaf)
            with torch.no_grad():
                leaf.sub_(lr * grad)
        return dcor

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        total = self.iterations
        for k, member in enumerate(self.members):
            for j in local_steps(it, member.iterations, total):
                out = member.step(self.leaves[k], j)
                self._last[k] = out["match"].detach()
                if self.ctx.diverse and member.image_lr() is not None:
                    self._dcor = self.diversity_update(k, it)
        with torch.no_grad():
            for k, leaf in enumerate(self.leaves):
                syn[k].copy_(leaf[0])
        per_expert = torch.stack(self._last)
        match = per_expert.sum()
        out = {"loss": match + self.ctx.dcor_weight * self._dcor, "match": match, "dcor": self._dcor}
        out.update({f"match_e{k}": per_expert[k] for k in range(len(self.members))})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"members": [m.state_dict() for m in self.members], "last": list(self._last), "dcor": self._dcor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called after ``syn`` was restored from the checkpoint: the leaves take its rows."""
        assert self._syn is not None, "setup() first"
        with torch.no_grad():
            for k, leaf in enumerate(self.leaves):
                leaf[0].copy_(self._syn[k])
        for m, s in zip(self.members, state["members"], strict=True):
            m.load_state_dict(s)
        self._last = [x.to(self.ctx.device) for x in state["last"]]
        self._dcor = state["dcor"].to(self.ctx.device)
