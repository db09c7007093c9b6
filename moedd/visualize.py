"""Image grids of synthetic sets (for `moedd show` and MLflow artifacts)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from moedd.synthetic import SyntheticMeta, to_pixels


def expert_grid(images: Tensor, meta: SyntheticMeta, pad: int = 2, zca: Any = None) -> np.ndarray:
    """An (H', W', 3) uint8 grid: one row per class, IPC images per row, in pixel space
    (ZCA-space sets are mapped back with their transform ``zca``)."""
    from torchvision.utils import make_grid

    px = to_pixels(images.detach().float().cpu(), meta, zca)
    grid = make_grid(px, nrow=meta.ipc, padding=pad, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
