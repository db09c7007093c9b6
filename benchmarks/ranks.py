"""Experts on ranks against one process: iteration wall-clock of NoE=2 DM and IDM, and the time
the ranks spend in the diversity term's collective.

For two experts at the ``cpu`` scale (budget 10: 5 images per class each) on ``--prepared``,
``--iterations`` iterations (after ``--warmup``) of each method are timed, first in one process
with ``--threads`` threads, then on two gloo ranks with ``--threads``/2 threads each (the same
cores), one expert per rank, as ``torchrun --nproc-per-node 2 -m moedd.cli distill`` runs them.
On the ranks, the forward all_gather of the features (``moedd.distributed.gather_experts``) is
timed where it is called: it includes waiting for the other rank, so it is the collective's whole
cost to the iteration; its backward (a reduce-scatter of the same size) is not separately timed.
A second figure times the collective alone (forward and backward, the same tensor, ranks in step).
It measures; it asserts nothing. On one CPU the two ranks share the cores the one process had,
so parity is the best to expect; the speed-up needs one device per rank.

    python -m benchmarks.ranks --prepared data/cifar10/prepared --iterations 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ("dm", "idm")


def _worker(rank: int, world: int, init: str, name: str, args: argparse.Namespace, out: str) -> None:
    import moedd.distributed as moedd_dist
    from moedd.data import load_prepared, make_partition
    from moedd.distill import build_method, rank_block, start_images
    from moedd.params import load_params

    torch.set_num_threads(max(1, args.threads // world))
    ranks = None
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        ranks = moedd_dist.Ranks(rank, world, 0)
    prep = load_prepared(args.prepared)
    total = args.warmup + args.iterations
    params = load_params(None, {"scale": "cpu", "distill.budget": 10, f"experts.{name}.iterations": total})
    part = make_partition(prep.train_labels, prep.num_classes, 2, 0, prep.digest)
    method = build_method(name, params, prep, part, torch.device("cpu"), local=rank_block(2, ranks))
    spent = [0.0]
    gather = moedd_dist.gather_experts

    def timed_gather(local: torch.Tensor) -> torch.Tensor:  # read at call time by the diversity term
        t0 = time.perf_counter()
        try:
            return gather(local)
        finally:
            spent[0] += time.perf_counter() - t0

    moedd_dist.gather_experts = timed_gather  # type: ignore[assignment]
    syn = start_images(method)
    for it in range(args.warmup):
        method.step(syn, it)
    if ranks:
        dist.barrier()
    spent[0], t0 = 0.0, time.perf_counter()
    for it in range(args.warmup, total):
        method.step(syn, it)
    if ranks:
        dist.barrier()
    result = {"s_per_it": (time.perf_counter() - t0) / args.iterations, "gather_s_per_it": spent[0] / args.iterations}
    if ranks:
        result["alone_s"] = _collective_alone(gather, prep.num_classes)
        dist.destroy_process_group()
    torch.save(result, f"{out}.{rank}")


def _collective_alone(gather, num_classes: int, reps: int = 20) -> float:
    """Median seconds of one all_gather forward + backward of one expert's ConvNet-3 features
    (C classes x 5 images x 2048), the ranks in step (a barrier before each)."""
    times = []
    for _ in range(reps):
        x = torch.randn(1, num_classes, 5, 2048, requires_grad=True)
        dist.barrier()
        t0 = time.perf_counter()
        gather(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(name: str, world: int, args: argparse.Namespace) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        mp.start_processes(_worker, args=(world, f"file://{tmp}/rendezvous", name, args, out), nprocs=world,
                           start_method="spawn")
        return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    print(f"NoE=2, cpu scale, budget 10; {args.iterations} iterations after {args.warmup}; one process with "
          f"{args.threads} threads vs 2 gloo ranks with {max(1, args.threads // 2)} each")
    print("| method | 1 process s/it | 2 ranks s/it | ranks / process | all_gather in the iteration s/it (rank 0, 1) "
          "| all_gather alone, fwd+bwd ms |\n|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        (one,) = _measure(name, 1, args)
        two = _measure(name, 2, args)
        ranked = max(r["s_per_it"] for r in two)
        waits = ", ".join(f"{r['gather_s_per_it']:.3f}" for r in two)
        print(f"| {name} | {one['s_per_it']:.2f} | {ranked:.2f} | {ranked / one['s_per_it']:.2f}x | {waits} "
              f"| {1000 * max(r['alone_s'] for r in two):.2f} |", flush=True)


if __name__ == "__main__":
    main()
