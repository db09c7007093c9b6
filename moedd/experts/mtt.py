"""MTT (Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022),
run by NoE experts jointly, each against teachers trained on its own shard.

Facts: docs/methods.md §MTT (mtt-distillation ``distill.py``, ``buffer.py``), hyper-parameters per
setting in ``presets.mtt`` (author-provided table, docs/methods.md §MTT presets), ZCA docs/methods.md §ZCA.

Per iteration ``it`` and expert k:

1. a random teacher i of shard k (``moedd trajectories``) and a random start epoch
   t ~ U{0, …, T⁺−1}; θ̂_0 = θ*_t, target θ*_{t+M};
2. N = ``syn_steps`` unrolled student steps on the expert's synthetic images: each step takes
   the next ``batch_syn`` images of a random permutation (all images by default), applies
   per-sample DSA, and sets θ̂_{j+1} = θ̂_j − α ∇_θ CE(f(θ̂_j; A(x)), y) with the graph kept
   (the network is evaluated functionally on a flat parameter vector);
3. L_k = ||θ̂_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||².

One step of SGD(lr_img, momentum 0.5) on the images and of SGD(lr_lr, momentum 0.5) on the
learnable learning rate α (initialised to ``lr_teacher``) follows. α is ONE scalar shared by the
NoE experts (the evaluator trains one network on the fused set, with one learning rate); it is
stored in every expert's metadata and used by the evaluator.

MoE-DD's diversity term needs features of every expert's images in one space: a frozen random
ConvNet of the iteration (as DM's) embeds all synthetic images, and λ·Σ_c dCor² of the experts'
embeddings is added [INFERRED: the paper does not say which network MTT's dCor uses].

Memory: each expert's unrolled graph is built and back-propagated on its own (gradients add up
in ``syn.grad``), so the peak is one expert's graph: about ``syn_steps × batch_syn`` times the
activations of one image (``estimate_memory_gb``), checked against the device before any work.

CUDA graph (``cuda_graph: true``, the default; CUDA only): every expert's unroll and meta-gradient of an
iteration are captured once and replayed (``moedd.experts._mtt_graph``); the DSA group of each
step is then drawn on the device, the rest as above.

Input space: with ``zca: true`` (CIFAR-10 presets) images live in the ZCA space fitted on the
full training set (kornia math, ε 0.1) that the teachers were trained in; the transform travels
with the trajectories and the synthetic set so the evaluator whitens the test set the same way.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pydantic import Field

from moedd._graphs import RunnerSlot
from moedd.augment import DSA, DSAParams
from moedd.config import DSA_STRATEGY, ConfigError, DSAStrategy, Section
from moedd.device import memory_format_for
from moedd.experts._mtt_graph import StaticUnrolls
from moedd.experts.base import DistillContext, ExpertMethod, RunSpec, frozen_random_net, mixture_metrics, register_expert
from moedd.nets import create_net

# generator streams of one iteration (DistillContext.seed_for(it, stream)); all < 97 and distinct
_STREAM_DSA, _STREAM_PICK, _STREAM_ORDER, _STREAM_DCOR_NET = 2, 3, 4, 5

_BYTES_PER_ACTIVATION = 10
"""Bytes kept per conv/norm/pool output element and unrolled step (float32 activations plus what
the double backward keeps): an upper bound of the measured 8.7 bytes (peak RSS of 100 CIFAR
images x 30 unrolled steps on the CPU, benchmarks/bench.py; the measurement log is in
docs/results.md)."""


class MTTConfig(Section):
    """``experts.mtt``; defaults = the CIFAR-10 IPC 10 row of the author-provided table
    (docs/methods.md §MTT presets), which FTD's script confirms."""

    preset: str = "auto"
    """Row of ``presets.mtt`` to apply: auto (the prepared data's identity) | cifar10 | cifar100 | none (moedd.params)."""
    iterations: int = Field(5000, ge=0)
    syn_steps: int = Field(30, ge=1)
    """N: unrolled student steps per iteration (memory grows linearly with it)."""
    expert_epochs: int = Field(2, ge=1)
    """M: the student's target is the teacher M epochs after the start epoch."""
    max_start_epoch: int = Field(20, ge=1)
    """T+: start epochs are drawn from 0 .. T+-1."""
    batch_syn: int | None = Field(None, ge=1)
    """Synthetic images per student step (None = all of the expert's images; memory knob)."""
    lr_img: float = Field(100.0, gt=0)
    lr_lr: float = Field(1e-5, gt=0)
    lr_teacher: float = Field(0.001, gt=0)
    """α0: initial value of the learnable student learning rate."""
    momentum: float = Field(0.5, ge=0, lt=1)
    """SGD momentum of the image and learning-rate optimisers."""
    zca: bool = True
    """Distill (and train teachers) in ZCA-whitened space (kornia math, eps 0.1, fitted on the
    full training set)."""
    zca_eps: float = Field(0.1, gt=0)
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    max_memory_gb: float | None = Field(None, gt=0)
    """Refuse a run whose estimated peak memory exceeds this (None = the device's memory)."""
    cuda_graph: bool = True
    """On a CUDA device, capture each iteration's unrolls and meta-gradients as one CUDA graph
    and replay it (``moedd.experts._mtt_graph``): one launch instead of thousands, for GPUs where
    the host's launches bound the iteration (H200: 2.17x the reference per iteration, eager
    1.34x; docs/results.md). The DSA group of each step is then drawn on the device (same
    distribution, another random stream than eager), so a CUDA run and a CPU run of the same
    seed differ in their draws. No effect on a CPU. ``false`` gives the eager path on CUDA."""


