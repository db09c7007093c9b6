"""All of ``params.yaml``: the stage sections, every expert's section, and the per-setting presets.

``load_params`` is the single entry point: it reads params.yaml, applies overrides (from the
CLI), validates everything and returns a frozen :class:`Params`. The ``experts`` section has one
entry per registered expert method, validated by that method's own config class
(``ExpertMethod.config_cls``, defined next to the method in ``moedd.experts.<name>``): the
registry is the only list of methods. Checks that need the data (IPC larger than a shard's
smallest class) live next to the data (``moedd.data.partition.check_ipc_fits``) and also run
before any long computation.

Presets. The published methods tune a few knobs per dataset and images-per-class (IDM's CE
weight and queue schedule, IDC's real samples per network update, MTT's unroll length, start
epochs, learning rates and ZCA). ``params.yaml`` holds those rows as data under
``presets.<method>.<dataset>.<ipc>``, with comments that give the source of each row and mark
rows the papers do not give (``[INFERRED]``: the nearest published row). A method section chooses
its table with ``preset``: ``auto`` (the rows of the dataset the prepared store says it holds,
``moedd.data.identity``: CIFAR-10 or CIFAR-100 whether downloaded or read from an image folder;
other data gets the config class's defaults, which are the CIFAR-10 IPC 10 settings), a
dataset name (e.g. ``cifar10`` to use CIFAR-10's rows on other data), or ``none``. The row used is the one
for the run's IPC *per expert* (the nearest IPC when the table has no row for it; ties go to the
larger IPC). Precedence, lowest first: the class defaults, the run scale (``moedd.scale``), the
preset row, the keys written in the method's own section of params.yaml or given with ``-S``. So ``-S experts.idm.ce_weight=0.1``
always wins, and a section that lists only ``preset`` and ``iterations`` gets everything else
from the row. Every row is validated against the method's config class when params are loaded,
so a bad preset (unknown key, invalid value, a method that has no presets) fails before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, PrivateAttr, ValidationError, create_model, model_validator

from moedd.config import (
    ConfigError, DataConfig, DatasetEntry, DistillConfig, EvaluateConfig, FullDataConfig, FusionConfig, GridConfig,
    MlflowConfig,
    PartitionConfig, Section, TrajectoriesConfig, check_budget, check_dcor_rows, read_params_file, set_dotted,
)
from moedd.experts import EXPERTS
from moedd.scale import Scale, apply_scale


class _ExpertsBase(Section):
    def for_method(self, name: str) -> BaseModel:
        """The section ``experts.<name>`` (raises UnknownNameError, with the choices, for an unknown method)."""
        EXPERTS.get(name)
        return getattr(self, name)


ExpertsConfig: type[_ExpertsBase] = create_model(  # type: ignore[call-overload]
    "ExpertsConfig",
    __base__=_ExpertsBase,
    __doc__="One section per registered expert method, holding that method's hyper-parameters.",
    **{name: (EXPERTS.get(name).config_cls, EXPERTS.get(name).config_cls()) for name in EXPERTS.names()},
)
"""Built from the registry when this module is imported: every method of ``moedd.experts``."""


_GRID_PLACE = {
    True: "grid.{field} lists {name}, which selects real images (no loss curve): list it under grid.baselines",
    False: "grid.{field} lists {name}, which optimises images (it has a loss curve): list it under grid.experts",
}
"""Keyed by what the field expects (optimising methods): why a method is in the wrong list."""


class Params(Section):
    """All of params.yaml."""

    scale: Scale = "paper"
    """How big every method and stage runs (``moedd.scale``): paper | cpu | smoke."""
    data: DataConfig = DataConfig()
    datasets: dict[str, DatasetEntry] = {"cifar10": DatasetEntry(source="cifar10"), "cifar100": DatasetEntry(source="cifar100")}
    """Named datasets of the grid: each sets some keys of ``data`` (:func:`dataset_data`)."""
    partition: PartitionConfig = PartitionConfig()
    grid: GridConfig = GridConfig()
    distill: DistillConfig = DistillConfig()
    experts: ExpertsConfig = ExpertsConfig()  # type: ignore[valid-type]
    presets: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    """Per-setting rows: presets.<method>.<dataset>.<ipc> = {key: value} (module docstring)."""
    trajectories: TrajectoriesConfig = TrajectoriesConfig()
    fusion: FusionConfig = FusionConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    full_data: FullDataConfig = FullDataConfig()
    mlflow: MlflowConfig = MlflowConfig()
    _scale_keys: frozenset[str] = PrivateAttr(default=frozenset())
    """Dotted keys that the scale filled (not written in params.yaml or -S): a preset row wins over them."""

    @model_validator(mode="after")
    def _grid_consistent(self) -> "Params":
        for field, optimising in (("experts", True), ("baselines", False)):
            for name in getattr(self.grid, field):
                if EXPERTS.get(name).optimises != optimising:
                    raise ValueError(_GRID_PLACE[optimising].format(name=name, field=field))
        for noe in [*self.grid.noe, *self.grid.mtt_noe]:
            for budget in dict.fromkeys([self.distill.budget, *self.grid.budgets]):
                check_budget(budget, noe)
        for name in self.grid.datasets:
            if name not in self.datasets:
                raise ValueError(f"grid.datasets lists {name!r}, which `datasets` does not define "
                                 f"(have: {', '.join(self.datasets) or 'none'})")
        for name in self.datasets:
            dataset_data(self, name)  # every entry is a valid data section
        missing = [n for n in self.grid.mtt_noe if n not in self.grid.noe]
        if missing:  # the partition stage only makes partitions for grid.noe
            raise ValueError(f"grid.mtt_noe lists NoE {', '.join(map(str, missing))} but grid.noe does not; "
                             "MTT needs the partitions of grid.noe: add them there")
        if self.grid.experts or self.grid.mtt_noe:  # methods with a diversity term in the grid
            for noe in [*self.grid.noe, *self.grid.mtt_noe]:
                for budget in self.grid.budgets:
                    check_dcor_rows(self.distill, budget // noe, noe)
        for mix in self.grid.mixtures:
            _check_mixture(mix.experts, mix.noe, self)
        check_presets(self)
        return self


def _check_mixture(experts: str, noe: int, params: "Params") -> None:
    """A ``grid.mixtures`` entry that its stages can run: canonical ``a+b`` with different
    methods, one per expert, a partition of its NoE in the grid, no teachers needed."""
    from moedd.experts.mixture import mixture_name, parse_methods

    methods = parse_methods(experts, EXPERTS.names())
    if experts != mixture_name(methods) or len(set(methods)) < 2:
        raise ValueError(f"grid.mixtures: write {experts!r} as the methods joined by '+' (at least two different ones)")
    if len(methods) != noe:
        raise ValueError(f"grid.mixtures: {experts} names {len(methods)} methods but its noe is {noe} (one method per expert)")
    if noe not in params.grid.noe:
        raise ValueError(f"grid.mixtures: {experts} needs the partition of NoE {noe}: add {noe} to grid.noe")
    if any(EXPERTS.get(m).needs_trajectories for m in methods):
        raise ValueError(f"grid.mixtures: {experts} has an MTT expert, which needs teacher trajectories: run it with "
                         f"`moedd distill --expert {experts.replace('+', ',')} --noe {noe} --trajectories DIR`")
    for budget in params.grid.budgets:
        check_budget(budget, noe)
        check_dcor_rows(params.distill, budget // noe, noe)


def load_params(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, override and validate the params file.

    Args:
        path: params file to read; ``None`` means all defaults. A path that does not exist is an
            error, not the defaults, so a mistyped ``--params`` cannot silently run the defaults
            (the CLI decides what a missing default params.yaml means).
        overrides: dotted keys (``"experts.dm.iterations"``) to values, applied after reading;
            ``None`` values are ignored so CLI options that were not given keep params.yaml values.

    Returns:
        The frozen, validated parameters.

    Raises:
        ConfigError: one line naming the offending key, for any invalid or unknown value, or the
            file (and line and column) for a missing, unreadable or malformed params file.
    """
    tree = read_params_file(Path(path)) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    try:
        scaled = apply_scale(tree)
        params = Params.model_validate(tree)
        params._scale_keys = scaled
        return params
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        if first["type"] == "extra_forbidden":  # pydantic says "Extra inputs are not permitted"
            raise ConfigError(f"unknown key {where}: no such setting (a typo?)") from None
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid {where}: {msg}") from None
    except (ConfigError, KeyError) as err:
        raise ConfigError(str(err)) from None


