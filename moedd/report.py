"""Cross-architecture tables from evaluation metrics, with the paper's numbers beside ours.

One table per dataset (CIFAR-10, CIFAR-100, then other data by name: cells of different data
never share a table). Rows: (method, evaluation network); columns: IPCxNoE configurations grouped
by budget (e.g. 5x2 and 10x1 at budget 10); for the paper's datasets always the paper's four
columns in its order (b10 5x2, b10 10x1, b20 10x2, b20 20x1), "—" where we have no result, then
any others. A cell reads ``ours mean ± std (n seeds)`` (a single seed has no std) and, where the
paper has the same setting, ``paper X``. Numbers from different protocols are never mixed: the
report states the protocol of the runs it shows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from rich.table import Table

from moedd.nets import DISPLAY_NAMES
from moedd.data.identity import PAPER_KEYS, dataset_label
from moedd.paper import paper_value

_METHOD_ORDER = ["random", "herding", "dm", "idm", "idc", "mtt"]
_PAPER_COLUMNS = [(10, "5x2"), (10, "10x1"), (20, "10x2"), (20, "20x1")]
"""The paper's columns of one dataset, in its order."""


@dataclass(frozen=True)
class Reference:
    """The full-data reference of one dataset and network (``moedd full-data`` metrics)."""

    label: str
    """The data's name in metric keys (as :attr:`Cell.label`)."""
    net: str
    mean: float
    std: float
    n: int
    epochs: int
    images: int
    scale: str = "paper"


def collect_references(paths: list[Path]) -> list[Reference]:
    """Read ``moedd full-data`` metrics JSON files."""
    out = []
    for p in paths:
        d = json.loads(p.read_text())
        key = d.get("paper_dataset")
        label = dataset_label(d.get("dataset") or "custom", next((k for k, v in PAPER_KEYS.items() if v == key), None))
        out.append(Reference(label, d["net"], float(d["mean"]), float(d["std"]), len(d.get("accs", [])),
                             int(d.get("epochs", 0)), int(d.get("images", 0)), d.get("scale", "paper")))
    return out


@dataclass(frozen=True)
class Cell:
    """One evaluated (method, net, budget, IPC, NoE) result."""

    method: str
    net: str
    budget: int
    ipc: int
    noe: int
    mean: float
    std: float
    n: int
    fusion: str
    epochs: int
    dataset: str | None
    """The paper's key of the data (``c10``, ``c100``), None for other data."""
    name: str = "custom"
    """The prepared dataset's own name."""
    scale: str = "paper"
    """The run scale of the cell's distillation and evaluation (``moedd.scale``; "a/b" when they differ)."""
    variant: str = ""
    """The ablation the cell belongs to (:func:`variant_of`); "" for the default method."""
    random: float | None = None
    """Mean accuracy of the random real subset of the same dataset, budget, IPCxNoE and network
    (:func:`with_references`)."""
    full: Reference | None = None
    """The full-data reference of the same dataset and network (:func:`with_references`)."""

    @property
    def norm_gain(self) -> float | None:
        """moedd's normalised gain (acc − random) / (full − random): 0 = as good as random real
        images, 1 = as good as the full training set; None without both references (and for the
        random cells themselves)."""
        if self.method == "random" or self.random is None or self.full is None or self.full.mean <= self.random:
            return None
        return (self.mean - self.random) / (self.full.mean - self.random)

    @property
    def config(self) -> str:
        return f"{self.ipc}x{self.noe}"

    @property
    def label(self) -> str:
        """The data's name in metric keys (:func:`moedd.data.identity.dataset_label`)."""
        return dataset_label(self.name, next((k for k, v in PAPER_KEYS.items() if v == self.dataset), None))

    @property
    def paper(self) -> float | None:
        if self.variant:  # the paper's numbers are for its default method only
            return None
        return paper_value(self.method, self.net, self.dataset, self.budget, self.ipc, self.noe)

    @property
    def row(self) -> tuple[str, str, str]:
        """The table row of the cell: (method, variant, network)."""
        return self.method, self.variant, self.net

    @property
    def method_key(self) -> str:
        """Method and variant in metric keys: ``dm``, ``dm-dcor0``, ``dm-nofusion``; a heterogeneous
        mixture's ``+`` becomes ``_`` (``idc_idm``: MLflow keys allow no ``+``)."""
        return self.method.replace("+", "_") + "".join(f"-{slug}" for _, slug in _variant_parts(self.variant))


