"""Distribution matching (DM; Zhao & Bilen, WACV 2023), run by NoE experts jointly.

Per iteration (docs/methods.md §DM): a new randomly initialised ConvNet with frozen weights
embeds real images of class c (``batch_real`` from the expert's own shard) and the expert's
synthetic images of class c, both through the *same* differentiable siamese augmentation; the
loss is Σ_c ||mean ψ(A(R_c)) − mean ψ(A(S_c))||², followed by one SGD(momentum 0.5) step on
all synthetic images. MoE-DD adds λ · Σ_c mean_{e<e'} dCor²(ψ(S_e,c), ψ(S_e',c)).

Deviation from the reference loop, for speed only (the loss is the same): all classes and all
experts go through the network in one batched forward (instance norm is per sample, so this is
exact for the default ConvNet-3), with siamese augmentation drawn per class in one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from typing import Literal

from pydantic import Field

from moedd.augment import DSA, DSAParams
from moedd.config import DSA_STRATEGY, DSAStrategy, Section
from moedd.experts.base import (
    DistillContext, ExpertMethod, frozen_random_net, mixture_metrics, register_expert, siamese_features,
)


class DMConfig(Section):
    """``experts.dm``: distribution matching; defaults from docs/methods.md §DM."""

    iterations: int = Field(20000, ge=0)
    lr_img: float = Field(1.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1)
    """Real images per class per iteration (drawn from the expert's own shard)."""
    init: Literal["real", "noise"] = "real"
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    bf16: bool = False
    """Run the network forward under bfloat16 autocast (faster on CPUs/GPUs that have it)."""
    real_chunk: int = Field(0, ge=0)
    """Images per no-grad forward of the real batch (speed/memory only); 0 = auto: 128 on CPU
    (keeps activations cache- and allocator-friendly), the whole batch on CUDA."""


@register_expert
class DistributionMatching(ExpertMethod):
    """DM experts: match mean embeddings of real and synthetic images under random networks."""

    name = "dm"
    config_cls = DMConfig
    spreads = True
    scales = {"smoke": {"iterations": 3, "batch_real": 8},
              "cpu": {"iterations": 400, "batch_real": 128}}
    cfg: DMConfig

    def __init__(self, cfg: DMConfig, ctx: DistillContext) -> None:
        super().__init__(cfg, ctx)
        self.dsa = DSA(DSAParams(strategy=cfg.dsa_strategy))

    def init_images(self) -> Tensor:
        ctx, gen = self.ctx, self.ctx.generator(it=-1)
        if self.cfg.init == "real":
            return torch.stack([x for x, _ in ctx.sample_real_each(ctx.ipc, gen)])
        shape = (ctx.total_noe, ctx.num_classes * ctx.ipc, *ctx.image_shape)
        return torch.randn(shape, generator=gen, device=ctx.device)[list(ctx.experts)]

    def setup(self, syn: Tensor) -> None:
        self.opt = torch.optim.SGD([syn], lr=self.cfg.lr_img, momentum=self.cfg.momentum)

    def objective(self, syn: Tensor, it: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of iteration ``it`` (differentiable w.r.t. ``syn``) and its parts."""
        ctx, c = self.ctx, self.ctx.num_classes
        net = frozen_random_net(ctx, it)
        real, n_real = ctx.sample_real_all(self.cfg.batch_real, ctx.generator(it, stream=3))
        f_real, f_syn = siamese_features(net, self.dsa, ctx, real, n_real, syn.flatten(0, 1), ctx.ipc,
                                         ctx.generator(it, stream=2), self.cfg.real_chunk, self.cfg.bf16)
        d = f_real.shape[-1]
        mean_real = f_real.view(ctx.noe, c, n_real, d).mean(2)
        f_syn = f_syn.view(ctx.noe, c, ctx.ipc, d)
        per_expert = (mean_real - f_syn.mean(2)).pow(2).sum((1, 2))
        term, dcor = ctx.diversity(f_syn)
        total = per_expert.sum() + term
        return total, mixture_metrics(per_expert, dcor, ctx.dcor_weight, total)

    def step(self, syn: Tensor, it: int) -> Mapping[str, Tensor]:
        total, out = self.objective(syn, it)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
