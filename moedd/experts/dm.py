"""Distribution matching (DM; Zhao & Bilen, WACV 2023), run by NoE experts jointly.

Per iteration (algorithms.md §5.1): a new randomly initialised ConvNet with frozen weights
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

from moedd.augment import DSA, DSAParams
from moedd.config import DMExpertConfig
from moedd.device import memory_format_for
from moedd.experts.base import DistillContext, ExpertMethod, frozen_random_net, register_expert
from moedd.moe import expert_dcor_loss


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@register_expert
class DistributionMatching(ExpertMethod):
    """DM experts: match mean embeddings of real and synthetic images under random networks."""

    name = "dm"
    config_cls = DMExpertConfig
    cfg: DMExpertConfig

    def __init__(self, cfg: DMExpertConfig, ctx: DistillContext) -> None:
        super().__init__(cfg, ctx)
        self.dsa = DSA(DSAParams(strategy=cfg.dsa_strategy))

    def init_images(self) -> Tensor:
        ctx, gen = self.ctx, self.ctx.generator(it=-1)
        if self.cfg.init == "real":
            return torch.stack([ctx.sample_real(k, ctx.ipc, gen)[0] for k in range(ctx.noe)])
        shape = (ctx.noe, ctx.num_classes * ctx.ipc, *ctx.image_shape)
        return torch.randn(shape, generator=gen, device=ctx.device)

    def setup(self, syn: Tensor) -> None:
        self.opt = torch.optim.SGD([syn], lr=self.cfg.lr_img, momentum=self.cfg.momentum)

    def embed_pair(self, net: torch.nn.Module, real: Tensor, n_real: int, syn: Tensor, it: int) -> tuple[Tensor, Tensor]:
        """Siamese-augment and embed real (no grad) and synthetic (with grad) images.

        Real and synthetic images of class c receive the same augmentation group and parameters:
        the generator state is replayed so both calls draw identical per-class parameters.
        """
        ctx, c = self.ctx, self.ctx.num_classes
        gen = ctx.generator(it, stream=2)
        state = gen.get_state()
        unit_real = torch.arange(c, device=ctx.device).repeat_interleave(n_real).repeat(ctx.noe)
        unit_syn = torch.arange(c, device=ctx.device).repeat_interleave(ctx.ipc).repeat(ctx.noe)
        cl = memory_format_for(net, ctx.device)
        chunk = self.cfg.real_chunk or (128 if ctx.device.type == "cpu" else len(real))
        with torch.no_grad(), _autocast(ctx.device, self.cfg.bf16):
            aug = self.dsa.siamese(real, unit_real, c, gen).contiguous(memory_format=cl)
            f_real = torch.cat([net.embed(aug[i : i + chunk]).float() for i in range(0, len(aug), chunk)])
        gen.set_state(state)
        with _autocast(ctx.device, self.cfg.bf16):
            f_syn = net.embed(self.dsa.siamese(syn, unit_syn, c, gen).contiguous(memory_format=cl))
        return f_real.float(), f_syn.float()

    def objective(self, syn: Tensor, it: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of iteration ``it`` (differentiable w.r.t. ``syn``) and its parts."""
        ctx, c = self.ctx, self.ctx.num_classes
        net = frozen_random_net(ctx, it)
        gen = ctx.generator(it, stream=3)
        batches = [ctx.sample_real(k, self.cfg.batch_real, gen) for k in range(ctx.noe)]
        n_real = batches[0][1]
        if any(n != n_real for _, n in batches):  # shards of very unequal size: equalise
            n_real = min(n for _, n in batches)
            batches = [(x.view(c, -1, *x.shape[1:])[:, :n_real].flatten(0, 1), n_real) for x, _ in batches]
        real = torch.cat([x for x, _ in batches])
        f_real, f_syn = self.embed_pair(net, real, n_real, syn.flatten(0, 1), it)
        d = f_real.shape[-1]
        mean_real = f_real.view(ctx.noe, c, n_real, d).mean(2)
        f_syn = f_syn.view(ctx.noe, c, ctx.ipc, d)
        per_expert = (mean_real - f_syn.mean(2)).pow(2).sum((1, 2))
        loss = per_expert.sum()
        dcor = expert_dcor_loss(f_syn) if ctx.dcor_weight > 0 else loss.new_zeros(())
        total = loss + ctx.dcor_weight * dcor
        out = {"loss": total.detach(), "match": loss.detach(), "dcor": dcor.detach()}
        out.update({f"match_e{k}": per_expert[k].detach() for k in range(ctx.noe)})
        return total, out

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