ABLATIONS = (
    ("λ=0", "dcor0", "no diversity term (distill.dcor_weight=0)"),
    ("no fusion", "nofusion", "the experts' images pooled without mixup (fusion.kind=none)"),
    ("V-statistic dCor", "vstat", "Zhen et al.'s V-statistic dCor² (distill.dcor_estimator=v_statistic)"),
)
"""The ablation variants the report names: (label, metric-key slug, what it is)."""
_DEFAULT_DCOR_WEIGHT = 0.1


def variant_of(d: dict) -> str:
    """The ablation variant of an evaluate metrics file: its deviations from the default MoE-DD
    (diversity term on with λ = 0.1 and the bias-corrected dCor², mixup fusion), joined by ", ";
    "" for the default. A single expert (NoE 1) has neither term nor fusion: always ""."""
    if int(d.get("noe", 1)) < 2:
        return ""
    parts = []
    weight = d.get("dcor_weight")
    if weight is not None and float(weight) == 0:
        parts.append("λ=0")
    elif weight is not None and float(weight) != _DEFAULT_DCOR_WEIGHT:
        parts.append(f"λ={float(weight):g}")
    if d.get("dcor_estimator", "bias_corrected") == "v_statistic" and weight != 0:
        parts.append("V-statistic dCor")
    if d.get("fusion") == "none":
        parts.append("no fusion")
    return ", ".join(parts)


def _variant_parts(variant: str) -> list[tuple[str, str]]:
    slugs = {label: slug for label, slug, _ in ABLATIONS}
    return [(p, slugs.get(p) or p.replace("λ=", "dcor").replace(".", "p")) for p in variant.split(", ") if p]


def collect(paths: list[Path]) -> list[Cell]:
    """Read evaluate metrics JSON files into cells."""
    cells = []
    for p in paths:
        d = json.loads(p.read_text())
        for net, r in d.get("nets", {}).items():
            cells.append(Cell(d["method"], net, int(d["budget"]), int(d["ipc"]), int(d["noe"]), float(r["mean"]),
                              float(r["std"]), len(r.get("accs", [])), d.get("fusion", "?"), int(d.get("epochs", 0)),
                              d.get("paper_dataset"), d.get("dataset") or "custom", _scale(d), variant_of(d)))
    return cells


def merge_cells(first: list[Cell], more: list[Cell]) -> list[Cell]:
    """``first`` plus the cells of ``more`` that ``first`` has no cell for (same dataset, budget,
    configuration, method, variant and network): the first source wins a tie."""
    seen = {(c.label, c.budget, c.config, c.row) for c in first}
    return first + [c for c in more if (c.label, c.budget, c.config, c.row) not in seen]


def with_references(cells: list[Cell], refs: list[Reference]) -> list[Cell]:
    """``cells`` with their two reference points attached: the random cell of the same dataset,
    budget, configuration and network, and the full-data reference of the same dataset and network."""
    randoms = {(c.label, c.budget, c.config, c.net): c.mean for c in cells if c.method == "random" and not c.variant}
    full = {(r.label, r.net): r for r in refs}
    return [replace(c, random=randoms.get((c.label, c.budget, c.config, c.net)), full=full.get((c.label, c.net)))
            for c in cells]


def _scale(d: dict) -> str:
    """The scale of a metrics file: its evaluation's, with the distillation's when that differs."""
    ev, di = d.get("scale", "paper"), d.get("distill_scale", d.get("scale", "paper"))
    return ev if ev == di else f"{di}/{ev}"


def _columns(cells: list[Cell]) -> list[tuple[int, str]]:
    keys = {(c.budget, c.noe, c.ipc) for c in cells}
    ours = [(b, f"{i}x{n}") for b, n, i in sorted(keys, key=lambda k: (k[0], -k[1]))]
    if cells and cells[0].dataset is not None:  # a paper dataset: its columns first, in its order
        return _PAPER_COLUMNS + [c for c in ours if c not in _PAPER_COLUMNS]
    return ours


def datasets(cells: list[Cell]) -> list[str]:
    """The datasets (:attr:`Cell.label`) of ``cells``: the paper's first, in its order, then by name."""
    order = {"cifar10": 0, "cifar100": 1}
    return sorted({c.label for c in cells}, key=lambda d: (order.get(d, 2), d))


def row_keys(cells: list[Cell]) -> list[tuple[str, str, str]]:
    """The rows (method, variant, network) of ``cells`` in table order: a method's default rows,
    then each of its ablation variants."""
    keys = {c.row for c in cells}
    order = {m: i for i, m in enumerate(_METHOD_ORDER)}
    return sorted(keys, key=lambda k: (order.get(k[0], 99), k[0], k[1], *_net_key(k[2])))


