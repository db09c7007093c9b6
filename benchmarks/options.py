"""The command line of ``bench.py`` and the settings it resolves (repetitions, sizes, sections),
checked before anything is measured."""

from __future__ import annotations

import argparse
import torch

from .harness import NETS, NUM_TEST, bf16_available
from .idc import IDCSizes
from .idm import IDMSizes
from .mtt import MTT_WORKER_SIDES, MTTSizes
from .sections import PROFILED, REFERENCES, SECTIONS, Settings

DESCRIPTION = "Speed benchmark: moedd vs. the reference code of each method, timed the same way on the same machine."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--reference-dc", metavar="PATH", help="DatasetCondensation checkout to compare against")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, small test pass, no extra DM rows (~1 min on CPU)")
    p.add_argument("--reference-idm", metavar="PATH", help="uitrbn/IDM checkout to compare the IDM row against")
    p.add_argument("--reference-idc", metavar="PATH",
                   help="snu-mllab/Efficient-Dataset-Condensation checkout to compare the IDC row against")
    p.add_argument("--reference-mtt", metavar="PATH",
                   help="GeorgeCazenavette/mtt-distillation checkout to compare the MTT and teacher rows against")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of sections: {', '.join(SECTIONS)} (none: only what --profile asks for)")
    p.add_argument("--nets", default=",".join(NETS), help="evaluation networks (default: all four)")
    p.add_argument("--dm-reps", type=int, help="timed DM iterations per row (default 5; quick 2)")
    p.add_argument("--train-epochs", type=int, help="timed training epochs per net (default 6; quick 2)")
    p.add_argument("--test-images", type=int, help="test images per timed pass, reported per 10k "
                   "(default: 10000 on CUDA, 1000 on CPU; quick 256 on CPU)")
    p.add_argument("--test-reps", type=int, help="timed test passes per net (default 3; quick 1)")
    p.add_argument("--idm-reps", type=int, help="timed IDM iterations per side (default 5; quick 2)")
    p.add_argument("--idc-reps", type=int, help="timed IDC inner steps per side (default 5; quick 2)")
    p.add_argument("--mtt-reps", type=int, help="timed MTT iterations per side (default 6; quick 2)")
    p.add_argument("--mtt-rounds", type=int, help="MTT worker rounds per side, alternating ABBA (default 2; quick 1)")
    p.add_argument("--teacher-images", type=int, default=50_000,
                   help="real images per teacher epoch (50000; fewer: a harness check, the row gets no goal)")
    p.add_argument("--teacher-reps", type=int, help="timed teacher epochs per side (default 3; quick 1)")
    g = p.add_argument_group("reduced IDM/IDC/MTT sizes, for checking the harness (both sides alike; rows get no goal)")
    g.add_argument("--idm-batch-real", type=int, default=IDMSizes.batch_real, help="real images per class (256)")
    g.add_argument("--idm-train-steps", type=int, default=IDMSizes.model_train_steps,
                   help="model_train_steps per trained queue net (10)")
    g.add_argument("--idm-trained-bs", type=int, default=IDMSizes.trained_bs, help="queue-net training batch (256)")
    g.add_argument("--idc-batch-real", type=int, default=IDCSizes.batch_real,
                   help="real images per class for matching and per network-training batch (64)")
    g.add_argument("--idc-n-data", type=int, default=IDCSizes.n_data, help="real samples per network update (2000)")
    g.add_argument("--mtt-ipc", type=int, default=MTTSizes.ipc, help="MTT images per class (10; batch_syn = all)")
    g.add_argument("--mtt-syn-steps", type=int, default=MTTSizes.syn_steps, help="MTT unrolled student steps (30)")
    p.add_argument("--_mtt-worker", choices=MTT_WORKER_SIDES, help=argparse.SUPPRESS)  # internal: one MTT side
    p.add_argument("--_mtt-out", help=argparse.SUPPRESS)  # internal: where that worker writes its JSON
    p.add_argument("--no-noe2", action="store_true", help="skip the NoE=2 DM row")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 DM row")
    p.add_argument("--profile", nargs="?", const="dm", metavar="SECTIONS",
                   help="also profile one warm step of ours and of the reference (torch.profiler: GPU busy share, "
                        f"kernel launches, top ops) for a comma list of {', '.join(PROFILED)} (default dm)")
    p.add_argument("--json", metavar="PATH", help="write all numbers (and raw samples) as JSON")
    return p.parse_args(argv)



def reference_paths(a: argparse.Namespace) -> dict[str, str | None]:
    """The checkout given for each reference (``--reference-dc`` -> ``a.reference_dc``), or None."""
    return {name: getattr(a, ref.flag.removeprefix("--").replace("-", "_")) for name, ref in REFERENCES.items()}


def _comma_list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def resolve(a: argparse.Namespace, device: torch.device) -> Settings:
    """The settings of the command line ``a``; a one-line exit for an unknown section or network
    or a size below 1."""
    sections = {s for s in _comma_list(a.only) if s != "none"}
    if sections - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {sorted(sections - set(SECTIONS))}")
    profiled = set(_comma_list(a.profile))
    if profiled - set(PROFILED):
        raise SystemExit(f"--profile: unknown section(s) {sorted(profiled - set(PROFILED))}; one of {', '.join(PROFILED)}")
    nets = _comma_list(a.nets)
    for n in nets:
        if n not in NETS:
            raise SystemExit(f"--nets: {n} is not one of {', '.join(NETS)}")
    mtt_sizes = MTTSizes(a.mtt_ipc, a.mtt_syn_steps)
    if a.teacher_images < 1 or mtt_sizes.ipc < 1 or mtt_sizes.syn_steps < 1:
        raise SystemExit("--teacher-images, --mtt-ipc and --mtt-syn-steps must be >= 1")
    q = a.quick
    return Settings(
        sections=frozenset(sections), profiled=frozenset(profiled), nets=tuple(nets), quick=q,
        dm_reps=a.dm_reps or (2 if q else 5), with_noe2=not a.no_noe2 and not q,
        with_bf16=not a.no_bf16 and not q and bf16_available(device),
        train_epochs=a.train_epochs or (2 if q else 6),
        test_images=min(a.test_images or (NUM_TEST if device.type == "cuda" else (256 if q else 1000)), NUM_TEST),
        test_reps=a.test_reps or (1 if q else 3),
        idm_reps=a.idm_reps or (2 if q else 5), idm_sizes=IDMSizes(a.idm_batch_real, a.idm_train_steps, a.idm_trained_bs),
        idc_reps=a.idc_reps or (2 if q else 5), idc_sizes=IDCSizes(a.idc_batch_real, a.idc_n_data),
        mtt_reps=a.mtt_reps or (2 if q else 6), mtt_rounds=a.mtt_rounds or (1 if q else 2), mtt_sizes=mtt_sizes,
        teacher_images=a.teacher_images, teacher_reps=a.teacher_reps or (1 if q else 3),
    )
