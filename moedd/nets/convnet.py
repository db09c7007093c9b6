"""ConvNet, the default distillation backbone (docs/methods.md §ConvNet).

Each of ``depth`` blocks is Conv3x3(pad 1, bias) -> norm -> ReLU -> AvgPool2d(2), so a 32 px
input shrinks 32 -> 16 -> 8 -> 4 at depth 3 and the flattened feature is 128*4*4 = 2048.
"""

from __future__ import annotations

from torch import nn

from moedd.nets.base import TrunkClassifier, make_norm, register_net
from moedd.nets.conv import Conv2d
from moedd.nets.pool import AvgPool2x2


class ConvNet(TrunkClassifier):
    """Generic ConvNet of the DC/DM/MTT papers.

    Args:
        channels: input image channels.
        num_classes: classifier outputs.
        width: channels of every conv layer (128 in the papers).
        depth: number of conv blocks (3 = "ConvNet", 4 = "ConvNetD4").
        norm: "instance" (GroupNorm(width, width), the default), "batch" or "none".
        image_size: input height == width. For 28 px (MNIST-like) the first conv pads by 3,
            as the reference code does, so the map is 32 px after it; other sizes just halve
            per block.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        in_ch = channels
        for d in range(depth):
            pad = 3 if (d == 0 and image_size == 28) else 1
            size = size + 2 * pad - 2  # 3x3 conv, stride 1
            layers += [
                Conv2d(in_ch, width, kernel_size=3, padding=pad, bias=True),
                make_norm(norm, width),
                nn.ReLU(inplace=True),
                AvgPool2x2(),
            ]
            size //= 2
            in_ch = width
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for depth {depth}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)



@register_net("convnet3")
def convnet3(num_classes: int, channels: int = 3, image_size: int = 32, **kw) -> ConvNet:
    """ConvNet-3: depth 3, width 128, instance norm (the papers' default "ConvNet")."""
    return ConvNet(channels, num_classes, depth=3, norm="instance", image_size=image_size, **kw)


@register_net("convnet3_bn")
def convnet3_bn(num_classes: int, channels: int = 3, image_size: int = 32, **kw) -> ConvNet:
    """ConvNet-3 with BatchNorm ("ConvNetBN", DM cross-architecture pool)."""
    return ConvNet(channels, num_classes, depth=3, norm="batch", image_size=image_size, **kw)


@register_net("convnet4")
def convnet4(num_classes: int, channels: int = 3, image_size: int = 32, **kw) -> ConvNet:
    """ConvNet-4 ("ConvNetD4"): four blocks, 2x2 final map on 32 px, 512-d feature."""
    return ConvNet(channels, num_classes, depth=4, norm="instance", image_size=image_size, **kw)
