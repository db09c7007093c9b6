"""Does the diversity term see anything at MoE-DD's sizes? dCor² of two experts' features per class.

Prints a table: for n images per class per expert, the V-statistic dCor² (Zhen et al.'s estimator)
and the bias-corrected R* (moedd's default), mean ± sd over classes and draws, for

- ``independent``: two disjoint random draws of n real images of a class (what two experts on
  disjoint shards start from with ``init: real``), features of a fresh ConvNet-3 as DM uses them;
- ``identical``: one draw against itself (the most dependent pair);
- ``gaussian``: independent Gaussian vectors of the feature dimension (the estimator alone);
- with ``--synthetic`` a NoE-2 set: its expert 0 against expert 1 (what the distillation logged).

A term that gives the same value for ``independent`` and ``identical`` cannot make experts diverse.
It measures; it asserts nothing (tests/test_moe.py holds the checks).

    python -m benchmarks.dcor_saturation --prepared data/cifar10/prepared --n 5 10
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from moedd.data import load_prepared
from moedd.moe import dcor2, dcor2_bias_corrected
from moedd.nets import create_net


def _features(net: torch.nn.Module, images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.embed((images_u8.float() / 255 - mean) / std)


def _stats(values: list[float]) -> str:
    return f"{statistics.fmean(values):6.3f} ± {statistics.pstdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[5, 10], help="images per class per expert")
    ap.add_argument("--draws", type=int, default=5, help="fresh networks and draws per class")
    ap.add_argument("--synthetic", type=Path, default=None, help="a NoE-2 synthetic set directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    prep = load_prepared(args.prepared)
    c = prep.train_images.shape[1]
    mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in (prep.mean, prep.std))
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n in args.n:
        out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in ("independent", "identical", "gaussian")}
        for draw in range(args.draws):
            torch.manual_seed(args.seed * 1000 + draw)
            net = create_net("convnet3", prep.num_classes, channels=c, image_size=prep.train_images.shape[2]).eval()
            for k in range(prep.num_classes):
                idx = (prep.train_labels == k).nonzero().flatten()
                pick = idx[torch.randperm(len(idx), generator=gen)[: 2 * n]]
                a = _features(net, prep.train_images[pick[:n]], mean, std)
                b = _features(net, prep.train_images[pick[n:]], mean, std)
                g1, g2 = torch.randn(a.shape, generator=gen), torch.randn(a.shape, generator=gen)
                for name, (x, y) in (("independent", (a, b)), ("identical", (a, a)), ("gaussian", (g1, g2))):
                    out[name][0].append(float(dcor2(x, y)))
                    out[name][1].append(float(dcor2_bias_corrected(x, y)))
        for name, (v, u) in out.items():
            rows.append((n, name, _stats(v), _stats(u), len(v)))
    if args.synthetic is not None:
        from moedd.synthetic import load_synthetic

        syn = load_synthetic(args.synthetic)
        if syn.noe != 2 or syn.meta.space != "normalized":
            raise SystemExit("--synthetic needs a NoE-2 set stored in the normalised space (DM, IDM's stored images)")
        v, u = [], []
        for draw in range(args.draws):
            torch.manual_seed(args.seed * 1000 + draw)
            net = create_net("convnet3", prep.num_classes, channels=c, image_size=prep.train_images.shape[2]).eval()
            with torch.no_grad():
                fa, fb = (net.embed(x.float()) for x in syn.images)
            ya, yb = syn.labels
            for k in range(prep.num_classes):
                x, y = fa[ya == k], fb[yb == k]
                v.append(float(dcor2(x, y)))
                u.append(float(dcor2_bias_corrected(x, y)))
        rows.append((syn.meta.ipc, f"synthetic {args.synthetic.name}", _stats(v), _stats(u), len(v)))
    print(f"| n | pair | V-statistic dCor² | bias-corrected R* | classes x draws |\n|---|---|---|---|---|")
    for n, name, v, u, count in rows:
        print(f"| {n} | {name} | {v} | {u} | {count} |")


if __name__ == "__main__":
    main()
