"""mtt-distillation: ``images_best.pt`` and ``labels_best.pt`` in its run directory.

MTT saves the synthetic images in the space its networks see, ZCA-whitened with ``--zca`` (every
CIFAR configuration of its README), and hard int64 labels, class-major. It never writes the
learned learning rate (it only logs it to its tracker as "Synthetic_LR"), so ``--lr`` gives it.
Nor does it save the ZCA transform: it fits kornia's ZCA (ε = 0.1, unbiased covariance) on the
whole training set as [0, 1] pixels, without any mean/std normalisation (its ``--zca`` path skips
``Normalize``), which is what ``moedd.data.zca.fit_zca`` computes, so an import refits it that way
on the prepared training set and records its digest (on a byte-identical copy of the training
set, the same transform up to float rounding). Without ZCA its images are normalised with
CIFAR-10's DatasetCondensation constants, also for CIFAR-100 (its ``get_dataset``).

Export writes the same two files, in ZCA space when every expert of the set is (moedd's own
transform, fitted the same way) and else normalised with those constants, plus ``lr_best.pt``
(DATM's name) when the set has a learned rate, and a ``moedd-export.json`` saying which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from moedd.data import Prepared
from moedd.data.zca import fit_zca
from moedd.formats.base import (DC_CONSTANTS, FORMATS, Imported, ImportOptions, SetFormat, constants_dataset,
                                file_sha256, load_tensor_file, pooled, single_expert)
from moedd.synthetic import SyntheticSet, SyntheticSetError

SIDECAR = "moedd-export.json"
ZCA_EPS = 0.1
"""kornia ``ZCAWhitening(eps=0.1)`` as MTT and DATM construct it."""


def sidecar(path: Path) -> dict:
    side = path / SIDECAR
    return json.loads(side.read_text()) if side.is_file() else {}


def read_trajectory_set(fmt: str, path: Path, prepared: Prepared, options: ImportOptions, labels: Tensor,
                        learned_lr: float | None, soft: Tensor | None, default_method: str,
                        extra: dict[str, str]) -> Imported:
    """What MTT and DATM share: ``images_best.pt`` in ZCA space (refit) or MTT's normalised space."""
    images_file = path / "images_best.pt"
    images = load_tensor_file(images_file)
    if not isinstance(images, Tensor):
        raise SyntheticSetError(f"{images_file}: not an image tensor")
    side = sidecar(path)
    zca_space = options.zca if options.zca is not None else bool(side.get("zca", True))
    constants_dataset(prepared, options)  # the data must be CIFAR (or named) to know MTT's constants
    mean, std = DC_CONSTANTS["cifar10"]  # MTT/DATM use CIFAR-10's pair for CIFAR-100 too
    zca = fit_zca(prepared.train_images, eps=ZCA_EPS, data_digest=prepared.digest) if zca_space else None
    provenance = {"format": fmt, "file_sha256": file_sha256(images_file), "zca": zca_space,
                  "zca_refit": f"fit_zca(prepared train set, eps={ZCA_EPS})" if zca_space else None,
                  "constants": "cifar10", "label_dataset": options.dataset, **extra}
    return single_expert(images.detach(), labels, prepared, method=options.method or default_method,
                         space="zca" if zca_space else "normalized", mean=mean, std=std, decoding="none",
                         learned_lr=learned_lr, source=f"{fmt}:{images_file}", provenance=provenance,
                         soft=soft, zca=zca)


@FORMATS.register("mtt")
class MTTFormat(SetFormat):
    """mtt-distillation's ``images_best.pt`` + ``labels_best.pt``."""

    name = "mtt"

    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        _is_dir(path)
        labels = load_tensor_file(path / "labels_best.pt")
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise SyntheticSetError(f"{path / 'labels_best.pt'}: MTT's labels are one int per image")
        lr = options.learned_lr if options.learned_lr is not None else sidecar(path).get("learned_lr")
        return read_trajectory_set(self.name, path, prepared, options, labels, lr, None, "mtt", {})

    def export(self, syn: SyntheticSet, out: Path) -> list[Path]:
        zca_space = all(s == "zca" for s in syn.spaces)
        mean, std = DC_CONSTANTS["cifar10"]
        pool = pooled(syn, "zca" if zca_space else "normalized", mean, std)
        out.mkdir(parents=True)
        files = [out / "images_best.pt", out / "labels_best.pt"]
        torch.save(pool.images, files[0])
        torch.save(pool.labels, files[1])
        if pool.learned_lr is not None:
            files.append(out / "lr_best.pt")
            torch.save(torch.tensor(pool.learned_lr), files[-1])
        files.append(out / SIDECAR)
        files[-1].write_text(json.dumps({
            "format": self.name, "method": syn.method, "noe": syn.noe, "zca": zca_space,
            "zca_digest": syn.zca.digest if zca_space else None, "learned_lr": pool.learned_lr,
            "mean": None if zca_space else list(mean), "std": None if zca_space else list(std),
            "sha256": [x.sha256 for x in syn.metas]}, indent=2))
        return files


def _is_dir(path: Path) -> None:
    if not path.is_dir():
        raise SyntheticSetError(f"{path} is not a directory (the run directory with images_best.pt)")
