"""Seeds trained together (``evaluate.seeds_together``) against the same seeds one by one.

For a ConvNet-3 evaluation on a distilled-set-sized training set (``--images`` real training
images, 100 = CIFAR-10 at 10 images per class), the seeds of ``--seeds`` are trained for
``--epochs`` epochs with the evaluation protocol (SGD, DSA, mixup over two pseudo-experts), first
one after another (``moedd.evaluate.train_network``), then as one stacked model
(``moedd.seeds.train_seeds_together``). Printed per device: both times (median of ``--reps``),
the speed-up, the achieved GFLOP/s of each (FLOPs of one forward+backward counted by
``torch.utils.flop_counter``) and, as the device's practical peak, the GFLOP/s of a large float32
matrix product measured in the same run. It measures; it asserts nothing. The goal of
issue 18 (>= 3x five sequential trainings) is for a GPU, where a small ConvNet's seeds are
launch-bound; on a CPU the ratio shows whether stacking costs anything there.

    python -m benchmarks.seeds_together --prepared data/cifar10/prepared --images 100 --epochs 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from moedd.config import EvaluateConfig, FusionConfig
from moedd.data import load_prepared
from moedd.evaluate import TrainingSet, normalize_test, train_network
from moedd.nets import create_net
from moedd.seeds import train_seeds_together


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, reps: int, dev: torch.device) -> float:
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gflops(dev: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    a @ b
    return 2 * n ** 3 / _timed(lambda: a @ b, reps, dev) / 1e9


def _step_flops(num_classes: int, shape: tuple[int, ...], batch: int) -> float:
    """FLOPs of one forward + backward of ConvNet-3 on ``batch`` images."""
    net = create_net("convnet3", num_classes, channels=shape[0], image_size=shape[1])
    x = torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    prep = load_prepared(args.prepared)
    pick = torch.randperm(len(prep.train_labels), generator=torch.Generator().manual_seed(0))[: args.images]
    x = normalize_test(prep.train_images[pick], tuple(prep.mean), tuple(prep.std), dev)
    data = TrainingSet(x, prep.train_labels[pick].to(dev), (torch.arange(len(pick)) % 2).to(dev), 0.01)
    seeds = list(range(args.seeds))
    cfg = EvaluateConfig(epochs=args.epochs, nets=["convnet3"], seeds=seeds)
    fusion, c = FusionConfig(), prep.num_classes
    seq = _timed(lambda: [train_network("convnet3", data, cfg, fusion, s, c) for s in seeds], args.reps, dev)
    tog = _timed(lambda: train_seeds_together("convnet3", data, cfg, fusion, seeds, c), args.reps, dev)
    steps = args.epochs * -(-len(pick) // cfg.batch_size)
    flops = args.seeds * steps * _step_flops(c, tuple(prep.image_shape), min(cfg.batch_size, len(pick)))
    peak = _peak_gflops(dev)
    print(f"device {dev}; threads {torch.get_num_threads()}; ConvNet-3, {args.seeds} seeds x {args.epochs} epochs "
          f"on {len(pick)} images (batch {cfg.batch_size}, DSA, mixup); median of {args.reps}")
    print("| mode | seconds | GFLOP/s | of the matmul peak |\n|---|---|---|---|")
    for mode, t in (("one by one", seq), ("together", tog)):
        print(f"| {mode} | {t:.2f} | {flops / t / 1e9:.1f} | {flops / t / 1e9 / peak:.0%} |")
    print(f"\nspeed-up together / one by one: {seq / tog:.2f}x; float32 matmul peak {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
