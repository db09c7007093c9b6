"""Evaluation networks for dataset distillation (algorithms.md §2).

Every architecture lives in its own module as one generic class that takes the normalization
as a keyword; thin entrypoints register fixed configurations under short names (timm style),
so a config or command line picks a net by name via :func:`create_net`.

Conventions shared by all nets (algorithms.md §2):

* ``norm="instance"`` is ``nn.GroupNorm(C, C, affine=True)``, as in the DC/MTT repos -- not
  ``nn.InstanceNorm2d``, which has no affine parameters by default and different state. It is
  built as :class:`moedd.nets.norm.InstanceNorm`, a GroupNorm subclass with the same parameters
  and values whose double backward (gradient matching, MTT unrolls) is analytic.
* ConvNet's convolutions are :class:`moedd.nets.conv.Conv2d` (an ``nn.Conv2d`` with the same
  state) whose double backward on the CPU is three native oneDNN calls, skipping unused terms.
* Every net exposes ``embed(x)`` (the flattened penultimate feature, used by DM/IDM feature
  matching) and a linear ``classifier``, with ``forward(x) == classifier(embed(x))``.
"""

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
            "instancenorm", algorithms.md §2.2), "batch" (BatchNorm2d) or "none" (Identity).
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

# Imported last so the modules find register_net/make_norm defined; importing registers them.
from moedd.nets import alexnet, convnet, resnet, vgg  # noqa: E402,F401

__all__ = [
    "DISPLAY_NAMES",
    "NETS",
    "NORMS",
    "NetProtocol",
    "create_net",
    "list_nets",
    "make_norm",
    "register_net",
]
