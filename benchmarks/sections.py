"""The table of benchmark sections: what each measures, against which reference, with which goal,
and what its note in the report says; plus the run's context that the sections read.

A new section is one entry in :data:`SECTIONS` (and, for a new reference repository, one in
:data:`REFERENCES`); ``--only``, ``--profile``, the header and the notes follow the tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import dc, idc, idm, mtt
from .harness import DSA_STRATEGY, Data, Row, make_data


@dataclass(frozen=True)
class Reference:
    """A reference repository: its option, how it is imported, and the JSON key of its path."""

    flag: str
    load: Callable[[str, torch.device], Any]
    json_key: str
    where: str = "imported in this process"


REFERENCES: dict[str, Reference] = {
    "dc": Reference("--reference-dc", lambda path, _device: dc.import_dc(path), "reference"),
    "idm": Reference("--reference-idm", lambda path, _device: idm.import_idm(path), "reference_idm"),
    "idc": Reference("--reference-idc", idc.import_idc, "reference_idc"),
    "mtt": Reference("--reference-mtt", lambda path, _device: mtt.import_mtt(path), "reference_mtt",
                     "imported in worker processes (mtt) and in this process (teacher)"),
}


@dataclass(frozen=True)
class Settings:
    """What the run measures, every default resolved (``--quick`` and the device applied)."""

    sections: frozenset[str]
    profiled: frozenset[str]
    nets: tuple[str, ...]
    quick: bool
    dm_reps: int
    with_noe2: bool
    with_bf16: bool
    train_epochs: int
    test_images: int
    test_reps: int
    idm_reps: int
    idm_sizes: idm.IDMSizes
    idc_reps: int
    idc_sizes: idc.IDCSizes
    mtt_reps: int
    mtt_rounds: int
    mtt_sizes: mtt.MTTSizes
    teacher_images: int
    teacher_reps: int

    def as_json(self, layout: str) -> dict[str, Any]:
        return {"dm_reps": self.dm_reps, "train_epochs": self.train_epochs, "test_images": self.test_images,
                "test_reps": self.test_reps, "quick": self.quick, "sections": sorted(self.sections),
                "idm_reps": self.idm_reps, "idc_reps": self.idc_reps, "idm_sizes": asdict(self.idm_sizes),
                "idc_sizes": asdict(self.idc_sizes), "mtt_reps": self.mtt_reps, "mtt_rounds": self.mtt_rounds,
                "mtt_sizes": asdict(self.mtt_sizes), "teacher_images": self.teacher_images,
                "teacher_reps": self.teacher_reps, "layout": layout}


@dataclass
class Bench:
    """One benchmark run: its settings, device, the reference paths given and the references
    imported (None where not given or not needed), and the random data, built on first use."""

    settings: Settings
    device: torch.device
    paths: dict[str, str | None]
    refs: dict[str, Any] = field(default_factory=dict)
    _data: Data | None = None

    @classmethod
    def open(cls, settings: Settings, device: torch.device, paths: dict[str, str | None]) -> Bench:
        """Import each given reference that a requested section or profile uses (a bad checkout
        exits here, before anything is measured)."""
        wanted = settings.sections | settings.profiled
        refs = {name: ref.load(paths[name], device) if paths.get(name) and wanted & sections_of(name) else None
                for name, ref in REFERENCES.items()}
        return cls(settings, device, paths, refs)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def path(self, name: str) -> str | None:
        """The checkout of reference ``name`` when it was imported (MTT's workers import it again)."""
        return self.paths.get(name) if self.refs.get(name) is not None else None

    def data(self, need_reference: bool = False) -> Data:
        """The 50,000 + 10,000 random images, with the reference's float copy where a reference
        side reads it (DM, IDM)."""
        if self._data is None or (need_reference and not self._data.indices_class):
            reference_form = need_reference or self.refs.get("idm") is not None or (
                self.refs.get("dc") is not None and "dm" in self.settings.sections)
            self._data = make_data(self.device, with_reference=reference_form)
        return self._data


@dataclass(frozen=True)
class Section:
    """One section: its reference, its goal (minimum speedup on the CPU, on CUDA), how it runs
    (given the run and the goal), its note, and whether its rows' notes are printed."""

    reference: str
    goals: tuple[float, float]
    run: Callable[[Bench, float], list[Row]]
    note: Callable[[Bench], str]
    profile: Callable[[Bench], str] | None = None
    row_notes: bool = True


def _dm(b: Bench, goal: float) -> list[Row]:
    s = b.settings
    return dc.bench_dm(b.data(), b.device, b.refs["dc"], s.dm_reps, s.with_bf16, s.with_noe2, goal=goal)


def _train(b: Bench, goal: float) -> list[Row]:
    return dc.bench_train(b.device, b.refs["dc"], list(b.settings.nets), b.settings.train_epochs, goal=goal)


def _test(b: Bench, goal: float) -> list[Row]:
    s = b.settings
    return dc.bench_test(b.data(), b.device, b.refs["dc"], list(s.nets), s.test_images, s.test_reps, goal=goal,
                         bf16=s.with_bf16)


def _idm(b: Bench, goal: float) -> list[Row]:
    return idm.bench_idm(b.data(), b.device, b.refs["idm"], b.settings.idm_reps, b.settings.idm_sizes, goal=goal)


def _idc(b: Bench, goal: float) -> list[Row]:
    return idc.bench_idc(b.data(), b.device, b.refs["idc"], b.settings.idc_reps, b.settings.idc_sizes, goal=goal)


def _mtt(b: Bench, goal: float) -> list[Row]:
    s = b.settings
    return mtt.bench_mtt(b.device, b.path("mtt"), s.mtt_reps, s.mtt_sizes, goal=goal, mem_goal=1.0,
                         rounds=s.mtt_rounds)


def _teacher(b: Bench, goal: float) -> list[Row]:
    return mtt.bench_teacher(b.device, b.refs["mtt"], b.settings.teacher_images, b.settings.teacher_reps, goal=goal)


def _dm_note(b: Bench) -> str:
    return (f"DM: median of {b.settings.dm_reps} iterations after 1 warm-up, ours and reference alternating "
            f"(batch_real 256, IPC 10, 10 classes, DSA {DSA_STRATEGY}); NoE=2 and bf16 rows are ours only.")


def _train_note(b: Bench) -> str:
    return (f"train: median of {b.settings.train_epochs} epochs (warm-up epoch dropped per block of fresh network), "
            "100 images, batch 256, DSA; ours also applies mixup fusion (2 experts x 50 images).")


def _test_note(b: Bench) -> str:
    s = b.settings
    return (f"test: median of {s.test_reps} pass(es) over {s.test_images} random images, scaled to 10,000, after a "
            f"256-image warm-up; ours test_accuracy (batch {dc.test_batch_size()}), "
            "reference epoch('test') (batch 256, in-memory TensorDataset).")


def _idm_note(b: Bench) -> str:
    return (f"IDM: median of {b.settings.idm_reps} iterations after 1 warm-up, alternating; NoE 1, IPC 10, factor 2, "
            f"{b.settings.idm_sizes.describe()}, fetch_net_num 2, ce_weight 0.5, DSA {DSA_STRATEGY}; ours "
            "method.step, reference IDM_cifar10.py's loop body (incl. queue-net training).")


def _idc_note(b: Bench) -> str:
    return (f"IDC: median of {b.settings.idc_reps} inner steps after 1 warm-up, alternating; NoE 1, IPC 10, "
            f"factor 2, {b.settings.idc_sizes.describe()}, batch_syn_max 128, CutMix p 0.5, metric mse; ours "
            "match_phase + train_net, reference condense.py's inner-loop body (per-class matchloss + train_epoch).")


def _mtt_note(b: Bench) -> str:
    s = b.settings
    return (f"MTT: median of {s.mtt_rounds} x {-(-s.mtt_reps // s.mtt_rounds)} iterations per side, each side in its "
            f"own processes (one per round, 1 warm-up each), {s.mtt_rounds} rounds in ABBA order; NoE 1, "
            f"{s.mtt_sizes.describe()}, expert_epochs 2, ZCA space, DSA {DSA_STRATEGY}, "
            "ConvNet-3 (instance norm); ours method.step, reference distill.py's loop body. Memory row: "
            "lower is better, speedup = reference / ours.")


def _teacher_note(b: Bench) -> str:
    s = b.settings
    return (f"teacher: median of {s.teacher_reps} epochs over {s.teacher_images} images after a 512-image warm-up, "
            "alternating; ours train_teacher(epochs=1), reference buffer.py's teacher set-up + "
            "epoch('train') (no per-epoch test pass); SGD 0.01, momentum 0, batch 256, DSA.")


def _profile_dm(b: Bench) -> str:
    return dc.profile_dm(b.data(need_reference=b.refs["dc"] is not None), b.device, b.refs["dc"])


def _profile_idc(b: Bench) -> str:
    return idc.profile_idc(b.data(), b.device, b.refs["idc"], b.settings.idc_sizes)


def _profile_mtt(b: Bench) -> str:
    return mtt.profile_mtt(b.device, b.path("mtt"), b.settings.mtt_sizes)


SECTIONS: dict[str, Section] = {
    "dm": Section("dc", (1.2, 2.0), _dm, _dm_note, _profile_dm, row_notes=False),
    "train": Section("dc", (1.0, 1.0), _train, _train_note, row_notes=False),
    "test": Section("dc", (1.5, 1.5), _test, _test_note, row_notes=False),
    "idm": Section("idm", (1.3, 2.0), _idm, _idm_note),
    "idc": Section("idc", (1.3, 2.0), _idc, _idc_note, _profile_idc),
    "mtt": Section("mtt", (1.3, 2.0), _mtt, _mtt_note, _profile_mtt),
    "teacher": Section("mtt", (1.0, 1.0), _teacher, _teacher_note),
}
"""In the order they run and print."""

PROFILED = tuple(name for name, s in SECTIONS.items() if s.profile is not None)


def sections_of(reference: str) -> set[str]:
    return {name for name, s in SECTIONS.items() if s.reference == reference}


def run_sections(b: Bench) -> list[Row]:
    rows: list[Row] = []
    for name, section in SECTIONS.items():
        if name in b.settings.sections:
            rows += section.run(b, section.goals[1] if b.cuda else section.goals[0])
    return rows


def run_profiles(b: Bench) -> dict[str, str]:
    return {name: section.profile(b) for name, section in SECTIONS.items()
            if name in b.settings.profiled and section.profile is not None}
