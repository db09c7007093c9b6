"""Tiny generated image data for tests: no downloads, learnable, seconds to process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLASSES = ["apple", "bear", "cloud"]


def make_image_folder(root: Path, train_per_class: int = 24, test_per_class: int = 8, size: int = 32, seed: int = 0,
                      classes: list[str] = TINY_CLASSES) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` for every name of ``classes``.

    Each class has its own colour and a horizontal or vertical stripe pattern plus noise, so
    networks can learn it in a few steps, while images within a class still differ.
    """
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=np.float32)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.tile(colours[c % 3], (size, size, 1))
                stripes = (np.arange(size) // 4 % 2)[:, None] * 50.0
                img += stripes[..., None] if c % 2 == 0 else stripes.T[..., None]
                img += rng.normal(0, 25, img.shape)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.png")
    return root
