"""IDC (Kim et al., "Dataset Condensation via Efficient Synthetic-Data Parameterization",
ICML 2022), run by NoE experts jointly.

Paper and reference: docs/methods.md §IDC (IDC-repo ``condense.py``, ``train.py``, ``augment.py``,
``argument.py``, ``misc/reproduce.py``); DiffAug order: docs/methods.md §DSA.

Parameterisation (multi-formation, factor f = 2). Each stored image S_i lives in [0, 1] pixel
space at full size (H x W). Decoding d(S_i) cuts it into its f² = 4 quadrants and bilinearly
upsamples each back to H x W, all with the label of S_i, so IPC stored images give 4·IPC training
images (evaluator decoder "multiformation2"). Initialisation ("mix"): every stored image is a
2x2 mosaic of 4 random real images of its class, each resized to H/2 x W/2 with
``F.interpolate`` (nearest). Factor 1 ("IDC-I") stores real images (IDC's ``init='random'``).

Objective. For a network θ, class c, a real batch R_c (``batch_real`` images of c) and the
decoded synthetic images D_c = d(S_c) (randomly sub-sampled to ≤ ``batch_syn_max``), with one
shared differentiable augmentation A (siamese: the same parameters for R_c and D_c) applied
after normalising with the dataset mean/std:

    g_real = ∂ CE(θ; A(R_c), c) / ∂W_l,    g_syn = ∂ CE(θ; A(D_c), c) / ∂W_l   (create_graph)
    L_c = Σ_l dist(g_real,l, g_syn,l)

over the conv-weight tensors W_l only (4-D parameters; biases, norm parameters and the
classifier are skipped: IDC's ``bias = fc = False``). ``dist``: "mse" = Σ (a − b)², "l1" =
Σ |a − b|, "cos" = Σ over output channels of 1 − <a_o, b_o> / (|a_o|·|b_o| + 1e-6) (DC's
layer-wise distance). MoE-DD adds λ · Σ_{e<e'} dCor²(ψ(A(D_e,c)), ψ(A(D_e',c))) / #pairs, with ψ
the network's ``embed`` of the augmented decoded synthetic images fed to the matching loss
(same rows across experts: one sub-sample index set per class and step).

Loop. One driver iteration ``it`` = one OUTER iteration of IDC:

1. clamp S to [0, 1]; a fresh, trainable network θ (seeded from (seed, it); ``fix_iter`` 1);
   SGD(net_lr, net_momentum, weight decay net_weight_decay) on all of θ;
2. ``inner_loop`` times:
   (a) for each class c: L = Σ_k L_c(S_k) + λ·dCor_c; one SGD(lr_img, momentum) step on the
       whole image tensor S (as IDC: one optimiser over all classes, stepped once per class);
   (b) ``ceil(n_data / batch_real)`` SGD steps of θ on real minibatches of ``batch_real``
       images, per-sample DiffAug ``net_dsa_strategy`` ("color_crop": IDC removes cutout when
       CutMix is used), then CutMix with probability ``mix_p``: λ ~ Beta(β, β), a box of side
       ratio sqrt(1 − λ) at a uniform centre (clipped) is pasted from a random permutation of
       the batch, loss = r·CE(y) + (1 − r)·CE(y_perm), r = 1 − box area / image area.

Hyper-parameters (:class:`IDCConfig` defaults = CIFAR-10 reproduce settings of the IDC repo):
inner_loop 100, batch_real 64, batch_syn_max 128, momentum 0.5, lr_img = 5e-3 × IPC/10
(``tune_lr_img``; its extra factor (size / dataset base size)² is 1 at IDC's native sizes and is
not applied here), n_data 2000 (IDC uses 500 for CIFAR-100 and SVHN), net SGD 0.01 / 0.9 / 5e-4,
mix_p 0.5, β 1, metric mse, DiffAug "color_crop_cutout" for matching. IDC runs 2000 outer
iterations (niter 2000 × 100 / inner_loop). IPC here is the per-expert IPC (budget / NoE): each
expert's loss is a mean over its own images, so the per-image gradient scales as 1/IPC, which is
what the rule compensates.

Deviations, each on purpose:

* NoE experts share ONE network per outer iteration (needed for the joint dCor term); it trains
  on real data of the union of the experts' shards, i.e. the whole training set when the shards
  partition it (the paper says nothing about experts). Each expert's matching uses real images of
  its own shard only. All experts' real and synthetic images of a class share one augmentation
  parameter set per step (IDC: one set per class; moedd's DM does the same across experts).
* Augmentation uses moedd's DSA ops in IDC's order: flip and color (if listed) always, then one
  geometric op (crop/scale/rotate) drawn per unit, then cutout always -- not DSA mode 'S' (one
  group per call). Parameters come from explicit generators, not re-seeded global RNGs. When
  several geometric ops are listed, network training draws one per sample (IDC: one per call);
  scale/rotate use ``align_corners=True`` (IDC: False). The default strategies list only "crop",
  so neither difference applies to them.
* Randomness: all draws of outer iteration ``it`` come from ``ctx.generator(it, stream)``
  (stream 1 network init, 2 matching, 3 network training) and, for CutMix's Beta draw, box and
  coin (host scalars, as IDC's ``np.random``), a numpy Generator seeded with
  ``ctx.seed_for(it, 4)``. A resumed run replays them exactly; the checkpoint holds S and the
  image optimiser's momentum.
* Real matching batch per class: min(batch_real, smallest class of the shard) distinct images
  (IDC assumes every class has ≥ batch_real). Network training: one fresh permutation of the pool
  per phase (IDC: a fresh shuffle per ``train_epoch``), wrapped when n_data exceeds the pool.
* Only the conv weights are differentiated (IDC differentiates every parameter and then skips
  the rest: the same loss, fewer gradients).
* Quadrant order TL, BL, TR, BR (the evaluator's; IDC: TL, TR, BL, BR): irrelevant to the loss.
* Logged "match" = Σ_k Σ_c L_c averaged over the inner steps (IDC prints the per-class mean);
  "match_e{k}" the same for expert k; "dcor" likewise; "loss" = match + λ·dcor; "net_acc" =
  training accuracy (vs. the unmixed label) over all network steps of the outer iteration.
* The final images are not clamped after the last update (as IDC's saved ``data.pt``).

Batching: IDC's C per-class image steps (momentum on the one image tensor moves every class at
each step) are applied exactly in closed form (:class:`~moedd.experts._class_sgd.ClassSequentialSGD`,
as IDM): every class's loss is taken at the point where the sequential loop would take it, so the
C class losses can be computed in ONE pass. That pass runs the network as C (× NoE) grouped copies
(:class:`~moedd.nets.grouped.GroupedConvNet`): one forward/backward for all classes' real
gradients, one double backward for all synthetic ones, instead of C of each -- fewer, larger
kernels (the per-class loop is launch-bound on a GPU). ``class_chunk`` bounds the classes per pass
(memory); networks that are not instance-norm ConvNets fall back to one class per pass
(``match_pass``). The real batch is min(batch_real, smallest class over all shards) for every
expert (equal group sizes), and the siamese augmentation draws one parameter set per class for the
pass (the same distribution as one draw per class-step).

CUDA graph (``cuda_graph: true``, the default; CUDA only): one inner step is captured and replayed
``inner_loop`` times per outer iteration (``moedd.experts._idc_graph``); CutMix's coin, λ and box
are then drawn on the device (λ ~ U(0, 1): ``mix_beta`` 1), the rest as above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedd.augment import DSA, DSAParams
from moedd.augment.dsa import UnitDraw
from typing import Literal

from pydantic import BaseModel, Field

from moedd._graphs import RunnerSlot
from moedd.config import ConfigError, NetTraining, OptionalDSAStrategy
from moedd.device import memory_format_for
from moedd.experts._class_sgd import ClassSequentialSGD
from moedd.experts._idc_graph import STREAM_MATCH, STREAM_MIX, STREAM_NET, StaticInnerSteps
from moedd.experts.base import DistillContext, ExpertMethod, RunSpec, frozen_random_net, mixture_metrics, register_expert
from moedd.nets.grouped import GroupedConvNet
from moedd.synthetic import decode_grouped, mosaic

_GEOMETRIC = ("crop", "scale", "rotate")


class IDCConfig(NetTraining):
    """``experts.idc``; defaults = the CIFAR reproduce settings of docs/methods.md §IDC (the
    network's SGD: :class:`~moedd.config.NetTraining`)."""

    preset: str = "auto"
    """Row of ``presets.idc`` to apply: auto (the prepared data's identity) | cifar10 | cifar100 | none (moedd.params)."""
    iterations: int = Field(2000, ge=0)
    """Outer iterations (a fresh network each)."""
    inner_loop: int = Field(100, ge=1)
    """Matching steps per outer iteration, each followed by network training on real data."""
    batch_real: int = Field(64, ge=1)
    batch_syn_max: int = Field(128, ge=1)
    lr_img: float | None = Field(None, gt=0)
    """None = 5e-3 x IPC/10 (IDC's tune_lr_img for 32 px)."""
    momentum: float = Field(0.5, ge=0, lt=1)
    n_data: int = Field(2000, ge=1)
    """Real samples the network trains on between matchings (CutMix + DSA)."""
    mix_p: float = Field(0.5, ge=0, le=1)
    mix_beta: float = Field(1.0, gt=0)
    factor: Literal[1, 2] = 2
    """Multi-formation factor (2 = each stored image decodes into 4 quadrants)."""
    match_dsa_strategy: OptionalDSAStrategy = "color_crop_cutout"
    net_dsa_strategy: OptionalDSAStrategy = "color_crop"
    metric: Literal["mse", "l1", "cos"] = "mse"
    match_pass: Literal["auto", "grouped", "per_class"] = "auto"
    """How the class losses of a matching phase are computed (same result either way; speed and
    memory only): "grouped" = many classes per pass through grouped copies of the network (fewer,
    larger kernels); "per_class" = one class per pass (least memory); "auto" = grouped where the
    grouped copies cover the net, per-class otherwise. Measured in benchmarks/README.md."""
    class_chunk: int | None = Field(10, ge=1)
    """Classes whose gradients are matched in one grouped pass (None = all). The pass holds
    NoE x class_chunk x (batch_real + decoded images) activations, so the default keeps CIFAR-100's
    100 classes at CIFAR-10's memory (10 passes); raise it on a large GPU, lower it if short."""
    cuda_graph: bool = True
    """On a CUDA device, capture one inner step (matching phase and network update) as a CUDA
    graph and replay it ``inner_loop`` times per outer iteration (``moedd.experts._idc_graph``):
    one launch instead of thousands (H200: 5.2x the reference per inner step, eager 1.8x;
    docs/results.md). CutMix's coin, λ and box are then drawn on the device (needs ``mix_beta``
    1, i.e. λ ~ U(0, 1)), another random stream than eager, so a CUDA run and a CPU run of the
    same seed differ in their draws. No effect on a CPU. ``false`` gives the eager path on CUDA."""


# ---------------------------------------------------------------- building blocks


def conv_weights(net: nn.Module) -> list[Tensor]:
    """The parameters IDC matches: conv-weight tensors (4-D); biases, norms and the FC are skipped."""
    return [p for p in net.parameters() if p.dim() == 4]


def gradient_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor], metric: str = "mse") -> Tensor:
    """Σ over tensors of dist(g_real, g_syn): "mse" Σ(a−b)², "l1" Σ|a−b|, "cos" Σ_out (1 − cos)."""
    return grouped_gradient_distance(g_real, g_syn, 1, metric)[0]


