"""The benchmark harness runs end to end on our side (no reference checkouts here) at reduced
sizes, and refuses bad options before measuring. Speed itself is the benchmark's business, not
the suite's: nothing here looks at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--only", "idm,idc,mtt,teacher", "--idm-batch-real", "4", "--idm-train-steps", "1",
        "--idm-trained-bs", "8", "--idc-batch-real", "4", "--idc-n-data", "8", "--mtt-ipc", "1",
        "--mtt-syn-steps", "1", "--teacher-images", "64", "--idm-reps", "1", "--idc-reps", "1", "--mtt-reps", "1",
        "--teacher-reps", "1", "--device", "cpu"]


def test_bench_runs_every_our_side_section_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), *TINY, "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["what"]: r for r in result["rows"]}
    assert [r["section"] for r in result["rows"]] == ["idm", "idc", "mtt", "mtt", "teacher"]
    for r in rows.values():
        assert r["ours"] > 0 and r["ref"] is None and r["goal"] is None  # reduced sizes: no goal
        assert "harness check" in r["note"]
    timed = [r for r in result["rows"] if r["unit"] == "s"]
    assert all(len(r["ours_samples"]) == 1 for r in timed)
    assert result["settings"]["mtt_sizes"] == {"ipc": 1, "syn_steps": 1}
    assert result["settings"]["sections"] == ["idc", "idm", "mtt", "teacher"]
    assert "reference idm: not given (--reference-idm PATH)" in proc.stdout
    assert "| IDC inner step, IPC 10 (s)" in proc.stdout  # the table


@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "dm,foo"], "--only: unknown section(s) ['foo']"),
    (["--profile", "train"], "--profile: unknown section(s) ['train']; one of dm, idc, mtt"),
    (["--nets", "lenet"], "--nets: lenet is not one of convnet3, vgg11, resnet18, alexnet"),
    (["--mtt-ipc", "0"], "--teacher-images, --mtt-ipc and --mtt-syn-steps must be >= 1"),
])
def test_bad_options_stop_before_anything_is_measured(argv: list[str], message: str) -> None:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.options import parse_args, resolve
    finally:
        sys.path.remove(str(REPO))
    with pytest.raises(SystemExit) as err:
        resolve(parse_args(argv), torch.device("cpu"))
    assert str(err.value) == message
