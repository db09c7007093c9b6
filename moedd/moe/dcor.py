"""Squared distance correlation between paired feature sets (Zhen et al., ECCV 2022), and the
bias-corrected estimator MoE-DD's small per-class sets need.

Definition (docs/methods.md §dCor): rows are L2-normalised, pairwise Euclidean distance matrices
are centred, and R = dCov²(X,Y) / sqrt(dVar²(X)·dVar²(Y)); in the population it lies in [0, 1]
and is 0 exactly for independent representations. MoE-DD minimises it between experts so that
they learn distinct representations.

Two estimators (``distill.dcor_estimator``):

- ``v_statistic``: double centring and means over all n² entries, as in Zhen et al.'s
  ``DC_criterion`` (their batches have a hundred rows or more). At MoE-DD's sizes (n = the images
  per class of one expert, 5 or 10) and feature dimensions in the thousands it saturates: for
  fixed n and growing dimension it tends to 1 even for independent features (Székely & Rizzo,
  J. Multivariate Anal. 117, 2013), so it cannot tell diverse experts from copies
  (docs/results.md §dCor at small n).
- ``bias_corrected`` (default): U-centring (diagonal zero, row/column sums over n − 2, the grand
  sum over (n − 1)(n − 2)) and the inner product Σ_{i≠j} A_ij B_ij / (n(n − 3)) (Székely & Rizzo,
  Ann. Statist. 42, 2014). Its dCov² is unbiased, so R* is near 0 for independent features at any
  n ≥ 4, and 1 for identical ones. R* can be negative (sampling noise around 0); the loss uses
  max(R*, 0), so independent experts are not pushed further. [INFERRED: MoE-DD does not say which
  estimator it uses.]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from moedd.precision import at_least_float32


def _centred_distances(x: Tensor) -> Tensor:
    x = F.normalize(x, dim=-1)
    sq = (x.unsqueeze(-2) - x.unsqueeze(-3)).pow(2).sum(-1)
    d = torch.sqrt(sq + 1e-12)
    return d - d.mean(-1, keepdim=True) - d.mean(-2, keepdim=True) + d.mean((-1, -2), keepdim=True)


def dcor2(x: Tensor, y: Tensor) -> Tensor:
    """Squared distance correlation of paired rows.

    Args:
        x: features (..., n, p); leading dimensions are batched (e.g. one entry per class).
        y: features (..., n, q) with the same leading dims and n; rows of x and y are paired.

    Returns:
        Tensor of shape (...) with values in [0, 1].
    """
    a, b = _centred_distances(x), _centred_distances(y)
    dcov = (a * b).mean((-1, -2))
    dvar_x = (a * a).mean((-1, -2))
    dvar_y = (b * b).mean((-1, -2))
    return dcov / torch.sqrt(dvar_x * dvar_y + 1e-9)


MIN_ROWS_BIAS_CORRECTED = 4
"""U-centring divides by n − 3: the bias-corrected estimator needs at least 4 paired rows."""


def _u_centred_distances(x: Tensor) -> Tensor:
    x = F.normalize(x, dim=-1)
    n = x.shape[-2]
    off = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    sq = (x.unsqueeze(-2) - x.unsqueeze(-3)).pow(2).sum(-1)
    d = torch.sqrt(sq + 1e-12) * off  # the diagonal exactly 0
    row = d.sum(-1, keepdim=True) / (n - 2)
    col = d.sum(-2, keepdim=True) / (n - 2)
    total = d.sum((-1, -2), keepdim=True) / ((n - 1) * (n - 2))
    return (d - row - col + total) * off


def dcor2_bias_corrected(x: Tensor, y: Tensor) -> Tensor:
    """Bias-corrected squared distance correlation R* of paired rows (module docstring).

    Args:
        x: features (..., n, p), n >= 4; leading dimensions are batched.
        y: features (..., n, q), paired with x row by row.

    Returns:
        Tensor of shape (...): near 0 for independent rows (can be negative), 1 for identical ones.
    """
    n = x.shape[-2]
    if n < MIN_ROWS_BIAS_CORRECTED:
        raise ValueError(f"the bias-corrected dCor needs >= {MIN_ROWS_BIAS_CORRECTED} paired rows, got {n}")
    a, b = _u_centred_distances(x), _u_centred_distances(y)
    scale = 1.0 / (n * (n - 3))
    dcov = (a * b).sum((-1, -2)) * scale
    dvar_x = (a * a).sum((-1, -2)) * scale
    dvar_y = (b * b).sum((-1, -2)) * scale
    # The V-statistic's 1e-9 would bias R* at high dimension, where centred distances are small
    # (dVar² ~ 1e-4 and below for 2,048 features): 1e-20 only guards a degenerate (constant) set.
    return dcov / torch.sqrt(dvar_x * dvar_y + 1e-20)


ESTIMATORS = {
    "bias_corrected": lambda x, y: dcor2_bias_corrected(x, y).clamp_min(0.0),
    "v_statistic": dcor2,
}
"""What the diversity term minimises per class, by ``distill.dcor_estimator``."""


def expert_dcor_loss(features: Tensor, estimator: str = "bias_corrected") -> Tensor:
    """Diversity term between experts: Σ over classes of the mean over expert pairs of dCor².

    Args:
        features: (NoE, C, n, D) features of each expert's synthetic images, grouped by class;
            row i of expert e is paired with row i of expert e' (same class, same position).
        estimator: a key of :data:`ESTIMATORS` (``bias_corrected`` is clamped at 0 per class).

    Returns:
        A scalar; zero when there is a single expert.
    """
    noe = features.shape[0]
    if noe < 2:
        return features.new_zeros(())
    fn = ESTIMATORS[estimator]
    pairs = list(itertools.combinations(range(noe), 2))
    terms = [fn(at_least_float32(features[i]), at_least_float32(features[j])).sum() for i, j in pairs]
    return torch.stack(terms).mean()


def diversity_term(features: Tensor, weight: float, estimator: str = "bias_corrected") -> tuple[Tensor, Tensor]:
    """MoE-DD's diversity term for an expert objective: (λ·``expert_dcor_loss`` to add to the
    loss, the same dCor detached for logging). Zeros, and nothing computed, when λ is 0 or
    there is a single expert.

    Args:
        features: (NoE, C, n, D), as :func:`expert_dcor_loss`.
        weight: λ (``distill.dcor_weight``).
        estimator: ``distill.dcor_estimator``.
    """
    if weight == 0 or features.shape[0] < 2:
        zero = features.new_zeros(())
        return zero, zero
    dcor = expert_dcor_loss(features, estimator)
    return weight * dcor, dcor.detach()


def ranked_diversity_term(local: Tensor, weight: float, estimator: str) -> tuple[Tensor, Tensor]:
    """MoE-DD's diversity term when each rank holds some experts' features (k, C, n, D): the
    term over all experts, divided by the world size, to add to this rank's loss, and the term's
    dCor (detached, the same on every rank). Every rank computes the whole term on the gathered
    features; the gather's backward sums the world copies of each expert's gradient, so adding
    1/world of it on each rank gives every expert exactly the gradient of λ·dCor of the joint
    objective (for two ranks bit for bit: halving and summing two equal halves is exact)."""
    import torch.distributed as dist

    from moedd.distributed import gather_experts

    term, dcor = diversity_term(gather_experts(local), weight, estimator)
    return term / dist.get_world_size(), dcor
