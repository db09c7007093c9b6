#!/usr/bin/env python
"""Speed benchmark: moedd vs. the reference code of each method, timed the same way on the same machine.

Prints DM iterations/s and evaluation epochs/s (+ the 10,000-image test pass) per network at
the standard sizes (CIFAR shapes 3x32x32, 10 classes x 5000 training images, batch_real 256,
IPC 10) next to the reference implementation (VICO-UoE/DatasetCondensation: ``main_DM.py`` for
DM, ``utils.epoch`` as called by ``utils.evaluate_synset`` for evaluation), and seconds per IDM
iteration and per IDC inner step at their CIFAR-10 IPC 10 settings next to uitrbn/IDM
(``IDM_cifar10.py``'s loop body) and snu-mllab/Efficient-Dataset-Condensation (``condense.py``'s
inner-loop body), and seconds and peak memory per MTT iteration (CIFAR-10 IPC 10) and seconds per
teacher epoch next to GeorgeCazenavette/mtt-distillation (``distill.py``'s loop body, ``buffer.py``'s
epoch). This is a benchmark, not a test: it asserts nothing and needs no dataset (random
CIFAR-shaped tensors are used).

The references are NOT vendored: pass the paths of checkouts with ``--reference-dc PATH``,
``--reference-idm PATH``, ``--reference-idc PATH``, ``--reference-mtt PATH``; they are imported at
run time in this same process, so both sides share the interpreter, the thread pool and the
allocator settings (``moedd.device.tune_process``). Exception: the MTT rows run each side in its
own child process (``bench.py --_mtt-worker ours|ref``), because peak memory is per process.
Without a reference path only our numbers are printed for its rows.

Usage::

    python benchmarks/bench.py --reference-dc /tmp/dc-ref --only dm,train,test   # ~4.5 min on 2 CPU cores
    python benchmarks/bench.py --reference-dc /tmp/dc-ref --quick                # ~1 min (+ IDM/IDC rows)
    python benchmarks/bench.py --only idm,idc --reference-idm /tmp/idm-ref --reference-idc /tmp/idc-ref
    python benchmarks/bench.py --only mtt,teacher --reference-mtt /tmp/mtt-ref
    python benchmarks/bench.py --json bench.json --device cuda

Layout: ``harness`` (sizes, timing protocol, result rows, data, our side), ``checkouts``
(importing a reference), one module per reference (``dc``, ``idm``, ``idc``, ``mtt``), the table
of sections (``sections``), the command line (``options``) and the report (``report``).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` and, uninstalled, `moedd`

from moedd.device import resolve_device, tune_process  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.mtt import mtt_worker  # noqa: E402
from benchmarks.options import parse_args, reference_paths, resolve  # noqa: E402
from benchmarks.sections import Bench, run_profiles, run_sections  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tune_process()
    try:
        device = resolve_device(a.device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    settings = resolve(a, device)
    if a._mtt_worker:  # a child of bench_mtt: one side of the MTT rows, in its own process
        return mtt_worker(a._mtt_worker, device, settings.mtt_sizes, settings.mtt_reps, a.reference_mtt, a._mtt_out)
    bench = Bench.open(settings, device, reference_paths(a))
    info, alloc = report.machine_info(device), report.allocator_info()
    report.print_header(bench, info, alloc)
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning)  # the reference's affine_grid/meshgrid warnings
    rows = run_sections(bench)
    total = time.perf_counter() - t_start
    print(f"\n{report.render(rows)}\n")
    print("\n".join(report.notes(bench, rows, total)))
    profiles = run_profiles(bench)
    report.print_profiles(profiles)
    if a.json:
        report.write_json(a.json, bench, info, alloc, rows, total, profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
