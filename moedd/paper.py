"""The MoE-DD results table (docs/methods.md §Paper table), as data for `moedd report`.

Test accuracy (%) of networks trained on the distilled set; images distilled with ConvNet-3.
Columns are (dataset, budget, IPCxNoE). One cell of the poster is unreadable (MTT, ConvNet-3,
CIFAR-100, budget 10, 10x1: "20.53 or 29.53") and is left out.
"""

from __future__ import annotations

_COLUMNS = [("c10", 10, "5x2"), ("c10", 10, "10x1"), ("c10", 20, "10x2"), ("c10", 20, "20x1"),
            ("c100", 10, "5x2"), ("c100", 10, "10x1"), ("c100", 20, "10x2"), ("c100", 20, "20x1")]

_ROWS: dict[tuple[str, str], list[float | None]] = {
    ("idc", "convnet3"): [53.32, 52.73, 55.52, 54.05, 31.44, 31.03, 36.03, 35.33],
    ("idc", "vgg11"): [51.41, 49.70, 53.37, 51.74, 29.62, 27.38, 34.53, 31.25],
    ("idc", "resnet18"): [51.56, 47.51, 54.06, 50.06, 30.74, 28.59, 36.08, 34.09],
    ("idc", "alexnet"): [46.34, 40.69, 52.01, 44.04, 26.45, 20.02, 33.84, 25.76],
    ("idm", "convnet3"): [49.04, 47.61, 52.31, 50.48, 26.87, 27.45, 32.38, 31.67],
    ("idm", "vgg11"): [44.53, 44.65, 48.31, 47.70, 23.06, 22.90, 28.57, 28.84],
    ("idm", "resnet18"): [45.05, 42.84, 49.52, 46.02, 24.29, 25.35, 32.08, 32.04],
    ("idm", "alexnet"): [37.19, 34.96, 44.32, 41.71, 19.49, 17.07, 27.16, 22.59],
    ("mtt", "convnet3"): [53.82, 58.17, 60.14, 60.82, 30.00, None, 28.50, 29.80],
    ("mtt", "vgg11"): [49.86, 46.59, 52.04, 47.27, 29.23, 27.99, 27.80, 27.72],
    ("mtt", "resnet18"): [52.14, 46.17, 58.13, 53.94, 30.19, 27.81, 27.55, 26.05],
    ("mtt", "alexnet"): [44.16, 32.97, 52.11, 50.01, 25.27, 23.88, 28.10, 27.67],
}

PAPER: dict[tuple[str, str, str, int, str], float] = {
    (method, net, ds, budget, cfg): value
    for (method, net), values in _ROWS.items()
    for (ds, budget, cfg), value in zip(_COLUMNS, values, strict=True)
    if value is not None
}
"""(method, net, dataset key, budget, "IPCxNoE") -> accuracy in %."""


def paper_value(method: str, net: str, dataset: str | None, budget: int, ipc: int, noe: int) -> float | None:
    """The paper's number for this setting, or None when the paper has none."""
    if dataset is None:
        return None
    return PAPER.get((method, net, dataset, budget, f"{ipc}x{noe}"))
