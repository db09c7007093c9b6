"""ZCA whitening, fitted once on the full training set (MTT's input space).

Math as kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)`` that MTT uses (docs/methods.md §ZCA):
images in [0, 1] (no mean/std normalisation) are flattened to D = ch·H·W; μ is their mean;
Σ = (X−μ)ᵀ(X−μ)/(N−1); Σ = U diag(S) Uᵀ; whitening W = U diag((S+ε)^-1/2) Uᵀ, applied as
(x−μ)W; the inverse is U diag((S+ε)^1/2) Uᵀ (recent kornia), used to map synthetic images back
to pixels for viewing.

Only U, S, μ and ε are stored (W and its inverse are rebuilt on load), in one small file whose
``digest`` identifies the transform: the teachers, the MTT experts and the evaluator check that
they all use the same one. Fitting is deterministic (float64 accumulation, symmetric eigensolver),
so fitting again on the same prepared data gives the same digest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class ZCA:
    """A fitted ZCA transform. ``mean`` (D,), ``eigvecs`` (D, D) float32, ``eigvals`` (D,) float64."""

    mean: Tensor
    eigvecs: Tensor
    eigvals: Tensor
    eps: float
    n_fit: int
    data_digest: str

    def __post_init__(self) -> None:
        u = self.eigvecs.double()
        s = self.eigvals.double().clamp_min(0.0) + self.eps
        self._w = ((u * s.rsqrt()) @ u.T).float()
        self._w_inv = ((u * s.sqrt()) @ u.T).float()
        self._mean = self.mean.float()

    @property
    def digest(self) -> str:
        """Identifies the transform: the data it was fitted on and ε."""
        blob = f"{self.data_digest}:{self.eps!r}:{self.n_fit}:{tuple(self.mean.shape)}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to(self, device: torch.device | str) -> "ZCA":
        self._w, self._w_inv, self._mean = self._w.to(device), self._w_inv.to(device), self._mean.to(device)
        return self

    def apply(self, x01: Tensor, chunk: int = 4096) -> Tensor:
        """Whiten float images in [0, 1]: (N, ch, H, W) -> same shape, ZCA space."""
        flat = x01.reshape(len(x01), -1)
        out = torch.empty_like(flat, dtype=torch.float32)
        w, mu = self._w.to(flat.device), self._mean.to(flat.device)
        for i in range(0, len(flat), chunk):
            out[i:i + chunk] = (flat[i:i + chunk].float() - mu) @ w
        return out.view(x01.shape)

    def apply_u8(self, images: Tensor, chunk: int = 4096) -> Tensor:
        """Whiten uint8 images (N, ch, H, W)."""
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        for i in range(0, len(images), chunk):
            out[i:i + chunk] = self.apply(images[i:i + chunk].float().div_(255.0), chunk)
        return out

    def invert(self, z: Tensor) -> Tensor:
        """Map ZCA-space images back to [0, 1] pixel space (unclamped)."""
        flat = z.reshape(len(z), -1).float()
        return (flat @ self._w_inv.to(z.device) + self._mean.to(z.device)).view(z.shape)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"mean": self.mean, "eigvecs": self.eigvecs, "eigvals": self.eigvals, "eps": self.eps,
                    "n_fit": self.n_fit, "data_digest": self.data_digest, "digest": self.digest}, tmp)
        os.replace(tmp, path)


def load_zca(path: str | Path) -> ZCA:
    """Load a transform written by :meth:`ZCA.save` (checks its digest)."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    zca = ZCA(d["mean"], d["eigvecs"], d["eigvals"], float(d["eps"]), int(d["n_fit"]), str(d["data_digest"]))
    if zca.digest != d["digest"]:
        raise ValueError(f"{path}: ZCA file is inconsistent (digest mismatch); refit it")
    return zca


def fit_zca(images: Tensor, eps: float = 0.1, data_digest: str = "", chunk: int = 2048) -> ZCA:
    """Fit ZCA on uint8 images (N, ch, H, W) of the whole training set (kornia's math).

    The covariance is accumulated in float64 over chunks (float32 products within a chunk), so memory stays at one chunk plus
    the D x D matrix (D = 3072 for CIFAR: 75 MB).
    """
    n = len(images)
    if n < 2:
        raise ValueError("ZCA needs at least two images")
    d = images[0].numel()
    total = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, chunk):
        total += images[i:i + chunk].reshape(-1, d).double().sum(0)
    mean = total / n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = (images[i:i + chunk].reshape(-1, d).double().div_(255.0) - mean / 255.0).float()
        cov += (x.T @ x).double()  # float32 product per chunk (2x faster), float64 sum
    cov /= n - 1
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return ZCA((mean / 255.0).float(), eigvecs.float(), eigvals, float(eps), n, data_digest)
