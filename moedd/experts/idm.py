"""Improved Distribution Matching (IDM; Zhao, Li, Qin & Yu, CVPR 2023), run by NoE experts jointly.

IDM extends DM (``moedd.experts.dm``, docs/methods.md §DM) with three parts (docs/methods.md §IDM,
IDM-repo ``IDM_cifar10.py`` / ``IDM_cifar100.py``):

1. **Partitioning & expansion** P (factor 2): every stored image is a 2x2 mosaic; inside the loss
   (and before evaluation, ``decoding = "multiformation2"``) its four quadrants -- top-left,
   bottom-left, top-right, bottom-right -- are bilinearly upsampled to full size, all with the
   stored label, so IPC stored images act as 4·IPC training images. Initialisation: each stored
   image is a mosaic of four different random real images of its class (from the expert's own
   shard), each bilinearly downscaled to half size.
2. **Model queue** of semi-trained networks instead of DM's fresh random network: the queue
   starts with 3 random networks; at every iteration ``it`` with ``it % net_generate_interval ==
   0`` (including ``it = 0``, as the IDM code) a new random network is pushed and the oldest
   popped beyond ``net_num``. Each iteration ``train_net_num`` distinct queue networks are drawn
   for matching; after the image update ``fetch_net_num`` random queue networks are each trained
   ``model_train_steps`` SGD steps (``net_lr``, ``net_momentum``, ``net_weight_decay``) on random
   batches of ``trained_bs`` real images of all classes, without augmentation. Each network keeps
   its running training accuracy in percent (torchnet ``ClassErrorMeter(accuracy=True)``:
   correct / seen x 100 over every image it was trained on; 0 before its first training step).
3. **Class-aware regularisation**: a cross-entropy term on the expanded, augmented synthetic
   images, weighted by the network's running accuracy.

Loss of matching network θ (eval() mode, parameters frozen), for expert e::

    L_e(θ) = Σ_c  || mean_{x∈R_e,c} ψ_θ(A(x)) − mean_{s∈P(S_e,c)} ψ_θ(A(s)) ||²
                 + λ_ce · acc_θ · CE(f_θ(A(P(S_e,c))), c)

with R_e,c = ``batch_real`` real images of class c from shard e, A = siamese DSA (same group and
parameters for the real and synthetic images of a class), ψ_θ = the net's flattened conv feature
(``net.embed``; 2048-d for ConvNet-3, IDM's ``embed_last=1000``), f_θ = ``classifier ∘ ψ_θ``,
acc_θ in PERCENT (0-100) and CE the mean over the 4·IPC expanded images of the class. MoE-DD adds
``λ_dcor · Σ_c mean_{e<e'} dCor²(ψ(A(P(S_e,c))), ψ(A(P(S_e',c))))`` (``ctx.dcor_weight``,
``moedd.moe.expert_dcor_loss``), like the DM expert. All experts share the matching network(s)
and the augmentation of a step; every expert only ever sees real images of its own shard in the
matching loss.

Hyper-parameters (:class:`IDMConfig`): image SGD lr 0.2, momentum 0.5, 20,000 iterations,
queue net SGD lr 0.01 / momentum 0.9 / weight decay 5e-4 (``--net_decay``), net_num 100,
train_net_num 1, fetch_net_num 2, model_train_steps 10, trained_bs 256, DSA
color_crop_cutout_flip_scale_rotate (IDM-repo argument defaults and ``command.txt``); ce_weight
0.5, batch_real 256, net_generate_interval 30 = the CIFAR-10 IPC-10 row of ``command.txt``
(docs/methods.md §IDM lists the other rows).

The image optimizer: IDM steps ``SGD(lr_img, momentum 0.5)`` on the single tensor of all
synthetic images once PER CLASS (zero_grad, backward of L_c, step, for c = 0..C-1, for each
matching network). This is NOT the same as one joint step on Σ_c L_c when momentum > 0: every
per-class step also moves the rows of the other classes by their momentum buffer (the grad of the
one tensor exists, it is just zero there), and class c's gradient is taken after the momentum
moves of classes 0..c-1 (tests/test_idm.py shows both the equality at momentum 0 and the
difference at 0.5). Because L_c depends only on the rows of class c while the network, real batch
and augmentation are fixed, the C sequential steps have a closed form that needs ONE batched
gradient evaluation: :class:`ClassSequentialSGD` evaluates class c at ``x − lr·S(c)·b`` (S(c) =
μ + ... + μ^c, b the momentum buffer) and then applies the exact result of the C steps. So our
updates equal IDM's per-class loop in exact arithmetic (verified in float64 against a literal
``torch.optim.SGD`` loop in the tests) at the cost of a single forward/backward per network. In
float32 the two evaluate the gradient at points that differ by rounding, and the gradient jumps
where a ReLU input crosses 0: with ~10^6 ReLU inputs per evaluation a rounding-sized change can
cross one, which moves one iteration's images by ~1e-2 (0.6 % of the step at the tests' size).
Any change of kernel path (CPU instruction set, oneDNN version, GPU) does the same, so runs are
bitwise reproducible on one machine and software stack, not across them.

Decisions where the paper and code are silent, and deviations from the IDM code:

* ONE shared queue for all experts (the matching network is shared by every expert, as in the DM
  expert), and queue networks train on the union of the experts' shards, i.e. the whole training
  set. IDM has a single dataset; with NoE = 1 this is exactly IDM. Per-expert queues would cost NoE
  times the network training and make the experts' feature spaces, in which the dCor term
  compares them, differ.
* The accuracy meters are never reset. IDM resets them at each of its evaluation points (every
  ``eval_interval`` = 100 or 500 iterations), a side effect of its logging; we evaluate outside the
  loop, so acc_θ is the accuracy over everything the net was trained on since it was created.
* The queue is capped by popping the oldest nets while it holds more than ``net_num`` (IDM pops
  one when it holds exactly ``net_num``; the same for net_num >= 3, which all its commands use).
* Initialisation draws 4·IPC distinct images per class when the shard's class is that large (else
  image i of the class draw is reused as (i mod n), still four different images per mosaic when
  the class has >= 4); IDM draws the quadrants by four independent ``get_images(c, IPC)`` calls,
  which may repeat an image.
* Batched like the DM expert: all classes and experts go through the network in one forward
  (exact: instance norm, and batch norm in eval() mode, are per sample), siamese augmentation is
  drawn per class in one call, real features are computed in no-grad chunks (128 images on the
  CPU, the whole batch on CUDA). The CE logits are ``classifier(ψ)`` of the same features
  (``forward == classifier ∘ embed`` for every registered net) instead of a second forward.
* Randomness comes from generators seeded by (seed, iteration, stream) and (seed, net index),
  not from the clock (IDM's DSA seeds) or numpy's global RNG, so a resumed run is exact.
* Not implemented: IDM's IPC = 1 special case without ``--aug`` (keep the 2560 lowest-loss real
  images, CE only when misclassified), which none of the published commands use (they all set
  ``--aug``); ``factor = 1`` runs the plain loss above with P = identity. ``aug_num`` is 1 (IDM
  asserts it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from typing import Literal

from pydantic import Field

from moedd.augment import DSA, DSAParams
from moedd.config import DSA_STRATEGY, DSAStrategy, NetTraining
from moedd.device import memory_format_for
from moedd.experts._class_sgd import ClassSequentialSGD
from moedd.experts.base import (
    DistillContext, ExpertMethod, frozen_random_net, mixture_metrics, register_expert, siamese_features,
)
from moedd.synthetic import decode_grouped, mosaic

# generator streams of one iteration (DistillContext.seed_for(it, stream)); all < 97 and distinct
_STREAM_DSA, _STREAM_REAL, _STREAM_PICK, _STREAM_TRAIN = 2, 3, 4, 5
_STREAM_NET = 6  # used with the net's creation index in place of the iteration
_INITIAL_NETS = 3


class IDMConfig(NetTraining):
    """``experts.idm``; defaults = the CIFAR-10 IPC 10 row of docs/methods.md §IDM (the queue
    networks' SGD: :class:`~moedd.config.NetTraining`)."""

    preset: str = "auto"
    """Row of ``presets.idm`` to apply: auto (the prepared data's identity) | cifar10 | cifar100 | none (moedd.params)."""
    iterations: int = Field(20000, ge=0)
    lr_img: float = Field(0.2, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1)
    """Real images per class per iteration (from the expert's own shard)."""
    ce_weight: float = Field(0.5, ge=0)
    """λ_ce of the class-aware CE term; multiplied by the net's running accuracy in PERCENT (as IDM)."""
    net_num: int = Field(100, ge=1)
    """Capacity of the queue of semi-trained networks."""
    net_generate_interval: int = Field(30, ge=1)
    """Iterations between pushing a new random network into the queue."""
    train_net_num: int = Field(1, ge=1)
    """Networks sampled from the queue for matching per iteration."""
    fetch_net_num: int = Field(2, ge=0)
    """Networks of the queue trained on real data after each iteration."""
    model_train_steps: int = Field(10, ge=0)
    trained_bs: int = Field(256, ge=1)
    factor: Literal[1, 2] = 2
    """Partitioning & expansion factor (2 = each stored image decodes into 4 quadrants)."""
    dsa_strategy: DSAStrategy = DSA_STRATEGY


class QueueNet:
    """A network of the model queue, its optimiser and its running training accuracy."""

    def __init__(self, index: int, net: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> None:
        self.index, self.net, self.opt = index, net, opt
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    def accuracy(self) -> Tensor:
        """Running training accuracy in percent (0 before the first training step); no host sync."""
        return torch.where(self.seen > 0, self.correct.double() * 100.0 / self.seen.clamp(min=1).double(), 0.0).float()

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "correct": self.correct.clone(), "seen": self.seen.clone()}


@register_expert
class IDM(ExpertMethod):
    """IDM experts: distribution matching with partition & expansion, a model queue and class-aware CE."""

    name = "idm"
    spreads = True
    config_cls = IDMConfig
    scales = {"smoke": {"iterations": 2, "batch_real": 4, "trained_bs": 16, "model_train_steps": 1},
              "cpu": {"iterations": 50}}
    space = "normalized"
    cfg: IDMConfig

    def __init__(self, cfg: IDMConfig, ctx: DistillContext) -> None:
        super().__init__(cfg, ctx)
        self.dsa = DSA(DSAParams(strategy=cfg.dsa_strategy))
        self.decoding = "multiformation2" if cfg.factor == 2 else "none"  # type: ignore[misc]
        self.queue: list[QueueNet] = []
        self.created = 0

    # ------------------------------------------------------------------ images

    def init_images(self) -> Tensor:
        ctx, gen, c, ipc = self.ctx, self.ctx.generator(it=-1), self.ctx.num_classes, self.ctx.ipc
        if self.cfg.factor == 1:
            return torch.stack([x for x, _ in ctx.sample_real_each(ipc, gen)])
        out = []
        for real, n in ctx.sample_real_each(4 * ipc, gen):
            real = real.view(c, n, *ctx.image_shape)
            # 4·IPC distinct images per class when the class is large enough; else distinct
            # within each mosaic (n >= 4) and reused across mosaics
            pick = torch.arange(4 * ipc, device=real.device) % n
            quads = real[:, pick].view(c * ipc, 4, *ctx.image_shape)
            out.append(mosaic(quads, "bilinear"))
        return torch.stack(out)

    def expand(self, syn: Tensor) -> Tensor:
        """Partition & expansion P: (NoE, C·IPC, ch, H, W) -> (NoE, C, m, ch, H, W), m = factor²·IPC.

        Uses the evaluation decoder, so training sees exactly the images evaluation will use;
        the order within a class is quadrant-major (the same for every expert).
        """
        noe, c, ipc = syn.shape[0], self.ctx.num_classes, self.ctx.ipc
        return decode_grouped(syn.view(noe, c, ipc, *syn.shape[2:]), self.decoding)

    # ------------------------------------------------------------------ model queue

    def _new_net(self) -> QueueNet:
        """A fresh random queue net; its weights depend only on (seed, creation index)."""
        index = self.created
        self.created += 1
        net = frozen_random_net(self.ctx, index, stream=_STREAM_NET)
        return QueueNet(index, net, self.cfg.net_optimizer(net), self.ctx.device)

    def _push(self) -> None:
        self.queue.append(self._new_net())
        while len(self.queue) > self.cfg.net_num:
            self.queue.pop(0)

    def setup(self, syn: Tensor) -> None:
        ctx = self.ctx
        self.opt = ClassSequentialSGD(syn, ctx.num_classes, ctx.ipc, self.cfg.lr_img, self.cfg.momentum)
        self.queue, self.created = [], 0
        for _ in range(_INITIAL_NETS):
            self._push()
        # queue nets learn from the union of the experts' shards = the whole training set
        self._train_images = torch.cat(ctx.shard_images)
        self._train_labels = torch.cat(ctx.shard_labels)

    def _picker(self, it: int) -> torch.Generator:
        """CPU generator for the queue choices of iteration ``it`` (no device sync)."""
        return torch.Generator().manual_seed(self.ctx.seed_for(it, _STREAM_PICK))

    def matching_nets(self, it: int, gen: torch.Generator | None = None) -> list[QueueNet]:
        """The ``train_net_num`` distinct queue nets that match in iteration ``it``."""
        gen = gen if gen is not None else self._picker(it)
        order = torch.randperm(len(self.queue), generator=gen)[: self.cfg.train_net_num]
        return [self.queue[i] for i in order.tolist()]

    def train_queue(self, it: int, gen: torch.Generator) -> None:
        """Train ``fetch_net_num`` random queue nets ``model_train_steps`` steps on real batches."""
        cfg, ctx = self.cfg, self.ctx
        order = torch.randperm(len(self.queue), generator=gen)[: cfg.fetch_net_num].tolist()
        if not order or cfg.model_train_steps == 0:
            return
        dgen = ctx.generator(it, _STREAM_TRAIN)
        n = len(self._train_labels)
        for i in order:
            qn = self.queue[i]
            fmt = memory_format_for(qn.net, ctx.device)
            qn.net.train()
            qn.net.requires_grad_(True)
            for _ in range(cfg.model_train_steps):
                idx = torch.randperm(n, generator=dgen, device=ctx.device)[: cfg.trained_bs]
                x = ctx.normalize(self._train_images[idx]).contiguous(memory_format=fmt)
                y = self._train_labels[idx]
                logits = qn.net(x)
                loss = F.cross_entropy(logits, y)
                qn.opt.zero_grad(set_to_none=True)
                loss.backward()
                qn.opt.step()
                qn.correct += (logits.detach().argmax(1) == y).sum()
                qn.seen += len(y)
            qn.net.requires_grad_(False)

    # ------------------------------------------------------------------ objective

    def net_loss(self, qn: QueueNet, syn: Tensor, gen_real: torch.Generator,
                 gen_dsa: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one matching net at images ``syn`` (differentiable w.r.t. ``syn``).

        Returns:
            total = Σ_e,c [match + ce_weight·acc·CE] + dcor_weight·dcor, and its parts:
            ``match`` (NoE,), ``ce`` (NoE,; unweighted, summed over classes), ``dcor``, ``acc``.
        """
        ctx, c, noe = self.ctx, self.ctx.num_classes, self.ctx.noe
        net = qn.net
        net.eval()
        real, n_real = ctx.sample_real_all(self.cfg.batch_real, gen_real)
        dec = self.expand(syn)  # (NoE, C, m, ...)
        m = dec.shape[2]
        f_real, f_syn = siamese_features(net, self.dsa, ctx, real, n_real, dec.flatten(0, 2), m, gen_dsa)
        d = f_syn.shape[-1]
        mean_real = f_real.view(noe, c, n_real, d).mean(2)
        feats = f_syn.view(noe, c, m, d)
        match = (mean_real - feats.mean(2)).pow(2).sum((1, 2))
        unit_syn = torch.arange(c, device=ctx.device).repeat_interleave(m).repeat(noe)
        ce = F.cross_entropy(net.classifier(f_syn), unit_syn, reduction="none").view(noe, c, m).mean(2).sum(1)
        term, dcor = ctx.diversity(feats)
        acc = qn.accuracy()
        total = match.sum() + self.cfg.ce_weight * acc * ce.sum() + term
        return total, {"match": match, "ce": ce, "dcor": dcor, "acc": acc}

    def _metrics(self, totals: list[Tensor], parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        match = torch.stack([p["match"] for p in parts]).sum(0)
        dcor = torch.stack([p["dcor"] for p in parts]).sum()
        out = mixture_metrics(match, dcor, self.ctx.dcor_weight, torch.stack(totals).sum())
        out.update({
            "ce": torch.stack([p["ce"].sum() for p in parts]).sum().detach(),
            "net_acc": torch.stack([p["acc"] for p in parts]).mean().detach(),
            "queue_size": torch.tensor(float(len(self.queue))),
        })
        return out

    def objective(self, syn: Tensor, it: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of iteration ``it`` at ``syn`` with the current queue (no side effects):
        the same nets, real batches and augmentation as :meth:`step` draws, summed over nets."""
        gen_real, gen_dsa = self.ctx.generator(it, _STREAM_REAL), self.ctx.generator(it, _STREAM_DSA)
        results = [self.net_loss(qn, syn, gen_real, gen_dsa) for qn in self.matching_nets(it)]
        totals = [t for t, _ in results]
        return torch.stack(totals).sum(), self._metrics(totals, [p for _, p in results])

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        """One IDM iteration: maybe push a net, match (C per-class image steps per net), train nets.

        Returns "loss" (total, as evaluated), "match", "ce" (unweighted), "dcor", "net_acc"
        (mean accuracy in percent of the matching nets), "queue_size" and "match_e{k}".
        """
        assert syn is self.opt.param, "step() must get the tensor given to setup()"
        if it % self.cfg.net_generate_interval == 0:
            self._push()
        pick = self._picker(it)
        gen_real, gen_dsa = self.ctx.generator(it, _STREAM_REAL), self.ctx.generator(it, _STREAM_DSA)
        totals, parts = [], []
        for qn in self.matching_nets(it, pick):  # nets one after another, as IDM
            x = self.opt.lookahead().requires_grad_(True)
            total, part = self.net_loss(qn, x, gen_real, gen_dsa)
            (grad,) = torch.autograd.grad(total, x)
            self.opt.step(grad)
            totals.append(total.detach())
            parts.append(part)
        self.train_queue(it, pick)
        return self._metrics(totals, parts)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "created": self.created,
                "queue": [qn.state_dict() for qn in self.queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        queue = []
        for entry in state["queue"]:
            self.created = int(entry["index"])
            qn = self._new_net()
            qn.net.load_state_dict(entry["net"])
            qn.opt.load_state_dict(entry["opt"])
            qn.correct.copy_(entry["correct"])
            qn.seen.copy_(entry["seen"])
            queue.append(qn)
        self.queue, self.created = queue, int(state["created"])
