"""The report as a picture: per dataset and budget, mixture vs single expert per network, ours
next to the paper's.

One panel per (dataset, budget) of the cells; in each, a group of bars per (method, network):
our mixture (NoE > 1) and our single expert (NoE 1) at that budget, with the seeds' std as error
bars, and the paper's two numbers for the same cell hatched beside them where the paper has them.
"""

from __future__ import annotations

from pathlib import Path

from moedd._atomic import atomic_file
from moedd.nets import DISPLAY_NAMES
from moedd.report import Cell, datasets, row_keys, row_label

_BARS = [("mixture", "#1f77b4", ""), ("single", "#ff7f0e", ""), ("paper mixture", "#1f77b4", "//"),
         ("paper single", "#ff7f0e", "//")]


def _values(cells: list[Cell], row: tuple[str, str, str]) -> list[tuple[float | None, float]]:
    """(mean, std) of the four bars of one group (a row of the table: method, variant, network);
    None where there is no number. A variant's single expert is the method's own."""
    mix = [c for c in cells if c.row == row and c.noe > 1]
    single = [c for c in cells if (c.method, c.net) == (row[0], row[2]) and c.noe == 1]
    m = max(mix, key=lambda c: c.noe) if mix else None  # one mixture per budget in the paper's grid
    s = single[0] if single else None
    return [(m.mean if m else None, m.std if m else 0.0), (s.mean if s else None, s.std if s else 0.0),
            (m.paper if m else None, 0.0), (s.paper if s else None, 0.0)]


def render_figure(cells: list[Cell], path: str | Path) -> None:
    """Write the figure as a PNG to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, b) for d in datasets(cells) for b in sorted({c.budget for c in cells if c.label == d})]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.6 * max(len(row_keys(cells)), 1) + 2), 3.2 * len(panels)),
                             squeeze=False)
    for ax, (name, budget) in zip(axes[:, 0], panels, strict=True):
        here = [c for c in cells if c.label == name and c.budget == budget]
        groups = row_keys(here)
        width, shown = 0.2, set()
        for g, row in enumerate(groups):
            for k, ((mean, std), (label, colour, hatch)) in enumerate(zip(_values(here, row), _BARS, strict=True)):
                if mean is not None:
                    ax.bar(g + (k - 1.5) * width, mean, width, yerr=std or None, color=colour, hatch=hatch,
                           alpha=0.55 if hatch else 0.9, edgecolor="black", linewidth=0.4, capsize=2,
                           label=None if label in shown else label)
                    shown.add(label)
        ax.set_xticks(range(len(groups)), [f"{row_label(m, v)}\n{DISPLAY_NAMES.get(n, n)}" for m, v, n in groups], fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}, budget {budget} images/class: mixture vs single expert", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
