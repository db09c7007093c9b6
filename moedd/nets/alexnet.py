"""The small AlexNet used in dataset-distillation papers (docs/methods.md §AlexNet).

Five convs (128, 192, 256, 192, 192 channels; 5x5, 5x5, 3x3, 3x3, 3x3), three max-pools, no
normalization by default, and a single linear head on the 192*4*4 = 3072-d feature (32 px).
"""

from __future__ import annotations

from torch import nn

from moedd.nets.base import TrunkClassifier, make_norm, register_net
from moedd.nets.pool import MaxPool2x2

# (out_channels, kernel, pool after)
_CFG = ((128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


class AlexNet(TrunkClassifier):
    """Generic DD AlexNet.

    Args:
        channels: input image channels.
        num_classes: classifier outputs.
        norm: "none" (the paper's AlexNet), "batch" (AlexNetBN: BatchNorm2d after every conv)
            or "instance".
        image_size: input height == width. For 28 px the first conv pads by 4, as the
            reference code does, to reach 32 px.
    """

    def __init__(
        self, channels: int, num_classes: int, norm: str = "none", image_size: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, size = channels, image_size
        for i, (out_ch, k, pool) in enumerate(_CFG):
            pad = 4 if (i == 0 and image_size == 28) else k // 2
            size = size + 2 * pad - k + 1
            layers += [nn.Conv2d(in_ch, out_ch, k, padding=pad, bias=True), make_norm(norm, out_ch)]
            layers.append(nn.ReLU(inplace=True))
            if pool:
                layers.append(MaxPool2x2())
                size //= 2
            in_ch = out_ch
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for AlexNet")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)



@register_net("alexnet")
def alexnet(num_classes: int, channels: int = 3, image_size: int = 32) -> AlexNet:
    """AlexNet without normalization (DC/MTT evaluation pools)."""
    return AlexNet(channels, num_classes, norm="none", image_size=image_size)


@register_net("alexnet_bn")
def alexnet_bn(num_classes: int, channels: int = 3, image_size: int = 32) -> AlexNet:
    """AlexNetBN: BatchNorm2d after every conv (DM cross-architecture pool)."""
    return AlexNet(channels, num_classes, norm="batch", image_size=image_size)
