"""Typed configuration: one frozen pydantic model per ``params.yaml`` section.

``load_params`` is the single entry point: it reads params.yaml, applies overrides (from the
CLI), validates everything and returns a frozen :class:`Params`. Validation happens here,
before any data is loaded or any network is built, so bad input costs one clear line and no
compute. Checks that need the data (IPC larger than a shard's smallest class) live next to the
data (``moedd.data.partition.check_ipc_fits``) and also run before any long computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _check_dsa(v: str, allow_none: bool = False) -> str:
    """Refuse a DSA strategy naming an unknown group here, at load time: the augmentation itself is
    only built once a run has started (an MLflow run open, a checkpoint directory made)."""
    if allow_none and v == "none":
        return v
    from moedd.augment.dsa import DSAParams

    DSAParams(strategy=v)  # raises ValueError naming the unknown group(s) and the known ones
    return v


DSAStrategy = Annotated[str, AfterValidator(_check_dsa)]
"""Underscore-separated DSA groups (``moedd.augment.dsa.GROUPS``), validated when params load."""
OptionalDSAStrategy = Annotated[str, AfterValidator(lambda v: _check_dsa(v, allow_none=True))]
"""A DSA strategy, or "none" for no augmentation (IDC's two strategies)."""


class DataConfig(_Section):
    """Where the real images come from (the ``prepare`` stage)."""

    source: str = "cifar10"
    """Registered dataset source: ``cifar10``, ``cifar100`` (torchvision) or ``imagefolder``."""
    root: str = "data/raw"
    """Download directory for torchvision sources; the folder holding train/ and test/ for imagefolder."""
    download: bool = True
    """Let torchvision download CIFAR when it is not in ``root`` yet."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from moedd.data.sources import SOURCES

        SOURCES.get(v)  # raises UnknownNameError with the choices
        return v


class PartitionConfig(_Section):
    """How the training set is split into NoE disjoint, class-balanced shards."""

    seed: int = 0


class GridConfig(_Section):
    """The experiments ``dvc repro`` runs: every expert method x every number of experts."""

    experts: list[str] = ["random", "dm"]
    noe: list[int] = [1, 2]
    mtt_noe: list[int] = []
    """NoE values MTT runs with (MTT has its own stages, after the teacher trajectories; [] = no MTT)."""

    @field_validator("noe")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("grid.noe must list numbers of experts >= 1")
        return v

    @field_validator("mtt_noe")
    @classmethod
    def _positive_or_empty(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("grid.mtt_noe must list numbers of experts >= 1 (or be empty)")
        return v

    @field_validator("experts")
    @classmethod
    def _no_mtt(cls, v: list[str]) -> list[str]:
        if "mtt" in v:
            raise ValueError("MTT has its own stages (it needs teacher trajectories): list its NoE values in grid.mtt_noe")
        return v


class DistillConfig(_Section):
    """Settings shared by every expert method (the ``distill`` stage)."""

    budget: int = Field(10, ge=1)
    """Images per class in the whole distilled set; each of NoE experts distills budget/NoE."""
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    net: str = "convnet3"
    """The network whose features/gradients the experts match (ConvNet-3 in every paper here)."""
    dcor_weight: float = Field(0.1, ge=0.0)
    """λ of the distance-correlation diversity term between experts; 0 turns it off. [INFERRED]"""
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)

    @field_validator("net")
    @classmethod
    def _known_net(cls, v: str) -> str:
        from moedd.nets import NETS

        NETS.get(v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class RandomExpertConfig(_Section):
    """Random real images of the expert's own shard (the baseline; no optimisation)."""

    iterations: Literal[0] = 0


class DMExpertConfig(_Section):
    """Distribution matching (Zhao & Bilen, WACV 2023); defaults from algorithms.md §5.1."""

    iterations: int = Field(20000, ge=0)
    lr_img: float = Field(1.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1)
    """Real images per class per iteration (drawn from the expert's own shard)."""
    init: Literal["real", "noise"] = "real"
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    bf16: bool = False
    """Run the network forward under bfloat16 autocast (faster on CPUs/GPUs that have it)."""
    real_chunk: int = Field(0, ge=0)
    """Images per no-grad forward of the real batch (speed/memory only); 0 = auto: 128 on CPU
    (keeps activations cache- and allocator-friendly), the whole batch on CUDA."""


class IDMExpertConfig(_Section):
    """IDM (Zhao et al., CVPR 2023); defaults = CIFAR-10 IPC 10 row of algorithms.md §5.2."""

    preset: str = "auto"
    """Row of ``presets.idm`` to apply: auto (data.source) | cifar10 | cifar100 | none (moedd.presets)."""
    iterations: int = Field(20000, ge=0)
    lr_img: float = Field(0.2, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1)
    """Real images per class per iteration (from the expert's own shard)."""
    ce_weight: float = Field(0.5, ge=0)
    """λ_ce of the class-aware CE term; multiplied by the net's running accuracy in PERCENT (as IDM)."""
    net_num: int = Field(100, ge=1)
    """Capacity of the queue of semi-trained networks."""
    net_generate_interval: int = Field(30, ge=1)
    """Iterations between pushing a new random network into the queue."""
    train_net_num: int = Field(1, ge=1)
    """Networks sampled from the queue for matching per iteration."""
    fetch_net_num: int = Field(2, ge=0)
    """Networks of the queue trained on real data after each iteration."""
    model_train_steps: int = Field(10, ge=0)
    trained_bs: int = Field(256, ge=1)
    net_lr: float = Field(0.01, gt=0)
    net_momentum: float = Field(0.9, ge=0, lt=1)
    net_weight_decay: float = Field(0.0005, ge=0)
    factor: Literal[1, 2] = 2
    """Partitioning & expansion factor (2 = each stored image decodes into 4 quadrants)."""
    dsa_strategy: DSAStrategy = DSA_STRATEGY


class IDCExpertConfig(_Section):
    """IDC (Kim et al., ICML 2022); defaults = CIFAR reproduce settings of algorithms.md §6."""

    preset: str = "auto"
    iterations: int = Field(2000, ge=0)
    """Outer iterations (a fresh network each)."""
    inner_loop: int = Field(100, ge=1)
    """Matching steps per outer iteration, each followed by network training on real data."""
    batch_real: int = Field(64, ge=1)
    batch_syn_max: int = Field(128, ge=1)
    lr_img: float | None = Field(None, gt=0)
    """None = 5e-3 x IPC/10 (IDC's tune_lr_img for 32 px)."""
    momentum: float = Field(0.5, ge=0, lt=1)
    n_data: int = Field(2000, ge=1)
    """Real samples the network trains on between matchings (CutMix + DSA)."""
    net_lr: float = Field(0.01, gt=0)
    net_momentum: float = Field(0.9, ge=0, lt=1)
    net_weight_decay: float = Field(0.0005, ge=0)
    mix_p: float = Field(0.5, ge=0, le=1)
    mix_beta: float = Field(1.0, gt=0)
    factor: Literal[1, 2] = 2
    """Multi-formation factor (2 = each stored image decodes into 4 quadrants)."""
    match_dsa_strategy: OptionalDSAStrategy = "color_crop_cutout"
    net_dsa_strategy: OptionalDSAStrategy = "color_crop"
    metric: Literal["mse", "l1", "cos"] = "mse"
    match_pass: Literal["auto", "grouped", "per_class"] = "auto"
    """How the class losses of a matching phase are computed (same result either way): "grouped"
    = many classes per pass through grouped copies of the network (fewer, larger kernels; on the
    2-core CPU 9 % faster since the grouped convolutions use moedd's double backward: median
    3.95 vs 4.35 s per phase); "per_class" = one class per pass (least memory); "auto" = grouped
    where the grouped copies cover the net, per-class otherwise."""
    class_chunk: int | None = Field(10, ge=1)
    """Classes whose gradients are matched in one grouped pass (None = all). The pass holds
    NoE x class_chunk x (batch_real + decoded images) activations, so the default keeps CIFAR-100's
    100 classes at CIFAR-10's memory (10 passes); raise it on a large GPU, lower it if short."""
    cuda_graph: bool = False
    """On a CUDA device, capture one inner step (matching phase and network update) as a CUDA
    graph and replay it ``inner_loop`` times per outer iteration (``moedd.experts.idc_graph``):
    one launch instead of thousands. CutMix's coin, λ and box are then drawn on the device (needs
    ``mix_beta`` 1, i.e. λ ~ U(0, 1)). No effect on a CPU. Off by default until measured on a GPU
    (benchmarks/README.md)."""


class MTTExpertConfig(_Section):
    """MTT (Cazenavette et al., CVPR 2022); defaults = CIFAR-10 IPC 10 row of the author-provided
    table (DC-Bench ``methods/tm/sota.md``, algorithms.md §7.3), which FTD's script confirms."""

    preset: str = "auto"
    iterations: int = Field(5000, ge=0)
    syn_steps: int = Field(30, ge=1)
    """N: unrolled student steps per iteration (memory grows linearly with it)."""
    expert_epochs: int = Field(2, ge=1)
    """M: the student's target is the teacher M epochs after the start epoch."""
    max_start_epoch: int = Field(20, ge=1)
    """T+: start epochs are drawn from 0 .. T+-1."""
    batch_syn: int | None = Field(None, ge=1)
    """Synthetic images per student step (None = all of the expert's images; memory knob)."""
    lr_img: float = Field(100.0, gt=0)
    lr_lr: float = Field(1e-5, gt=0)
    lr_teacher: float = Field(0.001, gt=0)
    """α0: initial value of the learnable student learning rate."""
    momentum: float = Field(0.5, ge=0, lt=1)
    """SGD momentum of the image and learning-rate optimisers."""
    zca: bool = True
    """Distill (and train teachers) in ZCA-whitened space (kornia math, eps 0.1, fitted on the
    full training set)."""
    zca_eps: float = Field(0.1, gt=0)
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    max_memory_gb: float | None = Field(None, gt=0)
    """Refuse a run whose estimated peak memory exceeds this (None = the device's memory)."""
    cuda_graph: bool = False
    """On a CUDA device, capture each iteration's unrolls and meta-gradients as one CUDA graph
    and replay it (``moedd.experts.mtt_graph``): one launch instead of thousands, for GPUs where
    the host's launches bound the iteration. The DSA group of each step is then drawn on the
    device (same distribution, another random stream). No effect on a CPU. Off by default until
    measured on a GPU (benchmarks/README.md)."""


class TrajectoriesConfig(_Section):
    """Teacher trajectories for MTT (algorithms.md §7.1, ``buffer.py``): N ConvNets per shard."""

    num_teachers: int = Field(100, ge=1)
    """Teachers per shard (MTT: 100)."""
    epochs: int | None = Field(None, ge=1)
    """Epochs per teacher; None = what MTT can use: max_start_epoch + expert_epochs."""
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    dsa: bool = True
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    seed: int = 0
    device: str = "auto"
    test_batch_size: int = Field(1000, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class ExpertsConfig(_Section):
    """One section per registered expert method, holding that method's hyper-parameters."""

    random: RandomExpertConfig = RandomExpertConfig()
    dm: DMExpertConfig = DMExpertConfig()
    idm: IDMExpertConfig = IDMExpertConfig()
    idc: IDCExpertConfig = IDCExpertConfig()
    mtt: MTTExpertConfig = MTTExpertConfig()

    def for_method(self, name: str) -> BaseModel:
        from moedd.experts import EXPERTS

        EXPERTS.get(name)
        return getattr(self, name)


class FusionConfig(_Section):
    """How the experts' images are combined while a new network trains on them."""

    kind: Literal["mixup", "none"] = "mixup"
    p: float = Field(0.5, ge=0, le=1)
    """Probability that a training sample is mixed with a same-class image of another expert."""
    alpha: float = Field(1.0, gt=0)
    """λ ~ Beta(alpha, alpha); 1.0 = uniform. [INFERRED]"""


class EvaluateConfig(_Section):
    """The one evaluation protocol used for every table (DSA protocol, algorithms.md §4)."""

    nets: list[str] = ["convnet3", "vgg11", "resnet18", "alexnet"]
    seeds: list[int] = [0, 1, 2, 3, 4]
    epochs: int = Field(1000, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0005, ge=0)
    batch_size: int = Field(256, ge=1)
    dsa: bool = True
    dsa_strategy: DSAStrategy = DSA_STRATEGY
    test_batch_size: int = Field(1000, ge=1)
    device: str = "auto"
    checkpoint_every: int = Field(100, ge=1)
    """Epochs between checkpoints of the (network, seed) unit in training, so that `moedd evaluate`
    resumes an interrupted unit there (finished units are kept anyway). Speed only: it changes no
    result, so it is not part of the checkpoint fingerprint."""

    @field_validator("nets")
    @classmethod
    def _known_nets(cls, v: list[str]) -> list[str]:
        from moedd.nets import NETS

        if not v:
            raise ValueError("evaluate.nets must name at least one network")
        for name in v:
            NETS.get(name)
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("evaluate.seeds must be a non-empty list of distinct seeds")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class MlflowConfig(_Section):
    """Where runs are logged. Empty ``tracking_uri`` = SQLite at <repo root>/mlflow.db."""

    tracking_uri: str = ""
    experiment: str = "moedd"

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, v: str) -> str:
        if v and not v.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks")):
            raise ValueError(
                "mlflow.tracking_uri must be a database or server URI (e.g. sqlite:////abs/mlflow.db); "
                "the file store is deprecated"
            )
        return v


class Params(_Section):
    """All of params.yaml."""

    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    grid: GridConfig = GridConfig()
    distill: DistillConfig = DistillConfig()
    experts: ExpertsConfig = ExpertsConfig()
    presets: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    """Per-setting rows: presets.<method>.<dataset>.<ipc> = {key: value} (see moedd.presets)."""
    trajectories: TrajectoriesConfig = TrajectoriesConfig()
    fusion: FusionConfig = FusionConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _grid_consistent(self) -> "Params":
        from moedd.experts import EXPERTS

        for name in self.grid.experts:
            EXPERTS.get(name)
        for noe in [*self.grid.noe, *self.grid.mtt_noe]:
            check_budget(self.distill.budget, noe)
        missing = [n for n in self.grid.mtt_noe if n not in self.grid.noe]
        if missing:  # the partition stage only makes partitions for grid.noe
            raise ValueError(f"grid.mtt_noe lists NoE {', '.join(map(str, missing))} but grid.noe does not; "
                             "MTT needs the partitions of grid.noe: add them there")
        from moedd.presets import check_presets

        check_presets(self)
        return self


def _check_device(v: str) -> str:
    if v == "auto" or v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not '{v}'")


def check_budget(budget: int, noe: int) -> int:
    """Return IPC per expert = budget / NoE, or raise ConfigError when it does not divide."""
    if noe < 1:
        raise ConfigError(f"the number of experts must be >= 1, not {noe}")
    if budget % noe:
        raise ConfigError(f"budget {budget} images/class is not divisible by NoE={noe}")
    return budget // noe


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = tree

    def existing(d: dict[Any, Any], key: str) -> Any:  # YAML int keys (preset IPC rows) match "10"
        return int(key) if key not in d and key.isdigit() and int(key) in d else key

    for key in parents:
        node = node.setdefault(existing(node, key), {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a section")
    node[existing(node, leaf)] = value


def read_params_file(path: Path) -> dict[str, Any]:
    """The sections of params file ``path`` (an empty file = no sections).

    Raises:
        ConfigError: one line for a missing or unreadable file, malformed YAML (with the 1-based
            line and column where the parser stopped, instead of yaml's multi-line report) or a
            file that is not a mapping of sections.
    """
    if not path.is_file():
        raise ConfigError(f"params file {path} {'is not a file' if path.exists() else 'not found'}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(err.problem or err.context or "malformed YAML").split())
        raise ConfigError(f"params file {path} is not valid YAML{where}: {what}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"cannot read params file {path}: {' '.join(str(err).split())}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"params file {path} must hold a mapping of sections, not a {type(tree).__name__}")
    return tree


def load_params(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, override and validate the params file.

    Args:
        path: params file to read; ``None`` means all defaults. A path that does not exist is an
            error, not the defaults, so a mistyped ``--params`` cannot silently run the defaults
            (the CLI decides what a missing default params.yaml means: ``moedd.cli.main._params``).
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
        return Params.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        if first["type"] == "extra_forbidden":  # pydantic says "Extra inputs are not permitted"
            raise ConfigError(f"unknown key {where}: no such setting (a typo?)") from None
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid {where}: {msg}") from None
    except (ConfigError, KeyError) as err:
        raise ConfigError(str(err)) from None


def flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a config model into ``{"section.key": value}`` for logging as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in model.model_dump().items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value
