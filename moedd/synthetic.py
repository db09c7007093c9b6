"""The synthetic set format: one tensor file + one JSON metadata sidecar per expert.

A synthetic set is a directory (a DVC output)::

    expert-0.pt    {"images": float32 (C*IPC, ch, H, W), "labels": int64 (C*IPC,)}
    expert-0.json  SyntheticMeta (method, expert index, IPC, space, decoding, digests, sha256)
    expert-1.pt ...
    zca.pt         only for space 'zca': the whitening transform (moedd.data.zca), so the evaluator
                   whitens the test set identically and images can be mapped back to pixels

Images are stored in the space named by ``meta.space``: ``normalized`` ((x/255 − mean)/std with
the mean/std kept in the metadata, so pixels can be recovered), ``pixel`` ([0,1]) or ``zca``.
``sha256`` is the hash of the .pt file: a corrupted or swapped file is refused on load, and so is
a sidecar without it (moedd always writes it).

``meta.decoding`` names how stored images become training images (:data:`DECODERS`): ``none``,
or ``multiformation2``, the 2x2 multi-formation of IDC and partition-and-expansion of IDM (each
stored image holds four quadrants, each upsampled to a training image). :func:`mosaic` is its
inverse for initialisation: four images downscaled into the quadrants of one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from moedd import __version__
from moedd._atomic import atomic_dir
from moedd.registry import Registry

Decoder = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
DECODERS: Registry[Decoder] = Registry("decoding")
"""How stored synthetic images become training images, by ``meta.decoding``."""


@DECODERS.register("none")
def _identity(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return images, labels


def _quadrant_slices(h: int, w: int) -> list[tuple[slice, slice]]:
    """Row/column slices of the four quadrants in decoder order: TL, BL, TR, BR."""
    h2, w2 = h // 2, w // 2
    top, bottom, left, right = slice(0, h2), slice(h2, h), slice(0, w2), slice(w2, w)
    return [(top, left), (bottom, left), (top, right), (bottom, right)]


@DECODERS.register("multiformation2")
def decode_quadrants(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """2x2 multi-formation (IDC) / partition-and-expansion (IDM), factor 2.

    Each stored image is cut into its four quadrants (top-left, bottom-left, top-right,
    bottom-right), each bilinearly upsampled back to full size, all with the stored label:
    N images -> 4N training images, quadrant-major.
    """
    size = images.shape[-2:]
    up = [F.interpolate(images[..., rows, cols], size=size, mode="bilinear", align_corners=False)
          for rows, cols in _quadrant_slices(*size)]
    return torch.cat(up), labels.repeat(4)


def decode_grouped(images: Tensor, decoding: str) -> Tensor:
    """``decoding`` applied to groups: (..., n, ch, H, W) -> (..., q·n, ch, H, W), each group's
    decoded images quadrant-major (q = images per stored image: 4 for multiformation2, 1 for none).
    The decoder of evaluation, so training inside a method sees exactly what evaluation will use."""
    *lead, n, ch, h, w = images.shape
    flat = images.reshape(-1, ch, h, w)
    dec, _ = DECODERS.get(decoding)(flat, torch.zeros(len(flat), dtype=torch.long, device=images.device))
    q = len(dec) // len(flat)
    return dec.view(q, *lead, n, ch, h, w).movedim(0, len(lead)).reshape(*lead, q * n, ch, h, w)


def mosaic(quadrants: Tensor, mode: Literal["bilinear", "nearest"]) -> Tensor:
    """2x2 mosaics of full-size images, each downscaled into its quadrant (the inverse of the
    multiformation2 decoder, for initialisation).

    Args:
        quadrants: (N, 4, ch, H, W): image q of row n goes to quadrant q (TL, BL, TR, BR).
        mode: the downscaling, as each method's reference code does it: "bilinear" (IDM,
            ``align_corners=False``) or "nearest" (IDC).

    Returns:
        (N, ch, H, W) mosaics.
    """
    n, _, ch, h, w = quadrants.shape
    out = quadrants.new_zeros(n, ch, h, w)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    for q, (rows, cols) in enumerate(_quadrant_slices(h, w)):
        size = (rows.stop - rows.start, cols.stop - cols.start)
        out[:, :, rows, cols] = F.interpolate(quadrants[:, q], size=size, mode=mode, **extra)
    return out


class SyntheticSetError(ValueError):
    """A synthetic set is missing, corrupted or does not match the data it is evaluated on."""


class SyntheticMeta(BaseModel):
    """Metadata of one expert's synthetic images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    expert: int
    noe: int
    ipc: int
    budget: int
    classes: list[str]
    image_shape: list[int]
    space: Literal["normalized", "pixel", "zca"] = "normalized"
    mean: list[float]
    std: list[float]
    decoding: str = "none"
    """How stored images become training images (e.g. IDC/IDM's 2x2 multi-formation)."""
    learned_lr: float | None = None
    """Learning rate learned with the images (MTT); the evaluator uses it when set."""
    data_digest: str
    partition_digest: str = ""
    shard_size: int = 0
    seed: int = 0
    iterations: int = 0
    net: str = "convnet3"
    code_version: str = __version__
    git_commit: str = ""
    sha256: str = ""
    zca_digest: str = ""
    """For space 'zca': digest of the transform (``zca.pt`` of the set's directory)."""
    config: dict[str, Any] = {}
    mixture: str = ""
    """For a heterogeneous mixture, the methods of all experts in order (``idc+idm``): the cell's
    method; empty when every expert ran ``method``."""
    soft_labels: bool = False
    """Whether the .pt also holds ``soft`` (C·IPC, C) target distributions (imported sets whose
    format has them); the evaluator then trains with soft cross-entropy."""
    source: str = ""
    """For an imported set, the format and file it came from (``moedd import``); empty for sets
    moedd distilled."""


