"""The prepared store: what the ``prepare`` stage writes and every later stage reads.

Layout of a prepared directory (a DVC output)::

    train.pt   {"images": uint8 (N,C,H,W), "labels": int64 (N,)}
    test.pt    same for the test split
    meta.json  name, classes, shape, per-channel mean/std of the training images, digest, the
               transform applied at prepare (image_size, channels), and
               paper_dataset: which of the paper's datasets this is (cifar10, cifar100) or null
               (``moedd.data.identity``): presets, the report and metric keys go by it

The digest is a SHA-256 over the tensors and class names: partitions and synthetic sets record
it, so a set distilled from other data is refused instead of silently mis-evaluated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moedd._atomic import atomic_dir
from moedd.data.identity import paper_dataset
from moedd.data.sources import RawDataset


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset resident in memory (uint8, so CIFAR-10 train is 150 MB)."""

    name: str
    classes: list[str]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    digest: str
    paper: str | None = None
    """Which of the paper's datasets this is (``cifar10``, ``cifar100``), None for other data."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def content_digest(ds_tensors: list[Tensor], classes: list[str]) -> str:
    """SHA-256 over raw tensor bytes and class names."""
    h = hashlib.sha256()
    for t in ds_tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (float64 accumulation)."""
    x = images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def save_prepared(ds: RawDataset, out_dir: str | Path, transform: dict | None = None) -> Prepared:
    """Write ``ds`` as the prepared store ``out_dir`` and return it; ``transform`` (image_size,
    channels: what ``moedd.data.transform`` did to the images read) is recorded beside the digest.

    The directory is replaced as a whole and atomically (``moedd._atomic.atomic_dir``): a kill
    while saving leaves the previous store, never a train.pt of one dataset beside the meta.json
    (digest) of another.
    """
    tensors = [ds.train.images, ds.train.labels, ds.test.images, ds.test.labels]
    digest = content_digest(tensors, ds.classes)
    mean, std = channel_stats(ds.train.images)
    paper = paper_dataset(ds.classes, ds.train.images.shape[1:])
    meta = {
        "name": ds.name, "classes": ds.classes, "shape": list(ds.train.images.shape[1:]),
        "num_train": len(ds.train.labels), "num_test": len(ds.test.labels),
        "mean": mean, "std": std, "digest": digest, "paper_dataset": paper,
        "transform": transform or {"image_size": None, "channels": "keep"},
    }
    with atomic_dir(out_dir) as out:
        torch.save({"images": ds.train.images, "labels": ds.train.labels}, out / "train.pt")
        torch.save({"images": ds.test.images, "labels": ds.test.labels}, out / "test.pt")
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return Prepared(ds.name, ds.classes, *tensors, mean, std, digest, paper)


def load_prepared(path: str | Path) -> Prepared:
    """Read a prepared store written by :func:`save_prepared`."""
    p = Path(path)
    if not (p / "meta.json").exists():
        raise FileNotFoundError(f"{p} is not a prepared dataset (no meta.json); run `moedd prepare` first")
    meta = json.loads((p / "meta.json").read_text())
    train = torch.load(p / "train.pt", weights_only=True)
    test = torch.load(p / "test.pt", weights_only=True)
    # stores written before the field existed: the same rule on what they record
    paper = meta["paper_dataset"] if "paper_dataset" in meta else paper_dataset(meta["classes"], meta["shape"])
    return Prepared(
        meta["name"], meta["classes"], train["images"], train["labels"], test["images"], test["labels"],
        tuple(meta["mean"]), tuple(meta["std"]), meta["digest"], paper,
    )


def load_prepared_meta(path: str | Path) -> dict:
    """Only the metadata of a prepared store (cheap: for validation before loading tensors)."""
    return json.loads((Path(path) / "meta.json").read_text())
