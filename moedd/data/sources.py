"""Dataset sources, found by name: torchvision CIFAR-10/100 (downloaded) and any image folder.

Every source returns the whole dataset as uint8 tensors (N, C, H, W) with int64 labels and the
class names in label order, so everything downstream is independent of where images came from.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moedd.registry import Registry


class DataSourceError(RuntimeError):
    """The dataset could not be read; the message says what to do instead (one line)."""


@dataclass(frozen=True)
class RawSplit:
    """One split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from its source."""

    name: str
    classes: list[str]
    train: RawSplit
    test: RawSplit


SourceFn = Callable[[Path, bool], RawDataset]
SOURCES: Registry[SourceFn] = Registry("dataset source")

_OFFLINE_HINT = (
    "without internet, prepare from an image folder instead: "
    "-S data.source=imagefolder -S data.root=<dir holding train/<class>/* and test/<class>/*>"
)


def load_source(name: str, root: str | Path, download: bool = True) -> RawDataset:
    """Read dataset ``name`` from ``root`` through its registered source."""
    return SOURCES.get(name)(Path(root), download)


def _torchvision_cifar(cls_name: str, root: Path, download: bool) -> RawDataset:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as err:  # URLError, RuntimeError('Dataset not found'), ...
        raise DataSourceError(f"could not get {cls_name} in {root} ({type(err).__name__}: {err}); {_OFFLINE_HINT}") from err

    def to_split(ds) -> RawSplit:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return RawSplit(images, torch.as_tensor(ds.targets, dtype=torch.int64))

    train, test = splits
    return RawDataset(cls_name.lower(), list(train.classes), to_split(train), to_split(test))


@SOURCES.register("cifar10")
def cifar10(root: Path, download: bool) -> RawDataset:
    """CIFAR-10 through torchvision (downloads into ``root`` when allowed)."""
    return _torchvision_cifar("CIFAR10", root, download)


@SOURCES.register("cifar100")
def cifar100(root: Path, download: bool) -> RawDataset:
    """CIFAR-100 through torchvision (downloads into ``root`` when allowed)."""
    return _torchvision_cifar("CIFAR100", root, download)


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_split(split_dir: Path, classes: list[str]) -> RawSplit:
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataSourceError(f"no images under {split_dir}/<class>/")
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding releases the GIL
        arrays = list(pool.map(_decode, files, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataSourceError(f"images under {split_dir} have different sizes {sorted(shapes)[:3]}...; resize them first")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return RawSplit(images, torch.tensor(labels, dtype=torch.int64))


@SOURCES.register("imagefolder")
def imagefolder(root: Path, download: bool) -> RawDataset:
    """An image folder: ``root/train/<class>/*`` and ``root/test/<class>/*``.

    Classes are the sorted sub-folder names of train/ (the torchvision ImageFolder rule, which
    gives CIFAR-10's official label order for the CIFAR-10 copy). test/ must hold the same classes.
    """
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise DataSourceError(f"image folder {root} must contain train/<class>/ and test/<class>/")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    if classes != test_classes:
        raise DataSourceError(f"train/ and test/ of {root} hold different class folders")
    return RawDataset(root.name or "imagefolder", classes, _read_split(train_dir, classes), _read_split(test_dir, classes))
