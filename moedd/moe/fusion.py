"""Mixup fusion of the experts' images while a new network trains on them (docs/design.md).

With probability p a training sample x_a (class c, expert e) is mixed with a random sample x_b
of the same class from a *different* expert: x = λ·x_a + (1−λ)·x_b with λ ~ Beta(α, α). The
label is unchanged (same class), so storage stays at the budget and no soft labels are needed.
With one expert there is no partner and fusion is the identity (recorded as such).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class MixupFusion:
    """Samples same-class, cross-expert mixup partners for minibatches of a pooled set.

    Args:
        images: (N, C, H, W) pooled (decoded) images of all experts, on the training device.
        labels: (N,) class of every pooled image.
        experts: (N,) expert index of every pooled image.
        p: probability of mixing a sample.
        alpha: Beta(alpha, alpha) parameter of the mixing weight.
    """

    def __init__(self, images: Tensor, labels: Tensor, experts: Tensor, p: float, alpha: float) -> None:
        self.images, self.labels, self.experts = images, labels, experts
        self.p, self.alpha = p, alpha
        self.noe = int(experts.max()) + 1 if len(experts) else 1
        lab, exp = labels.cpu(), experts.cpu()
        num_classes = int(lab.max()) + 1
        counts = torch.zeros(num_classes, self.noe, dtype=torch.long)
        counts.index_put_((lab, exp), torch.ones_like(lab), accumulate=True)
        # pool[c, e, :counts[c, e]] = indices of class c from expert e (built once, off the hot path)
        pool = torch.zeros(num_classes, self.noe, max(int(counts.max()), 1), dtype=torch.long)
        for c in range(num_classes):
            for e in range(self.noe):
                idx = torch.nonzero((lab == c) & (exp == e)).flatten()
                pool[c, e, : len(idx)] = idx
        self.pool, self.counts = pool.to(labels.device), counts.to(labels.device)
        self._has_partner = bool(((counts > 0).sum(1) > 1).any()) if self.noe > 1 else False

    @property
    def active(self) -> bool:
        """False when fusion cannot do anything (one expert, or p = 0)."""
        return self._has_partner and self.p > 0

    def __call__(self, x: Tensor, idx: Tensor, gen: torch.Generator, rng: np.random.Generator) -> Tensor:
        """Return the batch ``x`` (pooled images ``idx``) mixed with cross-expert same-class partners."""
        return self.mix(x, idx, gen, rng)[0]

    def mix(self, x: Tensor, idx: Tensor, gen: torch.Generator, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`__call__` with the weights and partners: (mixed batch, λ (B, 1, ...) with 1
        where a sample was not mixed, partner indices (B,)), so soft targets can be mixed alike.

        Args:
            x: (B, C, H, W) the batch, i.e. ``images[idx]``.
            idx: (B,) indices of the batch into the pool.
            gen: torch generator on the device (partner choice, whether to mix).
            rng: numpy generator for λ ~ Beta(α, α) (torch's Beta takes no generator).
        """
        if not self.active:
            return x, torch.ones(len(x), *([1] * (x.dim() - 1)), device=x.device), idx
        n, dev = len(idx), x.device
        c, e = self.labels[idx], self.experts[idx]
        partner_e = (e + torch.randint(1, self.noe, (n,), generator=gen, device=dev)) % self.noe
        avail = self.counts[c, partner_e]
        slot = (torch.rand(n, generator=gen, device=dev) * avail).long()
        partner = self.pool[c, partner_e, slot]
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, size=n).astype(np.float32)).to(dev)
        mix = (torch.rand(n, generator=gen, device=dev) < self.p) & (avail > 0)
        lam = torch.where(mix, lam, torch.ones_like(lam)).view(-1, *([1] * (x.dim() - 1)))
        return lam * x + (1 - lam) * self.images[partner], lam, partner
