"""IDC (Efficient-Dataset-Condensation): ``data.pt`` holding ``[images, targets]``.

IDC stores its synthetic images in [0, 1] pixel space (its condensation normalises inside the
augmentation; values may leave [0, 1] slightly, as it clamps only at the start of an iteration),
at full resolution, each holding factor x factor images (multi-formation; factor 2 for CIFAR),
with int64 class-major targets. Its test decodes each image by cutting the factor x factor grid
and upsampling every crop bilinearly to full size: moedd's ``multiformation2`` decoding (the four
crops in another order, the same images). An import records space 'pixel' and that decoding
(``--factor 1``: none). Read only (the folder and DC formats carry IDC sets out, decoded).
"""

from __future__ import annotations

from pathlib import Path

from moedd.data import Prepared
from moedd.formats.base import FORMATS, Imported, ImportOptions, SetFormat, file_sha256, load_tensor_file, single_expert
from moedd.synthetic import SyntheticSetError

DECODING_BY_FACTOR = {1: "none", 2: "multiformation2"}


@FORMATS.register("idc")
class IDCFormat(SetFormat):
    """IDC's ``data.pt``."""

    name = "idc"
    writes = False

    def read(self, path: Path, prepared: Prepared, options: ImportOptions) -> Imported:
        file = path / "data.pt" if path.is_dir() else path
        blob = load_tensor_file(file)
        if not (isinstance(blob, (list, tuple)) and len(blob) == 2):
            raise SyntheticSetError(f"{file}: IDC's data.pt holds [images, targets]")
        factor = options.factor or 2
        if factor not in DECODING_BY_FACTOR:
            raise SyntheticSetError(f"--factor {factor}: moedd decodes IDC's factor 1 or 2 (CIFAR's); not {factor}")
        provenance = {"format": self.name, "file_sha256": file_sha256(file), "factor": factor,
                      "label_dataset": options.dataset}
        return single_expert(blob[0].detach(), blob[1], prepared, method=options.method or "idc", space="pixel",
                             mean=tuple(prepared.mean), std=tuple(prepared.std),
                             decoding=DECODING_BY_FACTOR[factor], learned_lr=options.learned_lr,
                             source=f"{self.name}:{file}", provenance=provenance)
