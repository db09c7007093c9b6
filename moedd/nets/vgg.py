"""VGG11 as used in dataset-distillation evaluation (docs/methods.md §VGG11).

Config [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], each number a Conv3x3(pad 1,
bias) -> norm -> ReLU, M a 2x2 max-pool. A 32 px input ends at 1x1x512 and feeds a single
Linear(512, C) -- no VGG fully-connected stack. The reference code's kernel-1 AvgPool2d is a
no-op and is omitted.
"""

from __future__ import annotations

from torch import nn

from moedd.nets.base import TrunkClassifier, make_norm, register_net
from moedd.nets.pool import MaxPool2x2

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(TrunkClassifier):
    """Generic VGG with a single linear head.

    Args:
        channels: input image channels.
        num_classes: classifier outputs.
        cfg: layer config; ints are conv widths, "M" is a 2x2 max-pool.
        norm: "instance" (GroupNorm(C, C), the repos' default for "VGG11"), "batch" or "none".
        image_size: input height == width. For 28 px the first conv pads by 3 (reference
            code) to reach 32 px.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        cfg: tuple[int | str, ...] = _VGG11,
        norm: str = "instance",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, size = channels, image_size
        for v in cfg:
            if v == "M":
                layers.append(MaxPool2x2())
                size //= 2
                continue
            pad = 3 if (not layers and image_size == 28) else 1
            size = size + 2 * pad - 2
            layers += [
                nn.Conv2d(in_ch, int(v), 3, padding=pad, bias=True),
                make_norm(norm, int(v)),
                nn.ReLU(inplace=True),
            ]
            in_ch = int(v)
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for VGG")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)



@register_net("vgg11")
def vgg11(num_classes: int, channels: int = 3, image_size: int = 32) -> VGG:
    """VGG11 with instance norm (the repos' "VGG11")."""
    return VGG(channels, num_classes, norm="instance", image_size=image_size)


@register_net("vgg11_bn")
def vgg11_bn(num_classes: int, channels: int = 3, image_size: int = 32) -> VGG:
    """VGG11 with BatchNorm2d ("VGG11BN")."""
    return VGG(channels, num_classes, norm="batch", image_size=image_size)
