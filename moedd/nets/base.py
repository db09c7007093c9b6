"""What every network module builds on: the registry, the normalisation layers and the shared
conv-trunk shape; a new network is one module of this package that registers an entrypoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from moedd.registry import Registry

NETS = Registry[Callable[..., nn.Module]]("network")
register_net = NETS.register

NORMS = ("instance", "batch", "none")


@runtime_checkable
class NetProtocol(Protocol):
    """What the rest of moedd may rely on for any registered net.

    Attributes:
        classifier: the final linear layer mapping the feature to class logits.
    """

    classifier: nn.Linear

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate feature, flattened to shape (N, D) with D == classifier.in_features."""
        ...

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, num_classes); equals ``classifier(embed(x))``."""
        ...


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build the normalization layer named ``norm`` for a ``channels``-channel feature map.

    Args:
        norm: "instance" (GroupNorm with one group per channel, affine -- the DC/MTT
            "instancenorm", docs/methods.md §ConvNet), "batch" (BatchNorm2d) or "none" (Identity).
        channels: number of feature-map channels.

    Raises:
        ValueError: for any other ``norm``.
    """
    if norm == "instance":
        from moedd.nets.norm import InstanceNorm  # a GroupNorm(C, C) with a faster double backward

        return InstanceNorm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{norm}'; choose from: {', '.join(NORMS)}")


def create_net(
    name: str, num_classes: int, channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Instantiate the registered network ``name``.

    Args:
        name: a registered name, see :func:`list_nets`.
        num_classes: size of the classifier output.
        channels: input image channels.
        image_size: input height == width in pixels (32 for CIFAR).
        **kwargs: extra keywords forwarded to the entrypoint (e.g. ``width`` for ConvNets).

    Raises:
        moedd.registry.UnknownNameError: when ``name`` is not registered; lists the choices.
    """
    factory = NETS.get(name)
    return factory(num_classes=num_classes, channels=channels, image_size=image_size, **kwargs)


def list_nets(pattern: str = "*") -> list[str]:
    """Sorted registered network names matching an fnmatch ``pattern``."""
    return NETS.names(pattern)


# Names used in tables and plots (paper spelling).
DISPLAY_NAMES: dict[str, str] = {
    "convnet3": "ConvNet-3",
    "convnet3_bn": "ConvNet-3-BN",
    "convnet4": "ConvNet-4",
    "alexnet": "AlexNet",
    "alexnet_bn": "AlexNet-BN",
    "vgg11": "VGG11",
    "vgg11_bn": "VGG11-BN",
    "resnet18": "ResNet18",
    "resnet18_bn": "ResNet18-BN",
}



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
