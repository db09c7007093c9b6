"""Shared shape of the plain conv nets: a conv trunk, flattened, then one Linear classifier."""

from __future__ import annotations

from torch import Tensor, nn


class TrunkClassifier(nn.Module):
    """``forward(x) = classifier(embed(x))`` with ``embed(x) = features(x).flatten(1)``.

    Subclasses build ``self.features`` (the conv trunk) and ``self.classifier`` (nn.Linear).
    ``embed`` is the feature DM/IDM match and the distance-correlation term compares.
    """

    features: nn.Module
    classifier: nn.Linear

    def embed(self, x: Tensor) -> Tensor:
        """Flattened output of the conv trunk, shape (N, D)."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))