def activation_elements(net: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Elements of every conv/norm/pool output for ONE image (a shape-only forward on 'meta')."""
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
        nonlocal total
        total += out[0].numel()

    probe = [m.register_forward_hook(hook) for m in net.modules()
             if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.Linear))]
    try:
        with torch.no_grad():
            net(torch.zeros(1, *image_shape))
    finally:
        for h in probe:
            h.remove()
    return total


def estimate_memory_gb(net: nn.Module, image_shape: tuple[int, ...], syn_steps: int, batch: int) -> float:
    """Rough peak memory of one expert's unrolled graph, in GiB (activations dominate)."""
    per_image = activation_elements(net, image_shape) * _BYTES_PER_ACTIVATION
    params = sum(p.numel() for p in net.parameters()) * 4 * 3 * (syn_steps + 1)
    return (syn_steps * batch * per_image + params) / 2**30


def device_memory_gb(device: torch.device) -> float:
    """Memory the run may use: the GPU's total memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak, or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@register_expert
class MatchingTrainingTrajectories(ExpertMethod):
    """MTT experts: unrolled student training on the synthetic images matches teacher trajectories."""

    name = "mtt"
    config_cls = MTTConfig
    scales = {"smoke": {"iterations": 4, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2},
              "cpu": {"iterations": 20}}
    needs_trajectories = True
    cfg: MTTConfig

    def __init__(self, cfg: MTTConfig, ctx: DistillContext) -> None:
        super().__init__(cfg, ctx)
        traj = ctx.trajectories
        if traj is None:
            raise ConfigError("MTT needs teacher trajectories: run `moedd trajectories --noe N` first (or pass --trajectories)")
        self.traj = traj
        self.zca = traj.zca if cfg.zca else None
        self.space = "zca" if cfg.zca else "normalized"  # type: ignore[misc]
        self.dsa = DSA(DSAParams(strategy=cfg.dsa_strategy))
        ch, h, _ = ctx.image_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = create_net(ctx.net, ctx.num_classes, channels=ch, image_size=h)
        self.net = net.to(ctx.device, memory_format=memory_format_for(net, ctx.device))
        self.net.requires_grad_(False)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for _, p in self.net.named_parameters()]
        self.numels = [p.numel() for _, p in self.net.named_parameters()]
        self.lr = torch.tensor(float(cfg.lr_teacher), device=ctx.device, requires_grad=True)
        self.graphs = RunnerSlot(cfg.cuda_graph, lambda syn: StaticUnrolls(self, syn, capture=True), "MTT")
        # The ZCA matrices (2 x 37.7 MB at 32x32x3) stay where they were loaded: only the real-image
        # initialisation uses them (apply() moves W to the images' device for that one call), and
        # keeping them on the GPU would add 75 MB to every MTT iteration's peak.

    # ------------------------------------------------------------------ checks

    @classmethod
    def check_inputs(cls, cfg: MTTConfig, ctx: RunSpec) -> None:  # type: ignore[override]
        """Trajectories consistent with the run, and a memory estimate that fits; before any work."""
        traj = ctx.trajectories
        if traj is None:
            raise ConfigError("MTT needs teacher trajectories: run `moedd trajectories --noe N` first (or pass --trajectories)")
        meta = traj.meta
        if int(meta["noe"]) != ctx.noe:
            raise ConfigError(f"the trajectories were trained for NoE={meta['noe']}, the run has NoE={ctx.noe}")
        need = cfg.max_start_epoch + cfg.expert_epochs
        if int(meta["epochs"]) < need:
            raise ConfigError(f"the teachers have {meta['epochs']} epochs but MTT needs max_start_epoch + expert_epochs = {need}; "
                              "retrain them with more trajectories.epochs")
        want = "zca" if cfg.zca else "normalized"
        if meta["space"] != want:
            raise ConfigError(f"the teachers were trained in '{meta['space']}' space but experts.mtt.zca={cfg.zca}; "
                              "rerun `moedd trajectories` with the same MTT settings")
        if meta.get("net") and meta["net"] != ctx.net:
            raise ConfigError(f"the teachers are {meta['net']} networks but distill.net is {ctx.net}")
        for k in range(ctx.noe):
            if traj.count(k) < 1:
                raise ConfigError(f"no teacher trajectories for shard {k}")
        ch, h, _ = ctx.image_shape
        net = create_net(ctx.net, ctx.num_classes, channels=ch, image_size=h)
        p = sum(x.numel() for x in net.parameters())
        if int(meta.get("param_count", p)) != p:
            raise ConfigError(f"the teachers have {meta['param_count']} parameters, {ctx.net} here has {p}")
        batch = min(cfg.batch_syn or ctx.num_classes * ctx.ipc, ctx.num_classes * ctx.ipc)
        need_gb = estimate_memory_gb(net, ctx.image_shape, cfg.syn_steps, batch)
        have_gb = cfg.max_memory_gb if cfg.max_memory_gb is not None else device_memory_gb(ctx.device)
        if need_gb > have_gb:
            raise ConfigError(
                f"MTT needs about {need_gb:.1f} GiB ({cfg.syn_steps} unrolled steps x {batch} images) but "
                f"{have_gb:.1f} GiB are available: lower experts.mtt.batch_syn (or syn_steps)")

    # ------------------------------------------------------------------ images

    def to_input(self, images_u8: Tensor) -> Tensor:
        """uint8 images -> the space MTT works in (ZCA-whitened [0,1], or mean/std-normalised)."""
        if self.zca is not None:
            return self.zca.apply_u8(images_u8)
        return self.ctx.normalize(images_u8)

    def init_images(self) -> Tensor:
        """Real images of each expert's own shard (MTT's ``pix_init real``), class-major."""
        ctx, gen = self.ctx, self.ctx.generator(it=-1)
        picks = [ctx.sample_indices(k, ctx.ipc, gen).flatten() for k in range(ctx.noe)]
        return torch.stack([self.to_input(ctx.shard_images[k][p]) for k, p in enumerate(picks)])

    def setup(self, syn: Tensor) -> None:
        self.opt_img = torch.optim.SGD([syn], lr=self.cfg.lr_img, momentum=self.cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=self.cfg.lr_lr, momentum=self.cfg.momentum)

    # ------------------------------------------------------------------ student

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat parameter vector (teachers' layout: ``net.parameters()`` order) -> named views."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes, strict=True)}

    def unroll(self, x: Tensor, y: Tensor, start: Tensor, target: Tensor, gen: torch.Generator,
               order: Tensor, host: torch.Generator | None) -> Tensor:
        """The normalised parameter distance after ``syn_steps`` student steps from ``start``.

        Args:
            x: (n, ch, H, W) one expert's synthetic images (part of the graph).
            y: (n,) their labels.
            start, target: flat teacher parameters θ*_t and θ*_{t+M}.
            gen: device RNG for the augmentation's parameters.
            host: CPU RNG for the augmentation's group of each step (no device sync); None
                draws the group on the device with ``gen`` (``DSA.per_sample_static``: the same
                kernels at every step, as a CUDA graph needs).
            order: (syn_steps·batch,) indices: step j uses order[j·batch:(j+1)·batch].
        """
        batch = min(self.cfg.batch_syn or len(y), len(y))
        fmt = memory_format_for(self.net, x.device)
        theta = start.detach().clone().requires_grad_(True)
        for j in range(self.cfg.syn_steps):
            idx = order[j * batch:(j + 1) * batch]
            xb = x.index_select(0, idx)  # (its backward is an index_add: no sync, capturable)
            xb = self.dsa.per_sample(xb, gen, host) if host is not None else self.dsa.per_sample_static(xb, gen)
            xb = xb.contiguous(memory_format=fmt)
            out = functional_call(self.net, self.unflatten(theta), (xb,))
            ce = F.cross_entropy(out, y.index_select(0, idx))
            (g,) = torch.autograd.grad(ce, theta, create_graph=True)
            theta = theta - self.lr * g
        return (theta - target).pow(2).sum() / (start - target).pow(2).sum()

    def _teacher_pair(self, k: int, pick: torch.Generator) -> tuple[Tensor, Tensor]:
        """θ*_t and θ*_{t+M} (host tensors) of a random teacher of shard k at a random start epoch
        t, both drawn from the host generator ``pick``."""
        i = int(torch.randint(self.traj.count(k), (1,), generator=pick))
        t = int(torch.randint(self.cfg.max_start_epoch, (1,), generator=pick))
        traj = self.traj.load(k, i)
        return traj[t], traj[t + self.cfg.expert_epochs]

    def _order(self, n: int, gen: torch.Generator) -> Tensor:
        """Minibatch order of one unroll: consecutive random permutations (MTT's index chunks)."""
        batch = min(self.cfg.batch_syn or n, n)
        need = self.cfg.syn_steps * batch
        perms = [torch.randperm(n, generator=gen, device=self.ctx.device) for _ in range(math.ceil(need / n))]
        return torch.cat(perms)[:need]

    def _losses(self, syn: Tensor, it: int, backward: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Every expert's trajectory loss and the dCor term of iteration ``it``.

        With ``backward`` each expert's graph is back-propagated as soon as it is built (and
        freed), so the peak memory is one expert's unroll; gradients add up in ``syn.grad`` and
        in the learning rate's ``grad``.

        Returns:
            per-expert losses (NoE,) and dCor (both detached when ``backward``), and the
            differentiable totals (empty when ``backward``).
        """
        ctx = self.ctx
        labels = ctx.labels()
        pick = torch.Generator().manual_seed(ctx.seed_for(it, _STREAM_PICK))  # host choices: no device sync
        gen, gen_order = ctx.generator(it, _STREAM_DSA), ctx.generator(it, _STREAM_ORDER)
        losses: list[Tensor] = []
        graphs: list[Tensor] = []
        static = self.graphs.get(syn) if backward else None
        if static is not None:
            losses = self._static_losses(static, syn, it)
        if not losses:  # eager (also after a failed capture)
            for k in range(ctx.noe):
                start, target = (p.to(ctx.device) for p in self._teacher_pair(k, pick))
                loss = self.unroll(syn[k], labels, start, target, gen, self._order(len(labels), gen_order), pick)
                if backward:
                    loss.backward()
                else:
                    graphs.append(loss)
                losses.append(loss.detach())
        dcor = torch.zeros((), device=ctx.device)
        if ctx.diverse:  # the embedding network is only built when the term is on
            net = frozen_random_net(ctx, it, stream=_STREAM_DCOR_NET)
            feats = net.embed(syn.flatten(0, 1).contiguous(memory_format=memory_format_for(net, ctx.device)))
            term, dcor = ctx.diversity(feats.view(ctx.noe, ctx.num_classes, ctx.ipc, -1))
            if backward:
                term.backward()
            else:
                graphs.append(term)
        return torch.stack(losses), dcor, graphs

    # ------------------------------------------------------------------ CUDA graph

    def _static_losses(self, static: StaticUnrolls, syn: Tensor, it: int) -> list[Tensor]:
        """The experts' losses of iteration ``it`` through ``static``; adds the gradients to
        ``syn.grad`` and the learning rate's. Teacher, start epoch and order are drawn as in
        eager mode; the augmentation from the graph's generator seeded with the DSA stream.

        Returns an empty list when the graph cannot be captured (warned once; the run goes on
        eagerly, with the same results up to the augmentation's random stream).
        """
        ctx = self.ctx
        pick = torch.Generator().manual_seed(ctx.seed_for(it, _STREAM_PICK))
        gen_order = ctx.generator(it, _STREAM_ORDER)
        pairs = [self._teacher_pair(k, pick) for k in range(ctx.noe)]
        start, target = (torch.stack(ts).to(ctx.device) for ts in zip(*pairs, strict=True))
        orders = torch.stack([self._order(ctx.num_classes * ctx.ipc, gen_order) for _ in range(ctx.noe)])
        try:
            losses, g_syn, g_lr = static.run(start, target, orders, ctx.seed_for(it, _STREAM_DSA))
        except (RuntimeError, AttributeError) as err:  # capture refused (e.g. an op that syncs)
            self.graphs.fail(err)
            return []
        for leaf, g in ((syn, g_syn), (self.lr, g_lr)):
            leaf.grad = g.clone() if leaf.grad is None else leaf.grad + g
        return list(losses.clone().unbind())

    def objective(self, syn: Tensor, it: int) -> Tensor:
        """The loss of iteration ``it`` at ``syn`` (same teachers, start epochs and augmentation
        as :meth:`step` draws), differentiable; for tests and diagnostics."""
        _, _, graphs = self._losses(syn, it, backward=False)
        return torch.stack(graphs).sum()

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        """One MTT iteration of every expert (one image step, one learning-rate step)."""
        ctx = self.ctx
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        match, dcor, _ = self._losses(syn, it, backward=True)
        self.opt_img.step()
        self.opt_lr.step()
        out = mixture_metrics(match, dcor, ctx.dcor_weight)
        out.update({"lr": self.lr.detach().clone(), "peak_mem_gb": torch.tensor(peak_memory_gb(ctx.device))})
        if self.cfg.cuda_graph:  # 1 when this iteration replayed the graph (0: eager, e.g. on a CPU)
            out["cuda_graph"] = torch.tensor(float(self.graphs.replaying))
        return out

    def learned_lr(self) -> float | None:
        return float(self.lr.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"opt_img": self.opt_img.state_dict(), "opt_lr": self.opt_lr.state_dict(), "lr": self.lr.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_img.load_state_dict(state["opt_img"])
        with torch.no_grad():
            self.lr.copy_(state["lr"])
        self.opt_lr.load_state_dict(state["opt_lr"])
