"""DatasetCondensation / DSA / DM: ``res_<method>_<dataset>_<model>_<ipc>ipc.pt``.

The file is ``{"data": [[images, labels], ...], "accs_all_exps": {...}}``: one ``[images, labels]``
pair per experiment (independent runs), images float32 (C·IPC, 3, 32, 32) normalised with
DatasetCondensation's fixed mean/std of the dataset (:data:`~moedd.formats.base.DC_CONSTANTS`),
labels int64 class-major. Import reads one experiment (``--experiment``, default the last, as IDC's
test script does) as a one-expert set in that normalised space; export writes every expert decoded
and pooled class-major, normalised with the dataset's DC constants (other data: the set's own,
said in a ``moedd-export.json`` beside it), as a one-experiment file with no accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moedd.data import Prepared
from moedd.data.identity import paper_dataset
from moedd.formats.base import (DC_CONSTANTS, FORMATS, Imported, ImportOptions, SetFormat, constants_dataset,
                                file_sha256, load_tensor_file, pooled, single_expert)
from moedd.synthetic import SyntheticSet, SyntheticSetError

SIDECAR = "moedd-export.json"


@FORMATS.register("dc")
class DCFormat(SetFormat):
    """``res_*.pt`` of DatasetCondensation's main.py / main_DM.py."""

    name = "dc"

    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        file = _the_file(path)
        blob = load_tensor_file(file)
        if not isinstance(blob, dict) or not isinstance(blob.get("data"), list) or not blob["data"]:
            raise SyntheticSetError(f"{file}: not a DatasetCondensation result (no non-empty 'data' list)")
        exps = blob["data"]
        if not -len(exps) <= options.experiment < len(exps):
            raise SyntheticSetError(f"{file} holds {len(exps)} experiment(s); --experiment {options.experiment} is out of range")
        pair = exps[options.experiment]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise SyntheticSetError(f"{file}: data[{options.experiment}] is not an [images, labels] pair")
        dataset = constants_dataset(prepared, options)
        mean, std = DC_CONSTANTS[dataset]
        method = options.method or _method_of(file)
        provenance = {"format": self.name, "file_sha256": file_sha256(file), "experiment": options.experiment,
                      "experiments_in_file": len(exps), "constants": dataset, "label_dataset": options.dataset}
        return single_expert(pair[0], pair[1], prepared, method=method, space="normalized", mean=mean, std=std,
                             decoding="none", learned_lr=options.learned_lr, source=f"{self.name}:{file}",
                             provenance=provenance)

    def export(self, syn: SyntheticSet, out: Path) -> list[Path]:
        m = syn.meta
        dataset = paper_dataset(m.classes, m.image_shape)
        mean, std = DC_CONSTANTS[dataset] if dataset else (tuple(m.mean), tuple(m.std))
        pool = pooled(syn, "normalized", mean, std)
        ipc = len(pool.labels) // len(m.classes)
        file = out / f"res_{syn.method.upper()}_{(dataset or 'custom').upper()}_ConvNet_{ipc}ipc.pt"
        out.mkdir(parents=True)
        torch.save({"data": [[pool.images, pool.labels]], "accs_all_exps": {}}, file)
        side = out / SIDECAR
        side.write_text(json.dumps({"format": self.name, "method": syn.method, "noe": syn.noe, "ipc": ipc,
                                    "mean": list(mean), "std": list(std), "learned_lr": pool.learned_lr,
                                    "decoded_from": [x.decoding for x in syn.metas],
                                    "sha256": [x.sha256 for x in syn.metas]}, indent=2))
        return [file, side]


def _the_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("res_*.pt")) if path.is_dir() else []
    if len(found) != 1:
        raise SyntheticSetError(f"{path}: expected one res_*.pt file, found {len(found)}")
    return found[0]


def _method_of(file: Path) -> str:
    """``res_DM_CIFAR10_ConvNet_10ipc.pt`` -> ``dm``."""
    parts = file.stem.split("_")
    return parts[1].lower() if len(parts) > 2 and parts[0] == "res" else "imported"