def row_label(method: str, variant: str) -> str:
    """How the table names a method row: ``DM``, ``DM (λ=0)``."""
    return method.upper() + (f" ({variant})" if variant else "")


MARK_RULE = ("▲ / ▼: the mixture beats / trails the single expert of the same budget, method and network by "
             "more than the seeds' spread, sqrt(std_mix² + std_single²) (both over ≥ 2 seeds)")


def single_of(c: Cell, cells: list[Cell]) -> Cell | None:
    """The single-expert cell (NoE 1, IPC = budget) of mixture ``c``'s dataset, budget, method and
    network (every variant of the mixture is compared with the same single expert)."""
    return next((s for s in cells if s.noe == 1 and (s.label, s.budget, s.method, s.net) == (c.label, c.budget, c.method, c.net)), None)


def mark(c: Cell, cells: list[Cell]) -> str:
    """"▲" / "▼" when mixture ``c`` beats / trails its single expert by more than the seeds'
    spread (:data:`MARK_RULE`), else ""."""
    s = single_of(c, cells) if c.noe > 1 else None
    if s is None or min(c.n, s.n) < 2:
        return ""
    diff, spread = c.mean - s.mean, math.hypot(c.std, s.std)
    return "▲" if diff > spread else "▼" if diff < -spread else ""


def _cell_text(c: Cell | None, cells: list[Cell]) -> str:
    if c is None:
        return "—"
    text = f"{c.mean:.2f} ± {c.std:.2f} (n={c.n})" if c.n > 1 else f"{c.mean:.2f} (n={c.n})"
    text = f"{mark(c, cells)}{text}"
    text += f" g {c.norm_gain:.2f}" if c.norm_gain is not None else ""
    return text + (f" (paper {c.paper:.2f})" if c.paper is not None else "")


