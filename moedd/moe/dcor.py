"""Squared distance correlation between paired feature sets (Zhen et al., ECCV 2022).

Definition (docs/methods.md §dCor): rows are L2-normalised, pairwise Euclidean distance matrices
are double-centred, and R = dCov²(X,Y) / sqrt(dVar²(X)·dVar²(Y)), which lies in [0, 1] and is 0
for independent representations (in the population limit). MoE-DD minimises it between experts
so that they learn distinct representations.
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


def expert_dcor_loss(features: Tensor) -> Tensor:
    """Diversity term between experts: Σ over classes of the mean over expert pairs of dCor².

    Args:
        features: (NoE, C, n, D) features of each expert's synthetic images, grouped by class;
            row i of expert e is paired with row i of expert e' (same class, same position).

    Returns:
        A scalar; zero when there is a single expert.
    """
    noe = features.shape[0]
    if noe < 2:
        return features.new_zeros(())
    pairs = list(itertools.combinations(range(noe), 2))
    terms = [dcor2(at_least_float32(features[i]), at_least_float32(features[j])).sum() for i, j in pairs]
    return torch.stack(terms).mean()


def diversity_term(features: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """MoE-DD's diversity term for an expert objective: (λ·``expert_dcor_loss`` to add to the
    loss, the dCor itself detached for logging). Zeros, and nothing computed, when λ is 0 or
    there is a single expert.

    Args:
        features: (NoE, C, n, D), as :func:`expert_dcor_loss`.
        weight: λ (``distill.dcor_weight``).
    """
    if weight == 0 or features.shape[0] < 2:
        zero = features.new_zeros(())
        return zero, zero
    dcor = expert_dcor_loss(features)
    return weight * dcor, dcor.detach()