@dataclass(frozen=True)
class SyntheticSet:
    """All experts of one distillation run."""

    images: list[Tensor]
    labels: list[Tensor]
    metas: list[SyntheticMeta]
    zca: Any = None
    """The ZCA transform of the set's 'zca'-space experts."""
    soft: list[Tensor | None] | None = None
    """Per expert, soft target distributions (C·IPC, C) where the set has them (imported sets)."""

    @property
    def meta(self) -> SyntheticMeta:
        return self.metas[0]

    @property
    def method(self) -> str:
        """The cell's method: the mixture's name (``idc+idm``) or the one method of every expert."""
        return self.meta.mixture or self.meta.method

    @property
    def spaces(self) -> list[str]:
        return [m.space for m in self.metas]

    @property
    def noe(self) -> int:
        return len(self.images)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_synthetic(
    out_dir: str | Path, images: list[Tensor], labels: list[Tensor], metas: list[SyntheticMeta], zca: Any = None,
    soft: list[Tensor | None] | None = None,
) -> list[SyntheticMeta]:
    """Write every expert's images and metadata as the directory ``out_dir``; returns the metadata
    as written (with each file's sha256). ``zca`` (a ``moedd.data.zca.ZCA``) is required for
    sets with ZCA-space experts; ``soft`` (per expert, (C·IPC, C) target distributions or None)
    is stored beside the labels of experts whose metadata says ``soft_labels``.

    The directory is replaced as a whole and atomically (``moedd._atomic.atomic_dir``): a kill
    while saving leaves the previous set, never a mixture of old and new experts, and files of an
    earlier set with more experts do not linger.
    """
    zca_space = any(m.space == "zca" for m in metas)
    if zca_space and (zca is None or any(m.zca_digest != zca.digest for m in metas if m.space == "zca")):
        raise SyntheticSetError("a ZCA-space set must be saved with its ZCA transform (digest in its metadata)")
    sealed = []
    with atomic_dir(out_dir) as out:
        if zca_space:
            zca.save(out / "zca.pt")
        for k, (x, y, meta) in enumerate(zip(images, labels, metas, strict=True)):
            pt = out / f"expert-{k}.pt"
            blob = {"images": x.detach().float().cpu().contiguous(), "labels": y.cpu()}
            if meta.soft_labels:
                if soft is None or soft[k] is None:
                    raise SyntheticSetError(f"expert {k} says soft_labels but no soft labels were given")
                blob["soft"] = soft[k].detach().float().cpu().contiguous()
            torch.save(blob, pt)
            sealed.append(meta.model_copy(update={"sha256": _sha256(pt)}))
            (out / f"expert-{k}.json").write_text(sealed[-1].model_dump_json(indent=2))
    return sealed