def _grid(cells: list[Cell]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(cells)
    index = {(c.row, c.budget, c.config): c for c in cells}
    header = ["Method", "Eval net"] + [f"b{b} {cfg}" for b, cfg in cols]
    body = [
        [row_label(method, variant), DISPLAY_NAMES.get(net, net)]
        + [_cell_text(index.get(((method, variant, net), b, cfg)), cells) for b, cfg in cols]
        for method, variant, net in row_keys(cells)
    ]
    return header, body


def protocol_line(cells: list[Cell]) -> str:
    """One line naming the protocol(s) of the runs in the table."""
    runs = sorted({f"{c.epochs} epochs x {c.n} seeds" for c in cells})
    scales = sorted({c.scale for c in cells})
    fusions = sorted({c.fusion for c in cells if c.noe > 1})
    fusion = f"fusion {'/'.join(fusions)} where NoE > 1 (none at NoE = 1)" if fusions else "single experts, no fusion"
    named = [f"{label} = {what}" for label, _, what in ABLATIONS if any(label in c.variant.split(", ") for c in cells)]
    ablations = f" Ablations: {'; '.join(named)}." if named else ""
    gain = f" {GAIN_RULE}." if any(c.norm_gain is not None for c in cells) else ""
    return (f"Scale: {', '.join(scales)}. Protocol: {'; '.join(runs)}; {fusion}. "
            "Accuracy (%) on the full real test set after the last epoch, mean ± std over seeds. " + MARK_RULE + "."
            + gain + ablations)


GAIN_RULE = ("g: normalised gain (acc − random) / (full − random), moedd's measure: random = the random real "
             "subset of the same IPCxNoE and network, full = the network trained on the whole training set")


def reference_line(cells: list[Cell]) -> str:
    """The full-data references of ``cells`` (one dataset), or "" when there are none."""
    refs = sorted({c.full for c in cells if c.full is not None}, key=lambda r: _net_key(r.net))
    if not refs:
        return ""
    parts = [f"{DISPLAY_NAMES.get(r.net, r.net)} {r.mean:.2f}" + (f" ± {r.std:.2f}" if r.n > 1 else "")
             + f" (n={r.n}, {r.epochs} epochs, scale {r.scale})" for r in refs]
    return f"Full real training set ({refs[0].images:,} images): " + "; ".join(parts) + "."


def _net_key(net: str) -> tuple[int, str]:
    """The table's order of evaluation networks: the paper's four, then others by name."""
    order = {n: i for i, n in enumerate(["convnet3", "vgg11", "resnet18", "alexnet"])}
    return order.get(net, 99), net


def render_markdown(cells: list[Cell]) -> str:
    """One GitHub Markdown table per dataset, each under its heading, and the protocol line."""
    parts = []
    for name in datasets(cells):
        header, body = _grid([c for c in cells if c.label == name])
        lines = [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        ref = reference_line([c for c in cells if c.label == name])
        parts.append("\n".join(lines) + (f"\n\n{ref}" if ref else ""))
    return "\n\n".join(parts) + "\n\n" + protocol_line(cells) + "\n"


def render_csv(cells: list[Cell]) -> str:
    """Every cell as one CSV row (dataset, budget, config, method, net, mean, std, n, the single
    expert's mean, the gain over it, the mark, the paper's value), for plots and spreadsheets."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "budget", "config", "method", "net", "mean", "std", "n", "single_mean", "gain", "mark", "paper",
                "variant", "random_mean", "full_mean", "norm_gain"])
    for name in datasets(cells):
        for c in sorted((c for c in cells if c.label == name), key=lambda c: (c.budget, -c.noe, c.method, c.variant, c.net)):
            s = single_of(c, cells) if c.noe > 1 else None
            w.writerow([name, c.budget, c.config, c.method, c.net, f"{c.mean:.2f}", f"{c.std:.2f}", c.n,
                        "" if s is None else f"{s.mean:.2f}", "" if s is None else f"{c.mean - s.mean:.2f}",
                        mark(c, cells), "" if c.paper is None else f"{c.paper:.2f}", c.variant,
                        _num(c.random), _num(c.full.mean if c.full else None), _num(c.norm_gain, 4)])
    return buf.getvalue()


def _num(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _tex(text: str) -> str:
    return (text.replace("±", r"$\pm$").replace("▲", r"$\blacktriangle$").replace("▼", r"$\blacktriangledown$")
            .replace("—", "--").replace("_", r"\_").replace("%", r"\%"))


def render_latex(cells: list[Cell]) -> str:
    """One LaTeX ``tabular`` per dataset (booktabs rules; the marks need amssymb)."""
    parts = []
    for name in datasets(cells):
        header, body = _grid([c for c in cells if c.label == name])
        lines = [f"% {name}", r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
                 " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(_tex(x) for x in row) + r" \\" for row in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        ref = reference_line([c for c in cells if c.label == name])
        lines += [f"% {_tex(ref)}"] if ref else []
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n% " + _tex(protocol_line(cells)) + "\n"


def render_tables(cells: list[Cell]) -> list[Table]:
    """One rich Table per dataset (the CLI prints them)."""
    tables = []
    for name in datasets(cells):
        header, body = _grid([c for c in cells if c.label == name])
        table = Table(title=f"{name}: cross-architecture accuracy (%)")
        for h in header:
            table.add_column(h, justify="left" if h in ("Method", "Eval net") else "right")
        for row in body:
            table.add_row(*row)
        tables.append(table)
    return tables


def run_metrics(cells: list[Cell]) -> dict[str, float]:
    """The cells as MLflow metrics of the pipeline (parent) run, so that experiments compare side
    by side in the runs table and the chart view: ``acc/<dataset>/b<budget>/<IPC>x<NoE>/<method>/<net>``
    (mean, percent), ``acc_std/...`` (std over seeds) and, for every mixture (NoE > 1) with a
    single-expert cell of the same dataset, budget, method and network,
    ``gain/<dataset>/b<budget>/<IPC>x<NoE>/<method>/<net>`` = mixture mean − single mean,
    ``ngain/...`` the normalised gain (:attr:`Cell.norm_gain`) and ``full/<dataset>/<net>`` the
    full-data reference where the cells have them. An
    ablation variant's ``<method>`` carries its slugs (:attr:`Cell.method_key`: ``dm-dcor0``).
    ``<dataset>`` is the cell's :attr:`Cell.label` (``cifar10``, ``cifar100``, else the prepared
    dataset's name)."""
    out: dict[str, float] = {}
    for c in cells:
        where = f"{c.label}/b{c.budget}/{c.config}/{c.method_key}/{c.net}"
        out[f"acc/{where}"] = c.mean
        out[f"acc_std/{where}"] = c.std
        base = single_of(c, cells) if c.noe > 1 else None
        if base is not None:
            out[f"gain/{where}"] = round(c.mean - base.mean, 4)
        if c.norm_gain is not None:
            out[f"ngain/{where}"] = round(c.norm_gain, 4)
        if c.full is not None:
            out[f"full/{c.label}/{c.net}"] = c.full.mean
    return out