def grouped_gradient_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor], groups: int,
                              metric: str = "mse") -> Tensor:
    """:func:`gradient_distance` of G groups at once: tensors (G·out, …) -> distances (G,).

    "mse" Σ(a−b)², "l1" Σ|a−b|, "cos" Σ over output channels of (1 − cos), each per group."""
    total = None
    for a, b in zip(g_real, g_syn, strict=True):
        if metric == "mse":
            t = (a - b).pow(2).reshape(groups, -1).sum(1)
        elif metric == "l1":
            t = (a - b).abs().reshape(groups, -1).sum(1)
        elif metric == "cos":
            a2, b2 = a.flatten(1), b.flatten(1)
            cos = (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + 1e-6)
            t = (1 - cos).view(groups, -1).sum(1)
        else:
            raise ValueError(f"unknown gradient-matching metric {metric!r} (mse, l1, cos)")
        total = t if total is None else total + t
    assert total is not None
    return total


def cutmix(x: Tensor, y: Tensor, beta: float, rng: np.random.Generator,
           gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """CutMix (Yun et al. 2019) as in IDC's network update.

    Args:
        x: (B, ch, H, W) batch; y: (B,) labels.
        beta: λ ~ Beta(beta, beta).
        rng: host RNG for λ and the box centre (host scalars: slicing without a device sync).
        gen: device RNG for the partner permutation.

    Returns:
        The mixed batch (a new tensor), the partners' labels and r = 1 − box area / image area,
        the weight of CE(y) (the partners' CE gets 1 − r).
    """
    rows, cols = x.shape[-2], x.shape[-1]
    lam = float(rng.beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    cut_r, cut_c = int(rows * cut), int(cols * cut)
    cr, cc = int(rng.integers(rows)), int(rng.integers(cols))
    r0, r1 = min(max(cr - cut_r // 2, 0), rows), min(max(cr + cut_r // 2, 0), rows)
    c0, c1 = min(max(cc - cut_c // 2, 0), cols), min(max(cc + cut_c // 2, 0), cols)
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    out = x.clone()
    out[:, :, r0:r1, c0:c1] = x[perm, :, r0:r1, c0:c1]
    ratio = 1.0 - (r1 - r0) * (c1 - c0) / (rows * cols)
    return out, y[perm], ratio


def cutmix_box(rows: int, cols: int, lam: Tensor, centre: Tensor, on: Tensor) -> Tensor:
    """CutMix's box as a (rows, cols) bool mask from device scalars, by :func:`cutmix`'s rule.

    Args:
        lam: λ (0-dim); the box side ratio is sqrt(1 − λ), truncated to pixels.
        centre: (2,) long, the box centre (row, column).
        on: (0-dim bool) False gives an empty box (no mixing).
    """
    cut = (1.0 - lam).sqrt()
    half_r, half_c = (rows * cut).floor().long() // 2, (cols * cut).floor().long() // 2
    r0, r1 = (centre[0] - half_r).clamp(0, rows), (centre[0] + half_r).clamp(0, rows)
    c0, c1 = (centre[1] - half_c).clamp(0, cols), (centre[1] + half_c).clamp(0, cols)
    r = torch.arange(rows, device=lam.device)
    c = torch.arange(cols, device=lam.device)
    return ((r >= r0) & (r < r1))[:, None] & ((c >= c0) & (c < c1))[None, :] & on


def cutmix_static(x: Tensor, y: Tensor, mix_p: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cutmix` with its coin, λ and box drawn on the device (λ ~ Beta(1, 1) = U(0, 1)):
    the same kernels whatever the draw, for code captured in a CUDA graph.

    Returns:
        The batch (mixed when the coin < ``mix_p``, else ``x`` itself, exactly), the partners'
        labels and r (a 0-dim tensor; 1 without mixing, so r·CE(y) + (1 − r)·CE(y_perm) is CE(y)).
    """
    rows, cols = x.shape[-2], x.shape[-1]
    u = torch.rand(2, generator=gen, device=x.device)  # coin, λ
    centre = torch.stack([torch.randint(rows, (), generator=gen, device=x.device),
                          torch.randint(cols, (), generator=gen, device=x.device)])
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    box = cutmix_box(rows, cols, u[1], centre, u[0] < mix_p)
    out = torch.where(box, x.index_select(0, perm), x)
    ratio = 1.0 - box.sum().to(x.dtype) / (rows * cols)
    return out, y.index_select(0, perm), ratio


class IDCAugment:
    """IDC's DiffAug order on moedd's DSA ops: flip, color (always), one geometric op, cutout.

    Each stage draws its parameters per *unit* (``DSA.siamese``): unit = class for the siamese
    matching augmentation, unit = sample for network training (IDC's ``batch=False``). The
    strategy "none" augments nothing.
    """

    def __init__(self, strategy: str) -> None:
        groups = () if strategy == "none" else DSAParams(strategy=strategy).groups  # validates the names
        stages = [g for g in ("flip", "color") if g in groups]
        geo = [g for g in groups if g in _GEOMETRIC]
        if geo:
            stages.append("_".join(geo))
        if "cutout" in groups:
            stages.append("cutout")
        self.stages = [DSA(DSAParams(strategy=s)) for s in stages]

    def __call__(self, x: Tensor, unit: Tensor, n_units: int, gen: torch.Generator, static: bool = False) -> Tensor:
        return self.apply(x, unit, self.draw(n_units, x, gen), static)

    def draw(self, n_units: int, like: Tensor, gen: torch.Generator) -> list[UnitDraw]:
        """Every stage's draw for ``n_units`` units (the same random stream as ``__call__``)."""
        return [stage.draw_units(n_units, like, gen) for stage in self.stages]

    def apply(self, x: Tensor, unit: Tensor, draws: list[UnitDraw], static: bool = False) -> Tensor:
        """Applies :meth:`draw`'s draws; ``static``: no host decision (``DSA.apply_units``)."""
        for stage, d in zip(self.stages, draws, strict=True):
            x = stage.apply_units(x, unit, d, static)
        return x


# ---------------------------------------------------------------- the expert method


@register_expert
class IDC(ExpertMethod):
    """IDC experts: gradient matching of multi-formation synthetic images on a trained network."""

    name = "idc"
    spreads = True
    config_cls = IDCConfig
    scales = {"smoke": {"iterations": 2, "inner_loop": 2, "batch_real": 4, "n_data": 16},
              "cpu": {"iterations": 3}}
    space = "pixel"
    decoding = "multiformation2"
    cfg: IDCConfig

    @classmethod
    def calibration_probe(cls, cfg: BaseModel) -> tuple[BaseModel, float]:
        """An outer iteration is ``inner_loop`` alike inner steps (plus a fresh network): time 2."""
        inner = cfg.inner_loop  # type: ignore[attr-defined]
        probe = cfg.model_copy(update={"inner_loop": min(inner, 2)})
        return probe, inner / min(inner, 2)

    def __init__(self, cfg: IDCConfig, ctx: DistillContext) -> None:
        super().__init__(cfg, ctx)
        self.decoding = "multiformation2" if cfg.factor == 2 else "none"
        _, h, w = ctx.image_shape
        if cfg.factor == 2 and (h % 2 or w % 2):
            raise ValueError(f"IDC factor 2 needs an even image size, got {h}x{w}")
        self.match_aug = IDCAugment(cfg.match_dsa_strategy)
        self.net_aug = IDCAugment(cfg.net_dsa_strategy)
        # class ids on the device once: a host list copied per pass would sync a GPU's stream
        self.class_ids = torch.arange(ctx.num_classes, device=ctx.device)
        # not on ranks: a capture that fails on one rank only would leave the ranks running
        # different numbers of collectives (eager there, replays elsewhere)
        self.graphs = RunnerSlot(cfg.cuda_graph and not ctx.ranked,
                                 lambda syn: StaticInnerSteps(self, syn, capture=True), "IDC")
        if ctx.total_noe == 1:
            self.pool_images, self.pool_labels = ctx.shard_images[0], ctx.shard_labels[0]
        else:  # the shared network trains on the union of the experts' shards
            self.pool_images = torch.cat(ctx.shard_images)
            self.pool_labels = torch.cat(ctx.shard_labels)

    @classmethod
    def check_inputs(cls, cfg: IDCConfig, spec: RunSpec) -> None:  # type: ignore[override]
        if cfg.cuda_graph and cfg.mix_beta != 1.0 and spec.device.type == "cuda":
            raise ConfigError(f"experts.idc.cuda_graph (the CUDA default) draws CutMix's λ on the device as U(0, 1), "
                              f"i.e. mix_beta 1; got mix_beta {cfg.mix_beta} (set experts.idc.cuda_graph=false)")

    @property
    def lr_img(self) -> float:
        """cfg.lr_img, or IDC's ``tune_lr_img`` for 32 px: 5e-3 × IPC/10 (per-expert IPC)."""
        if self.cfg.lr_img is not None:
            return self.cfg.lr_img
        return 5e-3 * self.ctx.ipc / 10

    # ------------------------------------------------------------ data

    def decode(self, images: Tensor) -> Tensor:
        """Multi-formation decoding of (..., n, ch, H, W) -> (..., f²·n, ch, H, W), quadrant-major:
        the evaluator's decoder (quadrants TL, BL, TR, BR, bilinear); factor 1 is the identity."""
        return images if self.decoding == "none" else decode_grouped(images, self.decoding)

    def init_images(self) -> Tensor:
        ctx, f = self.ctx, self.cfg.factor
        gen = ctx.generator(it=-1)
        c, ipc, shape = ctx.num_classes, ctx.ipc, ctx.image_shape
        out = []
        for k, idx in enumerate(ctx.sample_indices_each(f * f * ipc, gen, repeat=True)):  # (C, f²·IPC)
            x = ctx.pixels(k, idx.flatten()).view(c, f * f, ipc, *shape)
            if f == 1:
                out.append(x.flatten(0, 2))
            else:  # part a·2 + b goes to block row a, column b (IDC's init='mix'): TL, TR, BL, BR
                quads = x[:, [0, 2, 1, 3]].transpose(1, 2).reshape(c * ipc, 4, *shape)  # decoder order
                out.append(mosaic(quads, "nearest"))
        return torch.stack(out)

    def image_lr(self) -> float | None:
        """The IPC-scaled rate (``lr_img`` None = 5e-3 x IPC/10)."""
        return float(self.lr_img)

    def setup(self, syn: Tensor) -> None:
        self.opt = ClassSequentialSGD(syn, self.ctx.num_classes, self.ctx.ipc, self.lr_img, self.cfg.momentum)

    def fresh_net(self, it: int) -> nn.Module:
        """The network of outer iteration ``it``: seeded init (stream 1), trainable."""
        return frozen_random_net(self.ctx, it, stream=1).requires_grad_(True)

    # ------------------------------------------------------------ matching

    def match_class(self, net: nn.Module, syn: Tensor, c: int, real_idx: Sequence[Tensor],
                    gen: torch.Generator, static: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The differentiable loss of class c for all experts.

        Args:
            net: the current network (its conv weights are differentiated).
            syn: (NoE, C·IPC, ch, H, W) stored images in [0, 1].
            c: the class.
            real_idx: per expert, shard-local indices of its real batch of class c.
            gen: device RNG (syn sub-sample, augmentation).
            static: no host decision in the augmentation (for a captured CUDA graph).

        Returns:
            total = Σ_k L_c,k + λ·dCor_c, the per-expert losses (NoE,) and dCor_c (detached).
        """
        ctx, cfg = self.ctx, self.cfg
        dev, ipc = ctx.device, ctx.ipc
        cl = memory_format_for(net, dev)
        weights = conv_weights(net)
        dec = self.decode(syn[:, c * ipc:(c + 1) * ipc])  # (NoE, f²·IPC, ch, H, W)
        m = dec.shape[1]
        if m > cfg.batch_syn_max:  # one sub-sample for all experts: rows stay paired for dCor
            keep = torch.randperm(m, generator=gen, device=dev)[: cfg.batch_syn_max]
            dec, m = dec.index_select(1, keep), cfg.batch_syn_max
        syn_x = ctx.normalize_pixels(dec.flatten(0, 1))
        real_x = torch.cat([ctx.normalize(ctx.images(k)[i]) for k, i in enumerate(real_idx)])
        draws = self.match_aug.draw(1, syn_x, gen)  # siamese: real and syn share one draw
        with torch.no_grad():
            real_x = self.match_aug.apply(real_x, real_x.new_zeros(len(real_x), dtype=torch.long), draws, static)
        syn_x = self.match_aug.apply(syn_x, syn_x.new_zeros(len(syn_x), dtype=torch.long), draws, static)
        real_x, syn_x = real_x.contiguous(memory_format=cl), syn_x.contiguous(memory_format=cl)
        y_syn = torch.full((m,), c, dtype=torch.long, device=dev)
        losses, feats, start = [], [], 0
        for k, idx in enumerate(real_idx):
            n = len(idx)
            xr = real_x[start:start + n]
            start += n
            y_real = torch.full((n,), c, dtype=torch.long, device=dev)
            g_real = torch.autograd.grad(F.cross_entropy(net(xr), y_real), weights)
            f = net.embed(syn_x[k * m:(k + 1) * m])
            g_syn = torch.autograd.grad(F.cross_entropy(net.classifier(f), y_syn), weights, create_graph=True)
            losses.append(gradient_distance(g_real, g_syn, cfg.metric))
            feats.append(f)
        per_expert = torch.stack(losses)
        term, dcor = ctx.diversity(torch.stack(feats).unsqueeze(1))
        return per_expert.sum() + term, per_expert.detach(), dcor

    def match_classes(self, grouped: GroupedConvNet, syn: Tensor, classes: Sequence[int], draws: Sequence[Tensor],
                      gen: torch.Generator, static: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The differentiable loss of several classes for all experts, in one grouped pass.

        Args:
            grouped: the current network as grouped copies.
            syn: (NoE, C·IPC, ch, H, W) stored images in [0, 1] (the look-ahead point).
            classes: the classes of this pass (consecutive ids).
            draws: per expert, (C, n) shard-local indices of its real batches.
            gen: device RNG (syn sub-sample, augmentation).
            static: no host decision in the augmentation (for a captured CUDA graph).

        Returns:
            total = Σ_c Σ_k L_c,k + λ·Σ_c dCor_c, the losses (len(classes), NoE) and Σ_c dCor_c
            (both detached).
        """
        ctx, cfg = self.ctx, self.cfg
        dev, ipc, noe, cc, shape = ctx.device, ctx.ipc, ctx.noe, len(classes), ctx.image_shape
        n = draws[0].shape[1]
        rows = slice(classes[0], classes[-1] + 1)  # consecutive ids (a host list would be copied to the device)
        real_x = torch.cat([ctx.normalize(ctx.images(k)[d[rows].flatten()]) for k, d in enumerate(draws)])
        dec = torch.stack([self.decode(syn[:, c * ipc:(c + 1) * ipc]) for c in classes], 1)  # (NoE, cc, m, …)
        m = dec.shape[2]
        if m > cfg.batch_syn_max:  # one sub-sample per class for all experts: rows stay paired for dCor
            keep = [torch.randperm(m, generator=gen, device=dev)[: cfg.batch_syn_max] for _ in classes]
            dec, m = torch.stack([dec[:, j].index_select(1, keep[j]) for j in range(cc)], 1), cfg.batch_syn_max
        syn_x = ctx.normalize_pixels(dec.flatten(0, 2))
        units = torch.arange(cc, device=dev)
        aug = self.match_aug.draw(cc, syn_x, gen)  # siamese: real and syn of a class share one draw
        with torch.no_grad():
            real_x = self.match_aug.apply(real_x, units.repeat_interleave(n).repeat(noe), aug, static)
        syn_x = self.match_aug.apply(syn_x, units.repeat_interleave(m).repeat(noe), aug, static)
        groups = noe * cc  # group k·cc + j: expert k, class classes[j]
        labels = self.class_ids[classes[0]:classes[-1] + 1].repeat(noe)  # classes: consecutive ids
        weights = grouped.replicate(groups)
        logits, _ = grouped.forward(real_x.view(groups, n, *shape), weights)
        g_real = torch.autograd.grad(grouped.group_losses(logits, labels).sum(), weights)
        logits, feats = grouped.forward(syn_x.view(groups, m, *shape), weights)
        g_syn = torch.autograd.grad(grouped.group_losses(logits, labels).sum(), weights, create_graph=True)
        dist = grouped_gradient_distance(g_real, g_syn, groups, cfg.metric).view(noe, cc)
        term, dcor = ctx.diversity(feats.view(noe, cc, m, -1))
        return dist.sum() + term, dist.detach().t(), dcor

    def match_phase(self, net: nn.Module, syn: Tensor, gen: torch.Generator,
                    static: bool = False) -> tuple[Tensor, Tensor]:
        """One matching phase: every class's loss and its image step, IDC's C sequential steps
        applied in closed form (the losses are taken where the sequential loop takes them).
        ``static``: no host decision (for a captured CUDA graph; needs the grouped pass).

        Returns:
            matching losses per class and expert (C, NoE) and dCor summed over classes (detached).
        """
        ctx, cfg = self.ctx, self.cfg
        n = min(cfg.batch_real, *ctx.min_counts)
        draws = ctx.sample_indices_each(n, gen, repeat=True)
        x = self.opt.lookahead().requires_grad_(True)
        want = cfg.match_pass in ("grouped", "auto")
        grouped = GroupedConvNet(net) if want and GroupedConvNet.supports(net) else None
        chunk = (cfg.class_chunk or ctx.num_classes) if grouped is not None else 1
        grad = torch.zeros_like(x)
        per_class = torch.zeros(ctx.num_classes, ctx.noe, device=ctx.device)
        dcor = torch.zeros((), device=ctx.device)
        for c0 in range(0, ctx.num_classes, chunk):
            classes = list(range(c0, min(ctx.num_classes, c0 + chunk)))
            if grouped is not None:
                total, pc, dc = self.match_classes(grouped, x, classes, draws, gen, static)
            else:  # one class per pass (match_pass per_class; nets GroupedConvNet does not cover)
                total, pe, dc = self.match_class(net, x, classes[0], [d[classes[0]] for d in draws], gen, static)
                pc = pe.unsqueeze(0)
            (g,) = torch.autograd.grad(total, x)
            grad += g
            per_class[c0:c0 + len(classes)] = pc
            dcor += dc
        self.opt.step(grad)
        return per_class, dcor

    # ------------------------------------------------------------ network update

    def train_net(self, net: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                  rng: np.random.Generator | None, static_mix: torch.Generator | None = None) -> tuple[Tensor, int]:
        """``ceil(n_data / batch_real)`` SGD steps on real data (DiffAug per sample + CutMix).

        Args:
            rng: host RNG of CutMix's coin, λ and box (IDC's ``np.random``).
            static_mix: instead of ``rng``, a device RNG for them (:func:`cutmix_static`, λ ~
                U(0, 1)) and an augmentation without host decisions: the same kernels at every
                step, for a captured CUDA graph.

        Returns:
            correctly classified samples (a device tensor: no sync) and samples seen.
        """
        cfg, dev = self.cfg, self.ctx.device
        b, pool = cfg.batch_real, len(self.pool_labels)
        steps = math.ceil(cfg.n_data / b)
        need = steps * b
        order = torch.cat([torch.randperm(pool, generator=gen, device=dev)
                           for _ in range(math.ceil(need / pool))])[:need]
        unit = torch.arange(b, device=dev)
        cl = memory_format_for(net, dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]
            y = self.pool_labels[idx]
            with torch.no_grad():
                x = self.net_aug(self.ctx.normalize(self.pool_images[idx]), unit, b, gen, static_mix is not None)
            y_b: Tensor | None = None
            r: float | Tensor = 1.0
            if static_mix is not None:
                x, y_b, r = cutmix_static(x, y, cfg.mix_p, static_mix)
            elif rng is not None and rng.random() < cfg.mix_p:
                x, y_b, r = cutmix(x, y, cfg.mix_beta, rng, gen)
            out = net(x.contiguous(memory_format=cl))
            loss = F.cross_entropy(out, y)
            if y_b is not None:
                loss = r * loss + (1.0 - r) * F.cross_entropy(out, y_b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += (out.detach().argmax(1) == y).sum()
        return correct, need

    # ------------------------------------------------------------ one outer iteration

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        ctx, cfg = self.ctx, self.cfg
        static = self.graphs.get(syn)
        if static is not None:
            out = self._static_step(static, syn, it)
            if out is not None:
                return out
        with torch.no_grad():
            syn.clamp_(0.0, 1.0)
        net = self.fresh_net(it)
        net_opt = cfg.net_optimizer(net)
        gen_match, gen_net = ctx.generator(it, STREAM_MATCH), ctx.generator(it, STREAM_NET)
        rng = np.random.default_rng(ctx.seed_for(it, STREAM_MIX))
        per_class = torch.zeros(ctx.num_classes, ctx.noe, device=ctx.device)
        dcor = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), dtype=torch.long, device=ctx.device)
        seen = 0
        for _ in range(cfg.inner_loop):
            pc, dc = self.match_phase(net, syn, gen_match)
            per_class += pc
            dcor += dc
            ok, n = self.train_net(net, net_opt, gen_net, rng)
            correct += ok
            seen += n
        return self._summary(per_class, dcor, correct, seen)

    def _summary(self, per_class: Tensor, dcor: Tensor, correct: Tensor, seen: int) -> dict[str, Tensor]:
        """The logged metrics of an outer iteration from its sums over the inner steps (new tensors)."""
        ctx, cfg = self.ctx, self.cfg
        per_class = per_class / cfg.inner_loop
        dcor = dcor / cfg.inner_loop
        out = mixture_metrics(per_class.sum(0), dcor, ctx.dcor_share)
        out["net_acc"] = correct.float() / max(seen, 1)
        # IDC's own diagnostic: the matching loss of every class (summed over experts)
        out.update({f"match_c{c}": v for c, v in enumerate(per_class.sum(1))})
        if cfg.cuda_graph:  # 1 when this outer iteration replayed the graph (0: eager, e.g. on a CPU)
            out["cuda_graph"] = torch.tensor(float(self.graphs.replaying))
        return out

    # ------------------------------------------------------------ CUDA graph

    def _static_step(self, static: StaticInnerSteps, syn: Tensor, it: int) -> dict[str, Tensor] | None:
        """Outer iteration ``it`` through ``static`` (graph replays); None when the graph cannot be
        captured (warned once; nothing was changed, and the run goes on eagerly)."""
        with torch.no_grad():
            syn.clamp_(0.0, 1.0)
        static.begin(it)
        for j in range(self.cfg.inner_loop):
            try:
                static.step()
            except (RuntimeError, AttributeError) as err:
                if static.graph is not None or not static.capture:
                    raise  # a failed replay (or eager body): not a capture problem
                self.graphs.fail(err)
                return None
        return self._summary(static.per_class, static.dcor, static.correct, static.seen_per_step * self.cfg.inner_loop)

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opt = state["opt"]
        if "momentum_buffer" not in opt:  # a checkpoint of torch.optim.SGD (before the closed form)
            buf = opt.get("state", {}).get(0, {}).get("momentum_buffer")
            opt = {"momentum_buffer": buf if buf is not None else torch.zeros_like(self.opt.buf)}
        self.opt.load_state_dict(opt)
