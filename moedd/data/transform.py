"""Bringing any image folder to the size and channels a run asks for, once, at prepare time.

``data.image_size`` resizes every image to a square of that side (bilinear with antialiasing, the
way PIL resizes; rounded back to uint8) and ``data.channels`` converts to ``gray`` (ITU-R BT.601
luma, as PIL's ``convert("L")``) or ``rgb`` (a gray image repeated three times). The prepared
store records both next to its digest, which covers the converted tensors, so a set distilled at
one size is refused against data prepared at another.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from moedd.data.sources import RawDataset, RawSplit

Channels = Literal["keep", "rgb", "gray"]
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _convert(images: Tensor, image_size: int | None, channels: Channels) -> Tensor:
    x = images.float()
    if channels == "gray" and x.shape[1] == 3:
        x = torch.einsum("nchw,c->nhw", x, _LUMA).unsqueeze(1)
    elif channels == "rgb" and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if image_size is not None and tuple(x.shape[2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def reshape_dataset(ds: RawDataset, image_size: int | None, channels: Channels) -> RawDataset:
    """``ds`` at ``image_size`` x ``image_size`` (None: as read) with ``channels``; unchanged when
    nothing is asked."""
    if image_size is None and channels == "keep":
        return ds
    split = lambda s: RawSplit(_convert(s.images, image_size, channels), s.labels)  # noqa: E731
    return dataclasses.replace(ds, train=split(ds.train), test=split(ds.test))
