"""What a set format implements, the registry of formats, and what the tensor formats share.

An imported set is one that moedd did not distill from the prepared data, so what it records in
place of a dataset digest is its provenance: ``data_digest`` is empty (the evaluator then checks
classes and image shape only), ``source`` names the format and file, and ``config`` holds the
format, the file's SHA-256, the options of the import and the normalisation constants of the
format. Foreign label indices follow the source dataset's label order (torchvision's, which every
reference repository uses): with ``--dataset cifar10|cifar100`` they are mapped to the prepared
data's classes by name (a name the prepared data lacks is one line); otherwise they are read in
the prepared data's order (a prepared CIFAR store has exactly that order) and must not exceed its
number of classes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from moedd.data import Prepared
from moedd.data.identity import PAPER_DATASETS
from moedd.registry import Registry
from moedd.synthetic import DECODERS, SyntheticMeta, SyntheticSet, SyntheticSetError, to_pixels

DC_CONSTANTS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""DatasetCondensation's fixed per-channel mean/std (``utils.get_dataset``): its sets are stored
normalised with them. MTT and DATM without ZCA, and IDC, use the CIFAR-10 pair for CIFAR-100 too."""

@dataclass(frozen=True)
class ImportOptions:
    """What ``moedd import`` may be told about a foreign set (each format reads what it needs)."""

    method: str | None = None
    """Method name to record (default: the format's)."""
    learned_lr: float | None = None
    """The learning rate learned with the images (MTT logs it only to its tracker)."""
    zca: bool | None = None
    """MTT/DATM: whether the images are in ZCA space (their CIFAR configurations' default: yes)."""
    factor: int | None = None
    """IDC: the multi-formation factor (its CIFAR default: 2)."""
    experiment: int = -1
    """DC/DM: which of the file's experiments (``data[exp]``; default the last, as IDC's test reads)."""
    dataset: str | None = None
    """The constants' dataset (cifar10 | cifar100); default: the prepared data's identity."""


@dataclass
class Imported:
    """A foreign set read into moedd's set layout (what ``save_synthetic`` takes)."""

    images: list[Tensor]
    labels: list[Tensor]
    metas: list[SyntheticMeta]
    zca: Any = None
    soft: list[Tensor | None] | None = None


class SetFormat(ABC):
    """A distilled-set format of another project: how a moedd set is written in it and read from it."""

    name: ClassVar[str]
    writes: ClassVar[bool] = True
    """Whether ``moedd export`` can write it (DATM's learned soft labels: read only)."""

    def export(self, syn: SyntheticSet, out: Path) -> list[Path]:
        """Write ``syn`` (every expert, decoded) at ``out``; return the files written."""
        raise SyntheticSetError(f"moedd export cannot write the {self.name} format")

    @abstractmethod
    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        """The set at ``path`` with full metadata, its labels in ``prepared``'s order (one line for
        anything that does not fit)."""


FORMATS: Registry[type[SetFormat]] = Registry("set format")
"""Formats by name: folder, dc, mtt, datm, idc."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensor_file(path: Path) -> Any:
    """``torch.load`` of a foreign file, tensors only (no code runs), or one line."""
    if not path.is_file():
        raise SyntheticSetError(f"{path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure is the same user error)
        raise SyntheticSetError(f"{path} is not a tensor file this format reads ({type(err).__name__})") from None


def constants_dataset(prepared: Prepared, options: ImportOptions) -> str:
    """Which dataset's constants a foreign file uses: ``--dataset``, else the prepared data's."""
    name = options.dataset or prepared.paper
    if name not in DC_CONSTANTS:
        raise SyntheticSetError(f"the prepared data is not CIFAR-10/100: say which dataset's constants the set uses "
                                f"(--dataset cifar10 | cifar100)")
    return name


def map_labels(labels: Tensor, prepared: Prepared, dataset: str | None) -> Tensor:
    """Foreign label indices -> the prepared data's (module docstring), or one line."""
    labels = labels.long().flatten()
    n = int(labels.max()) + 1 if len(labels) else 0
    source = PAPER_DATASETS.get(dataset or "")
    if source is None or source == prepared.classes:
        if n > prepared.num_classes:
            raise SyntheticSetError(f"the set has labels up to {n - 1}, the prepared data {prepared.num_classes} classes")
        return labels
    if n > len(source):
        raise SyntheticSetError(f"the set has labels up to {n - 1}, {dataset} {len(source)} classes")
    missing = [c for c in source[:n] if c not in prepared.classes]
    if missing:
        raise SyntheticSetError(f"the set's labels are {dataset}'s, but the prepared data lacks {missing[:3]} "
                                f"(it has {prepared.classes[:3]}...)")
    return torch.tensor([prepared.classes.index(c) for c in source[:n]])[labels]


