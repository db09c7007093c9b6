"""Run scales: one choice (``scale: paper | cpu | smoke`` in params.yaml) that sizes every method
and stage together.

A scale is a set of dotted settings (``evaluate.epochs``, ``experts.dm.iterations``...). The
stage sections' rows are in :data:`STAGE_SCALES`; each expert method declares its own rows next to
its code (``ExpertMethod.scales``), so a new method brings its sizes with it.

- ``paper``: nothing is set; the config classes' defaults are the papers' sizes (20,000 DM/IDM
  iterations, 2,000 IDC outer iterations, 100 MTT teachers, 1,000 evaluation epochs x 5 seeds on
  four networks).
- ``cpu``: the size of the CPU numbers in docs/results.md (a table column in hours on two cores):
  400 DM / 50 IDM / 3 IDC / 20 MTT iterations, one MTT teacher per shard, ConvNet-3 for 300
  epochs x 3 seeds, the full-data reference for 10 epochs x 1 seed.
- ``smoke``: the table's whole pipeline in minutes (seconds per stage on tiny data): a few
  iterations, two evaluation epochs, one seed. A pipeline check, not a result, so it also sets
  ``preset: none`` for the methods that have presets (their rows would otherwise bring back
  paper-sized MTT teachers and IDC/IDM settings).

Precedence, lowest first: the config classes' defaults < the scale < the preset row of the
dataset and IPC (``moedd.params.method_config``) < what params.yaml or ``-S`` sets. The scale only
fills settings that params.yaml leaves ``null`` (or out), so params.yaml does not write the
paper-scale sizes itself (it would override every scale) but lists each scaled key as ``null``,
for ``dvc exp run -S`` to find; :func:`apply_scale` returns which keys it filled, so that a preset
row still wins over them.
"""

from __future__ import annotations

from typing import Any, Literal

from moedd.errors import ConfigError

Scale = Literal["paper", "cpu", "smoke"]
SCALES: tuple[str, ...] = ("paper", "cpu", "smoke")

STAGE_SCALES: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "trajectories.num_teachers": 1,
        "evaluate.epochs": 300, "evaluate.seeds": [0, 1, 2], "evaluate.nets": ["convnet3"],
        "full_data.epochs": 10, "full_data.seeds": [0],
    },
    "smoke": {
        "trajectories.num_teachers": 1,
        "evaluate.epochs": 2, "evaluate.seeds": [0], "evaluate.nets": ["convnet3"],
        "full_data.epochs": 1, "full_data.seeds": [0],
    },
}
"""The stage sections' settings per scale (the experts' come from their methods)."""


def scale_settings(scale: str) -> dict[str, Any]:
    """Every dotted setting of ``scale``: the stage rows and each registered method's row.

    Raises:
        ConfigError: an unknown scale (one line, with the choices).
    """
    from moedd.experts import EXPERTS

    if scale not in SCALES:
        raise ConfigError(f"invalid scale: {scale!r} is not one of {', '.join(SCALES)}")
    out = dict(STAGE_SCALES[scale])
    for name in EXPERTS.names():
        method = EXPERTS.get(name)
        row = dict(method.scales.get(scale, {}))
        if scale == "smoke" and "preset" in method.config_cls.model_fields:
            row.setdefault("preset", "none")
        out.update({f"experts.{name}.{key}": value for key, value in row.items()})
    return out


def _has(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def scaled_keys() -> list[str]:
    """Every dotted key some scale sets (params.yaml writes each as ``null``)."""
    return list(dict.fromkeys(k for name in SCALES for k in scale_settings(name)))


def apply_scale(tree: dict[str, Any]) -> frozenset[str]:
    """Fill ``tree`` (params.yaml with overrides applied) with the settings of its ``scale`` that
    it leaves out or writes as ``null``; return the dotted keys filled.

    params.yaml lists every scaled key as ``null`` ("the scale decides"), so that ``dvc exp run -S
    evaluate.epochs=300`` finds the key it overrides; a ``null`` the scale does not set is dropped
    (the class default applies), and a key with a value wins over the scale."""
    from moedd.config import set_dotted

    for dotted in scaled_keys():
        *parents, leaf = dotted.split(".")
        node: Any = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] is None:
            del node[leaf]
    filled = []
    for dotted, value in scale_settings(tree.get("scale") or "paper").items():
        if not _has(tree, dotted):
            set_dotted(tree, dotted, value)
            filled.append(dotted)
    return frozenset(filled)
