"""The report of a benchmark run: the header (machine, allocator, references), the table, the
notes, and the JSON with every number and raw sample."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .checkouts import checkout_commit
from .harness import Row
from .sections import REFERENCES, SECTIONS, Bench, sections_of


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["moedd_git"] = git_state()
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity:
        info["cores_usable"] = len(affinity(0))
    return info


def git_state() -> str:
    """Commit of the moedd checkout being measured, with ``+dirty`` when files are modified."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def allocator_info() -> str:
    if os.environ.get("MOEDD_NO_MALLOPT"):
        s = "glibc malloc defaults (MOEDD_NO_MALLOPT set: tune_process skipped mallopt)"
    else:
        s = "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1) via moedd.device.tune_process()"
    extra = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    if extra:
        s += "; env: " + " ".join(extra)
    return s + "; applies to ours and the reference alike (same process)"


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "GiB":
        return f"{v:.2f} GiB"
    return f"{v:.3f} {unit}" if v < 10 else f"{v:.1f} {unit}"


def render(rows: list[Row]) -> str:
    head = ["what", "ours", "reference", "speedup", "goal", "met?"]
    body = []
    for r in rows:
        sp = r.speedup
        met = {None: "—", True: "yes", False: "**NO**"}[r.met]
        body.append([
            r.what, fmt(r.ours, r.unit), fmt(r.ref, r.unit), f"{sp:.2f}x" if sp is not None else "—",
            f"≥{r.goal:g}x" if r.goal is not None else "—", met,
        ])
    widths = [max([len(h), *(len(b[i]) for b in body)]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])



def layout() -> str:
    return os.environ.get("MOEDD_LAYOUT", "auto")


def print_header(b: Bench, info: dict[str, Any], alloc: str) -> None:
    """The machine, the allocator, and for each reference its checkout (or that it was not given)."""
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
          + (f", GPU {info['gpu']}" if b.cuda else "")
          + f"; torch {info['torch']}; device {b.device}; moedd {info['moedd_git']}; {info['date']}"
          + f"; layout {layout()} (MOEDD_LAYOUT)", flush=True)
    print(f"allocator: {alloc}", flush=True)
    for name, ref in REFERENCES.items():
        secs = sections_of(name)
        if not b.settings.sections & secs:
            continue
        path, label = b.paths.get(name), "/".join(sorted(secs))
        if b.refs.get(name) is None:
            print(f"reference {label}: not given ({ref.flag} PATH); only our numbers", flush=True)
        else:
            print(f"reference {label}: {Path(path).resolve()} {checkout_commit(path)}({ref.where})", flush=True)


def notes(b: Bench, rows: list[Row], total: float) -> list[str]:
    """Per section its protocol, the rows' own notes, a warning for unsteady repetitions, the total."""
    out = [section.note(b) for name, section in SECTIONS.items() if name in b.settings.sections]
    shown = {name for name, section in SECTIONS.items() if section.row_notes}
    out += [f"{r.what}: {r.note}" for r in rows if r.note and r.section in shown]
    unsteady = [f"{r.what} ({side} {max(xs) / min(xs):.1f}x)" for r in rows
                for side, xs in (("ours", r.ours_samples), ("ref", r.ref_samples))
                if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 1.5]
    if unsteady:
        out.append("WARNING: unsteady machine, repetitions of one measurement differ by more than 1.5x (max/min): "
                   + "; ".join(unsteady) + ". Re-run before trusting these rows.")
    out.append(f"Total {total:.0f} s.")
    return out


def print_profiles(profiles: dict[str, str]) -> None:
    for name, text in profiles.items():
        print(f"\nprofile of one {name.upper()} step:")
        print(text)


def write_json(path: str, b: Bench, info: dict[str, Any], alloc: str, rows: list[Row], total: float,
               profiles: dict[str, str]) -> None:
    out = {
        "machine": info, "allocator": alloc,
        **{ref.json_key: b.paths.get(name) for name, ref in REFERENCES.items()},
        "argv": sys.argv,
        "settings": b.settings.as_json(layout()),
        "seconds_total": total,
        "profiles": profiles,
        "rows": [{**asdict(r), "speedup": r.speedup, "met": r.met} for r in rows],
    }
    Path(path).write_text(json.dumps(out, indent=2))