def single_expert(images: Tensor, labels: Tensor, prepared: Prepared, *, method: str, space: str,
                  mean: tuple[float, ...], std: tuple[float, ...], decoding: str, learned_lr: float | None,
                  source: str, provenance: dict[str, Any], soft: Tensor | None = None, zca: Any = None) -> Imported:
    """One foreign set as a one-expert moedd set: labels mapped and sorted class-major (stably, so
    each class keeps its file order), shapes checked, every class the same number of images."""
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(prepared.image_shape):
        raise SyntheticSetError(f"{source}: images of shape {tuple(images.shape[1:])}, the prepared data's are "
                                f"{tuple(prepared.image_shape)}")
    if len(labels) != len(images):
        raise SyntheticSetError(f"{source}: {len(images)} images but {len(labels)} labels")
    mapped = map_labels(labels, prepared, provenance.get("label_dataset"))
    counts = torch.bincount(mapped, minlength=prepared.num_classes)
    if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
        raise SyntheticSetError(f"{source}: every class needs the same number of images, found "
                                f"{sorted(set(counts.tolist()))}")
    order = torch.argsort(mapped, stable=True)
    ipc = int(counts[0])
    meta = SyntheticMeta(
        method=method, expert=0, noe=1, ipc=ipc, budget=ipc, classes=list(prepared.classes),
        image_shape=list(prepared.image_shape), space=space, mean=list(mean), std=list(std),  # type: ignore[arg-type]
        decoding=decoding, learned_lr=learned_lr, data_digest="", zca_digest=zca.digest if zca is not None else "",
        config=provenance, source=source, soft_labels=soft is not None)
    return Imported([images.float()[order].contiguous()], [mapped[order]], [meta], zca,
                    [soft.float()[order].contiguous()] if soft is not None else None)


@dataclass
class Pooled:
    """A moedd set's experts decoded and pooled class-major, in one target space (export)."""

    images: Tensor
    labels: Tensor
    learned_lr: float | None
    notes: dict[str, Any] = field(default_factory=dict)


def pooled(syn: SyntheticSet, space: str, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> Pooled:
    """Every expert decoded by its own metadata and brought into ``space`` ('zca': the set's own
    transform, only for all-ZCA sets; 'normalized' with ``mean``/``std``; 'pixel'), pooled
    class-major (each class: expert 0's images, then expert 1's...). An expert already stored in
    the target space (same constants, no decoding) passes through unchanged, bit for bit."""
    xs, ys = [], []
    for x, y, meta in zip(syn.images, syn.labels, syn.metas, strict=True):
        dx, dy = DECODERS.get(meta.decoding)(x.float(), y)
        same = meta.space == space and (space != "normalized" or (list(mean), list(std)) == (meta.mean, meta.std))
        if not same:
            if space == "zca":
                raise SyntheticSetError("only a set whose experts are all in ZCA space exports in ZCA space")
            px = to_pixels(dx, meta, syn.zca) if meta.space != "zca" else syn.zca.invert(dx)
            if meta.space == "normalized":  # unclamped: the inverse of the normalisation, not a clip
                c = len(meta.mean)
                px = dx * torch.tensor(meta.std).view(1, c, 1, 1) + torch.tensor(meta.mean).view(1, c, 1, 1)
            dx = px if space == "pixel" else (px - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        xs.append(dx)
        ys.append(dy)
    images, labels = torch.cat(xs), torch.cat(ys)
    order = torch.argsort(labels, stable=True)
    lrs = [m.learned_lr for m in syn.metas]
    lr = sum(lrs) / len(lrs) if all(v is not None for v in lrs) else None  # type: ignore[arg-type,misc]
    return Pooled(images[order].contiguous(), labels[order].contiguous(), lr)
