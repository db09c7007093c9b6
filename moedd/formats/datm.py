"""DATM: ``images_best.pt``, ``labels_best.pt`` and ``lr_best.pt`` in its run directory.

As MTT's (``moedd.formats.mtt``: ZCA space refit the same way, CIFAR-10's constants otherwise),
but the learned learning rate is saved (``lr_best.pt``, a 0-d tensor) and the labels are learned
soft labels: raw logits (C·IPC, C), which DATM's evaluation turns into targets with a softmax
(soft cross-entropy, temperature 1). An import keeps softmax(logits) as the set's soft labels
(the evaluator trains on them with soft cross-entropy) and gives each image the class of its
position, DATM's labels being class-major (image i of C·IPC belongs to class i // IPC). Read only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moedd.data import Prepared
from moedd.formats.base import FORMATS, Imported, ImportOptions, SetFormat, load_tensor_file
from moedd.formats.mtt import _is_dir, read_trajectory_set
from moedd.synthetic import SyntheticSetError


@FORMATS.register("datm")
class DATMFormat(SetFormat):
    """DATM's ``*_best.pt`` files (soft labels, learned lr)."""

    name = "datm"
    writes = False

    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        _is_dir(path)
        logits = load_tensor_file(path / "labels_best.pt")
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise SyntheticSetError(f"{path / 'labels_best.pt'}: DATM's labels are logits, one row per image")
        n, c = logits.shape
        if c != prepared.num_classes or n % c:
            raise SyntheticSetError(f"{path / 'labels_best.pt'}: {n} x {c} logits do not fit {prepared.num_classes} "
                                    f"classes, class-major")
        lr = options.learned_lr
        if lr is None and (path / "lr_best.pt").is_file():
            lr = float(load_tensor_file(path / "lr_best.pt"))
        labels = torch.arange(c).repeat_interleave(n // c)
        soft = torch.softmax(logits.detach().float(), dim=1)
        return read_trajectory_set(self.name, path, prepared, options, labels, lr, soft, "datm",
                                   {"soft_labels": "softmax(labels_best.pt)"})