def dataset_data(params: "Params", name: str) -> DataConfig:
    """The ``data`` section of dataset ``name``: ``data`` with the keys ``datasets.<name>`` sets.

    Raises:
        ConfigError: no such entry, or the merged section is invalid (one line).
    """
    entry = params.datasets.get(name)
    if entry is None:
        raise ConfigError(f"unknown dataset {name!r} (have: {', '.join(params.datasets) or 'none'}; see `datasets`)")
    try:
        return DataConfig.model_validate({**params.data.model_dump(), **entry.model_dump(exclude_none=True)})
    except ValidationError as err:
        raise ConfigError(f"datasets.{name}.{_one_line(err)}") from None


# ---------------------------------------------------------------- presets


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
    """Validate every row of ``params.presets`` against its method's config class."""
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


def preset_dataset(params: Params, method: str, paper: str | None = None) -> str | None:
    """The dataset whose rows ``experts.<method>.preset`` selects (None = no preset); ``auto``
    selects ``paper``, the prepared data's identity (``Prepared.paper``), when it has rows."""
    cfg = params.experts.for_method(method)
    choice = getattr(cfg, "preset", None)
    if choice in (None, "none"):
        return None
    table = params.presets.get(method, {})
    if choice == "auto":  # the prepared data's rows; other data gets the class defaults
        return paper if paper in table else None
    if choice not in table:
        have = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"experts.{method}.preset={choice}: no such preset (have: {have}, auto, none)")
    return choice


def method_config(params: Params, method: str, ipc: int, paper: str | None = None) -> tuple[BaseModel, PresetChoice | None]:
    """The effective config of ``method`` at ``ipc`` per expert on data ``paper`` (the prepared
    store's identity, ``Prepared.paper``; None = not a paper dataset), and the preset row used.

    Raises:
        ConfigError: the preset names a dataset without rows (one line, with the choices).
    """
    cfg = params.experts.for_method(method)
    dataset = preset_dataset(params, method, paper)
    if dataset is None:
        return cfg, None
    rows = params.presets[method][dataset]
    if not rows:
        raise ConfigError(f"presets.{method}.{dataset} has no rows")
    row_ipc = min(rows, key=lambda r: (abs(r - ipc), -r))
    scaled = {k for k in cfg.model_fields_set if f"experts.{method}.{k}" in params._scale_keys}
    explicit: dict[str, Any] = cfg.model_dump(include=cfg.model_fields_set - scaled)
    merged = {**cfg.model_dump(include=scaled), **rows[row_ipc], **explicit}
    try:
        resolved = type(cfg).model_validate(merged)
    except ValidationError as err:  # a row valid alone but invalid with the explicit keys
        raise ConfigError(f"experts.{method} with preset {dataset}/ipc{row_ipc}: {_one_line(err)}") from None
    return resolved, PresetChoice(dataset, row_ipc, ipc)