def load_synthetic(path: str | Path) -> SyntheticSet:
    """Read and verify a synthetic set directory.

    Every expert's .pt must match the sha256 in its sidecar. A sidecar without one is refused, not
    trusted: ``save_synthetic`` always writes it, so a missing digest means an edited sidecar, and
    skipping the check would let one deleted field disable the corruption check.

    Raises:
        SyntheticSetError: missing files, an invalid sidecar, a missing digest, a hash mismatch,
            or experts that disagree on method, space, classes or shape.
    """
    p = Path(path)
    metas_files = sorted(p.glob("expert-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    if not metas_files:
        raise SyntheticSetError(f"{p} holds no synthetic set (no expert-*.json); run `moedd distill` first")
    images, labels, metas, soft = [], [], [], []
    for mf in metas_files:
        try:
            meta = SyntheticMeta.model_validate_json(mf.read_text())
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise SyntheticSetError(f"{mf} is not valid synthetic-set metadata ({where + ': ' if where else ''}"
                                    f"{first['msg']}); re-create the set with `moedd distill`") from None
        pt = mf.with_suffix(".pt")
        if not pt.exists():
            raise SyntheticSetError(f"{pt} is missing")
        if not meta.sha256:
            raise SyntheticSetError(f"{p}: no sha256 in {mf.name}, so {pt.name} cannot be checked; re-create the set "
                                    f"with `moedd distill --expert {meta.method} --noe {meta.noe}`")
        if _sha256(pt) != meta.sha256:
            raise SyntheticSetError(f"{pt} does not match the sha256 in its metadata (corrupted or replaced)")
        d = torch.load(pt, weights_only=True)
        images.append(d["images"])
        labels.append(d["labels"])
        soft.append(d.get("soft") if meta.soft_labels else None)
        metas.append(meta)
    first = metas[0]
    # a mixture's experts differ in method, space and decoding (each is decoded by its own
    # metadata); what they learned from must be one dataset
    per_set = ("mixture", "classes", "image_shape") if first.mixture else \
        ("method", "space", "classes", "image_shape", "decoding", "data_digest")
    for m in metas[1:]:
        for field in per_set:
            if getattr(m, field) != getattr(first, field):
                raise SyntheticSetError(f"experts of {p} disagree on {field}")
    if len({m.data_digest for m in metas if m.data_digest}) > 1:  # an imported expert has none
        raise SyntheticSetError(f"experts of {p} disagree on data_digest")
    zca = None
    if any(m.space == "zca" for m in metas):
        from moedd.data.zca import load_zca

        if not (p / "zca.pt").exists():
            raise SyntheticSetError(f"{p} is a ZCA-space set but its zca.pt is missing")
        zca = load_zca(p / "zca.pt")
        if any(m.zca_digest != zca.digest for m in metas if m.space == "zca"):
            raise SyntheticSetError(f"{p}/zca.pt is not the transform the images were distilled in (digest differs)")
    return SyntheticSet(images, labels, metas, zca, soft if any(x is not None for x in soft) else None)


def check_matches(syn: SyntheticSet, classes: list[str], image_shape: tuple[int, ...], data_digest: str | None = None) -> None:
    """Refuse to evaluate a set whose classes or image shape differ from the test data."""
    m = syn.meta
    if m.classes != list(classes):
        raise SyntheticSetError(
            f"the synthetic set's classes ({len(m.classes)}: {m.classes[:3]}...) differ from the test data's "
            f"({len(classes)}: {list(classes)[:3]}...)"
        )
    if tuple(m.image_shape) != tuple(image_shape):
        raise SyntheticSetError(f"synthetic image shape {tuple(m.image_shape)} differs from the test data's {tuple(image_shape)}")
    if "zca" in syn.spaces:
        if syn.zca is None:
            raise SyntheticSetError("a ZCA-space synthetic set needs its ZCA transform (zca.pt) to be evaluated")
        if data_digest is not None and syn.zca.data_digest and syn.zca.data_digest != data_digest:
            raise SyntheticSetError("the set's ZCA transform was fitted on different data (prepared digest differs)")
    if data_digest is not None and any(x.data_digest and x.data_digest != data_digest for x in syn.metas):
        raise SyntheticSetError("the synthetic set was distilled from different data (prepared digest differs)")


def to_pixels(images: Tensor, meta: SyntheticMeta, zca: Any = None) -> Tensor:
    """Map stored images back to [0, 1] pixels (for grids and inspection); ZCA sets need ``zca``."""
    if meta.space == "zca" and zca is not None:
        return zca.invert(images).clamp(0, 1)
    if meta.space == "pixel":
        return images.clamp(0, 1)
    if meta.space == "normalized":
        mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
        std = torch.tensor(meta.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)
    raise SyntheticSetError(f"cannot map space '{meta.space}' back to pixels")


def metadata_json(meta: SyntheticMeta) -> dict[str, Any]:
    """The metadata as a plain dict (for MLflow)."""
    return json.loads(meta.model_dump_json())


def combine(sets: list[SyntheticSet]) -> SyntheticSet:
    """One mixture of the experts of several sets (e.g. an imported set and a distilled one), in
    order, so the evaluator fuses them with mixup. Each expert keeps its metadata (method, space,
    decoding, learned lr); the experts are renumbered and the mixture named by the sets' methods
    joined by ``+``.

    Raises:
        SyntheticSetError: sets of other classes or image shapes, distilled from different data
            (both with a dataset digest that differ), or with two different ZCA transforms.
    """
    if len(sets) < 2:
        raise SyntheticSetError("combine needs at least two sets")
    first = sets[0].meta
    zcas = {s.zca.digest: s.zca for s in sets if s.zca is not None}
    digests = {m.data_digest for s in sets for m in s.metas if m.data_digest}
    for s in sets[1:]:
        if s.meta.classes != first.classes:
            raise SyntheticSetError(f"the sets' classes differ ({first.classes[:3]}... vs {s.meta.classes[:3]}...)")
        if s.meta.image_shape != first.image_shape:
            raise SyntheticSetError(f"the sets' image shapes differ ({first.image_shape} vs {s.meta.image_shape})")
    if len(digests) > 1:
        raise SyntheticSetError("the sets were distilled from different data (their dataset digests differ)")
    if len(zcas) > 1:
        raise SyntheticSetError("the sets whiten with two different ZCA transforms; one set can hold one")
    name = "+".join(s.method for s in sets)
    noe = sum(s.noe for s in sets)
    metas, k = [], 0
    for s in sets:
        for m in s.metas:
            metas.append(m.model_copy(update={"expert": k, "noe": noe, "mixture": name, "sha256": ""}))
            k += 1
    soft = [x for s in sets for x in (s.soft or [None] * s.noe)]
    return SyntheticSet([x for s in sets for x in s.images], [y for s in sets for y in s.labels], metas,
                        next(iter(zcas.values()), None), soft if any(x is not None for x in soft) else None)
