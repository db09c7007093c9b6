"""CIFAR-style ResNet18 (docs/methods.md §ResNet18).

Stem Conv3x3(stride 1, no bias) -> norm -> ReLU with no max-pool, four stages of two
BasicBlocks (64/128/256/512 planes, first strides 1/2/2/2), then avg_pool2d(4) and a
Linear(512, C) head. A 32 px input reaches the head as a 4x4x512 map.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moedd.nets.base import make_norm, register_net


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + norm shortcut when the shape changes.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (and of the projection shortcut).
        norm: normalization kind, see :func:`moedd.nets.make_norm`.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), make_norm(norm, planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Generic CIFAR ResNet built from BasicBlocks.

    Args:
        channels: input image channels.
        num_classes: classifier outputs.
        blocks: BasicBlocks per stage ((2, 2, 2, 2) = ResNet18).
        norm: "instance" (GroupNorm(C, C), the repos' default for "ResNet18"), "batch" or
            "none".
        image_size: input height == width; the head's input size follows from it
            (512 for 32 px and 28 px, larger when the final map exceeds 4x4).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        norm: str = "instance",
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 64)
        stages: list[nn.Module] = []
        in_planes, size = 64, image_size
        for i, n in enumerate(blocks):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                layers.append(BasicBlock(in_planes, planes, s, norm))
                size = (size - 1) // s + 1  # 3x3 conv, pad 1
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        size //= 4
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for ResNet")
        self.classifier = nn.Linear(in_planes * size * size, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """avg_pool2d(4) of the last stage, flattened: shape (N, 512) for 32 px."""
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.avg_pool2d(out, 4).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@register_net("resnet18")
def resnet18(num_classes: int, channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet18 with instance norm (the repos' "ResNet18")."""
    return ResNet(channels, num_classes, norm="instance", image_size=image_size)


@register_net("resnet18_bn")
def resnet18_bn(num_classes: int, channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet18 with BatchNorm2d ("ResNet18BN")."""
    return ResNet(channels, num_classes, norm="batch", image_size=image_size)
