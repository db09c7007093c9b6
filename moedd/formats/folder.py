"""The image-folder format: ``<class name>/<file>.png``, the layout DD-Ranking and DC-Bench read
(torchvision's ``ImageFolder``: class folders sorted by name give the labels, which is moedd's
label order for data it prepared from a folder, and CIFAR's).

Export: every expert's images decoded as the evaluator decodes them (IDC/IDM's 2x2
multi-formation into four), mapped back to pixels (de-normalised; MTT's ZCA space inverted with
the set's transform) and written as 8-bit PNGs named ``e<expert>_<index>.png``, so a re-import
keeps the experts apart; a ``moedd-set.json`` beside them records the method, the learned
learning rate and where the set came from. The export is lossy: pixels are rounded to 1/255.

Import: the class folders must name classes of the prepared data (``--prepared``); every class
must hold the same number of images per expert; images must have the prepared data's shape
(channels, side). Images are normalised with the prepared data's mean/std. An imported set was
not distilled from the prepared data, so its ``data_digest`` is empty (the evaluator checks
classes and shape only) and its ``config`` records ``imported_from`` (the folder), the format and
a SHA-256 over the files read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moedd.data import Prepared
from moedd.formats.base import FORMATS, Imported, ImportOptions, SetFormat
from moedd.synthetic import DECODERS, SyntheticMeta, SyntheticSet, SyntheticSetError, to_pixels

SIDECAR = "moedd-set.json"
_EXPERT = re.compile(r"^e(\d+)_")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@FORMATS.register("folder")
class ImageFolderFormat(SetFormat):
    """``<class>/*.png`` (+ ``moedd-set.json``)."""

    name = "folder"

    def export(self, syn: SyntheticSet, out: Path) -> list[Path]:
        written = []
        for k, (x, y, meta) in enumerate(zip(syn.images, syn.labels, syn.metas, strict=True)):
            dx, dy = DECODERS.get(meta.decoding)(x.float(), y)
            px = (to_pixels(dx, meta, syn.zca) * 255).round().to(torch.uint8)
            counts: dict[int, int] = {}
            for img, label in zip(px, dy.tolist(), strict=True):
                i = counts[label] = counts.get(label, -1) + 1
                path = out / meta.classes[label] / f"e{k}_{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
                written.append(path)
        m = syn.meta
        info = {"method": syn.method, "noe": syn.noe, "ipc_stored": m.ipc, "budget": m.budget, "classes": m.classes,
                "learned_lr": m.learned_lr, "decoded_from": m.decoding, "space_exported": "pixels, uint8",
                "sha256": [x.sha256 for x in syn.metas], "data_digest": m.data_digest}
        (out / SIDECAR).write_text(json.dumps(info, indent=2))
        return written

    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        if not path.is_dir():
            raise SyntheticSetError(f"{path} is not a directory (<class>/*.png)")
        side = path / SIDECAR
        info = json.loads(side.read_text()) if side.is_file() else {}
        method = options.method or info.get("method") or "imported"
        learned_lr = options.learned_lr if options.learned_lr is not None else info.get("learned_lr")
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        unknown = [c for c in classes if c not in prepared.classes]
        if not classes or unknown:
            raise SyntheticSetError(f"{path}: class folder(s) {unknown[:3] or ['(none)']} are not classes of the "
                                    f"prepared data ({len(prepared.classes)}: {prepared.classes[:3]}...)")
        files = {c: sorted(f for f in (path / c).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES) for c in classes}
        per_expert: dict[int, dict[str, list[Path]]] = {}
        for c, fs in files.items():
            for f in fs:
                m = _EXPERT.match(f.name)
                per_expert.setdefault(int(m[1]) if m else 0, {}).setdefault(c, []).append(f)
        noe = len(per_expert)
        if sorted(per_expert) != list(range(noe)):
            raise SyntheticSetError(f"{path}: expert prefixes e<k>_ must run 0..{noe - 1}, found {sorted(per_expert)}")
        digest, images, labels, metas = hashlib.sha256(), [], [], []
        sizes = {len(v.get(c, [])) for v in per_expert.values() for c in prepared.classes}
        if len(sizes) != 1 or 0 in sizes:
            raise SyntheticSetError(f"{path}: every class needs the same number of images per expert, found {sorted(sizes)}")
        ipc = sizes.pop()
        for k in range(noe):
            x, y = [], []
            for label, c in enumerate(prepared.classes):
                for f in per_expert[k][c]:
                    digest.update(f.read_bytes())
                    x.append(self._load(f, prepared))
                    y.append(label)
            images.append(self._normalise(torch.stack(x), prepared))
            labels.append(torch.tensor(y, dtype=torch.long))
        provenance = {"imported_from": str(path), "format": self.name, "files_sha256": digest.hexdigest()}
        for k in range(noe):
            metas.append(SyntheticMeta(
                method=method, expert=k, noe=noe, ipc=ipc, budget=ipc * noe, classes=list(prepared.classes),
                image_shape=list(prepared.image_shape), space="normalized", mean=list(prepared.mean),
                std=list(prepared.std), decoding="none", learned_lr=learned_lr, data_digest="", config=provenance,
                source=f"{self.name}:{path}",
            ))
        return Imported(images, labels, metas)

    @staticmethod
    def _load(f: Path, prepared: Prepared) -> torch.Tensor:
        ch, h, w = prepared.image_shape
        with Image.open(f) as im:
            arr = np.asarray(im.convert("L" if ch == 1 else "RGB"))
        if arr.shape[:2] != (h, w):
            raise SyntheticSetError(f"{f}: {arr.shape[1]}x{arr.shape[0]} images, the prepared data's are {w}x{h}")
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if ch == 1 else t.permute(2, 0, 1)

    @staticmethod
    def _normalise(u8: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        c = u8.shape[1]
        mean = torch.tensor(prepared.mean).view(1, c, 1, 1)
        std = torch.tensor(prepared.std).view(1, c, 1, 1)
        return (u8.float() / 255.0 - mean) / std
