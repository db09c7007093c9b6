"""Per-setting hyper-parameters ("presets") of the base methods, by dataset and IPC.

The published methods tune a few knobs per dataset and images-per-class (IDM's CE weight and
queue schedule, IDC's real samples per network update, MTT's unroll length, start epochs,
learning rates and ZCA). ``params.yaml`` holds those rows as data under
``presets.<method>.<dataset>.<ipc>``, with comments that give the source of each row and mark
rows the papers do not give (``[INFERRED]``: the nearest published row).

A method section chooses its table with ``preset``: ``auto`` (the dataset of ``data.source``;
a source without rows, e.g. ``imagefolder``, gets the config model's defaults, which are the
CIFAR-10 IPC 10 settings), a dataset name (e.g. ``cifar10`` for a CIFAR-10 image folder), or
``none``. The row used is the one for the run's IPC *per expert* (the
nearest IPC when the table has no row for it; ties go to the larger IPC). Precedence, lowest
first: the model defaults, the preset row, the keys written in the method's own section of
params.yaml or given with ``-S``. So ``-S experts.idm.ce_weight=0.1`` always wins, and a
section that lists only ``preset`` and ``iterations`` gets everything else from the row.

Every row is validated against the method's config model when params are loaded, so a bad
preset (unknown key, invalid value, a method that has no presets) fails before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from moedd.config import ConfigError

if TYPE_CHECKING:
    from moedd.config import Params


@dataclass(frozen=True)
class PresetChoice:
    """Which row a run used: dataset, the row's IPC, and whether it was the nearest one."""

    dataset: str
    row_ipc: int
    ipc: int

    @property
    def label(self) -> str:
        near = "" if self.row_ipc == self.ipc else f" (nearest row for IPC {self.ipc})"
        return f"{self.dataset}/ipc{self.row_ipc}{near}"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def check_presets(params: Params) -> None:
    """Validate every row of ``params.presets`` against its method's config model."""
    from moedd.experts import EXPERTS

    for method, table in params.presets.items():
        if method not in EXPERTS:
            raise ValueError(f"presets.{method}: no such expert method (have: {', '.join(EXPERTS.names())})")
        cfg = params.experts.for_method(method)
        if table and "preset" not in type(cfg).model_fields:
            raise ValueError(f"presets.{method}: the {method} method takes no presets")
        for dataset, rows in table.items():
            for ipc, row in rows.items():
                if ipc < 1:
                    raise ValueError(f"presets.{method}.{dataset}: IPC keys must be >= 1, not {ipc}")
                if "preset" in row:
                    raise ValueError(f"presets.{method}.{dataset}.{ipc}: a row cannot choose a preset")
                try:
                    type(cfg).model_validate(row)
                except ValidationError as err:
                    raise ValueError(f"presets.{method}.{dataset}.{ipc}.{_one_line(err)}") from None


def preset_dataset(params: Params, method: str) -> str | None:
    """The dataset whose rows ``experts.<method>.preset`` selects (None = no preset)."""
    cfg = params.experts.for_method(method)
    choice = getattr(cfg, "preset", None)
    if choice in (None, "none"):
        return None
    table = params.presets.get(method, {})
    if choice == "auto":  # the data source's rows; a source without rows gets the model defaults
        return params.data.source if params.data.source in table else None
    if choice not in table:
        have = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"experts.{method}.preset={choice}: no such preset (have: {have}, auto, none)")
    return choice


def method_config(params: Params, method: str, ipc: int) -> tuple[BaseModel, PresetChoice | None]:
    """The effective config of ``method`` at ``ipc`` per expert, and the preset row used.

    Raises:
        ConfigError: the preset names a dataset without rows (one line, with the choices).
    """
    cfg = params.experts.for_method(method)
    dataset = preset_dataset(params, method)
    if dataset is None:
        return cfg, None
    rows = params.presets[method][dataset]
    if not rows:
        raise ConfigError(f"presets.{method}.{dataset} has no rows")
    row_ipc = min(rows, key=lambda r: (abs(r - ipc), -r))
    explicit: dict[str, Any] = cfg.model_dump(include=cfg.model_fields_set)
    merged = {**rows[row_ipc], **explicit}
    try:
        resolved = type(cfg).model_validate(merged)
    except ValidationError as err:  # a row valid alone but invalid with the explicit keys
        raise ConfigError(f"experts.{method} with preset {dataset}/ipc{row_ipc}: {_one_line(err)}") from None
    return resolved, PresetChoice(dataset, row_ipc, ipc)
