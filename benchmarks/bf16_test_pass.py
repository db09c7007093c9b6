"""The test pass in bf16 autocast against fp32: accuracy difference and speed, per network.

Each network is trained briefly (fp32, the evaluation protocol's optimiser and DSA) on a random
subset of the real training set, so that its predictions are not trivial, then the whole real test
set is classified twice, in fp32 and under bf16 autocast (``evaluate.test_precision``), with the
same weights. Printed: both accuracies, their difference in points (goal: within 0.1), both times
(median of ``--reps``) and the speed-up. It measures; it asserts nothing.

    python -m benchmarks.bf16_test_pass --prepared data/cifar10/prepared --train-images 1000 --epochs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moedd.config import EvaluateConfig, FusionConfig
from moedd.data import load_prepared
from moedd.evaluate import TrainingSet, normalize_test, test_accuracy, train_network
from moedd.precision import native_bf16


def _timed(fn, reps: int) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--nets", nargs="+", default=["convnet3", "vgg11", "resnet18", "alexnet"])
    ap.add_argument("--train-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--test-batch-size", type=int, default=1000)
    args = ap.parse_args()
    dev = torch.device("cpu")
    prep = load_prepared(args.prepared)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(prep.train_labels), generator=gen)[: args.train_images]
    mean, std = tuple(prep.mean), tuple(prep.std)
    data = TrainingSet(normalize_test(prep.train_images[pick], mean, std, dev), prep.train_labels[pick],
                       torch.zeros(len(pick), dtype=torch.long), 0.01)
    test_x = normalize_test(prep.test_images, mean, std, dev)
    cfg = EvaluateConfig(epochs=args.epochs, nets=args.nets, seeds=[0])
    print(f"CPU native bf16: {native_bf16(dev)}; threads {torch.get_num_threads()}; {len(test_x)} test images; "
          f"nets trained {args.epochs} epochs on {len(pick)} images")
    print("| net | fp32 acc | bf16 acc | diff (points) | fp32 s | bf16 s | speed-up |\n|---|---|---|---|---|---|---|")
    for name in args.nets:
        net = train_network(name, data, cfg, FusionConfig(kind="none"), 0, prep.num_classes)
        run32 = lambda: test_accuracy(net, test_x, prep.test_labels, args.test_batch_size, torch.float32)  # noqa: E731
        run16 = lambda: test_accuracy(net, test_x, prep.test_labels, args.test_batch_size, torch.bfloat16)  # noqa: E731
        run32(), run16()  # warm-up (kernel selection)
        a32, t32 = _timed(run32, args.reps)
        a16, t16 = _timed(run16, args.reps)
        print(f"| {name} | {100 * a32:.2f} | {100 * a16:.2f} | {100 * (a16 - a32):+.2f} | {t32:.2f} | {t16:.2f} | "
              f"{t32 / t16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
