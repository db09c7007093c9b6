"""Typed configuration of the pipeline's stages: one frozen pydantic model per ``params.yaml`` section.

The stage sections (data, partition, grid, distill, trajectories, fusion, evaluate, mlflow) live
here; each expert method's section ``experts.<name>`` lives next to the method, in its own module
under ``moedd.experts`` (a subclass of :class:`Section`). ``moedd.params`` assembles all of them,
with the per-setting presets, into the validated ``Params`` of a run. Validation happens before
any data is loaded or any network is built, so bad input costs one clear line and no compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from moedd.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError"]  # re-exported: the error type every config check raises


class Section(BaseModel):
    """A params.yaml section: frozen, and unknown keys are errors (a typo never passes silently)."""

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


class DataConfig(Section):
    """Where the real images come from (the ``prepare`` stage)."""

    source: str = "cifar10"
    """Registered dataset source: ``cifar10``, ``cifar100`` (torchvision) or ``imagefolder``."""
    root: str = "data/raw"
    """Download directory for torchvision sources; the folder holding train/ and test/ for imagefolder."""
    download: bool = True
    """Let torchvision download CIFAR when it is not in ``root`` yet."""
    image_size: int | None = Field(None, ge=4)
    """Resize every image to this side at prepare time (None: as read; ``moedd.data.transform``)."""
    channels: Literal["keep", "rgb", "gray"] = "keep"
    """Convert images to gray (BT.601 luma) or to RGB at prepare time; ``keep`` leaves them as read."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from moedd.data.sources import SOURCES

        SOURCES.get(v)  # raises UnknownNameError with the choices
        return v


class DatasetEntry(Section):
    """One entry of ``datasets``: the keys of ``data`` it sets; the others come from ``data``."""

    source: str | None = None
    root: str | None = None
    download: bool | None = None
    image_size: int | None = None
    channels: Literal["keep", "rgb", "gray"] | None = None


class PartitionConfig(Section):
    """How the training set is split into NoE disjoint, class-balanced shards."""

    seed: int = 0


class MixtureEntry(Section):
    """One heterogeneous mixture of the grid (stages distill_mixture / evaluate_mixture): expert k
    runs the k-th method of ``experts`` (``moedd.experts.mixture``)."""

    experts: str
    """The methods in expert order joined by ``+``: ``idc+idm``."""
    noe: int = Field(ge=2)
    """The number of experts: one per method (the partition of that NoE, from ``grid.noe``)."""


class GridConfig(Section):
    """The experiments ``dvc repro`` runs: every dataset x budget x method x number of experts."""

    datasets: list[str] = ["cifar10"]
    """Entries of ``datasets`` to run, each with its own prepared store, partitions and sets."""
    budgets: list[int] = [10]
    """Stored images per class to run (each divisible by every NoE of ``noe`` and ``mtt_noe``)."""

    experts: list[str] = ["dm"]
    """Methods that optimise images (stages distill/evaluate; a loss curve each, for ``dvc plots``)."""
    baselines: list[str] = ["random"]
    """Methods that select real images (stages distill_baseline/evaluate_baseline): no optimisation,
    so no loss curve and no plot."""
    noe: list[int] = [1, 2]
    mtt_noe: list[int] = []
    """NoE values MTT runs with (MTT has its own stages, after the teacher trajectories; [] = no MTT)."""
    mixtures: list[MixtureEntry] = []
    """Heterogeneous mixtures to run at every dataset and budget (their own stages; [] = none)."""

    @field_validator("datasets")
    @classmethod
    def _named(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v) or any(not n or "/" in n for n in v):
            raise ValueError("grid.datasets must list distinct entries of `datasets` (names without '/')")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(b < 1 for b in v):
            raise ValueError("grid.budgets must list distinct budgets >= 1")
        return v

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

    @field_validator("experts", "baselines")
    @classmethod
    def _no_mtt(cls, v: list[str]) -> list[str]:
        if "mtt" in v:
            raise ValueError("MTT has its own stages (it needs teacher trajectories): list its NoE values in grid.mtt_noe")
        return v


class DistillConfig(Section):
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
    dcor_estimator: Literal["bias_corrected", "v_statistic"] = "bias_corrected"
    """Which dCor² the diversity term minimises (``moedd.moe.dcor``): the bias-corrected one (needs
    >= 4 images per class per expert) or Zhen et al.'s V-statistic, which saturates near 1 at
    MoE-DD's few images per class. [INFERRED]"""
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    nproc: int = Field(1, ge=1)
    """Processes ``moedd distill`` launches (through ``torchrun``, one machine), each optimising
    NoE/nproc experts on its own device; 1 = one process. The images are the one-process images
    (bit for bit, except IDC's grouped pass: rounding). A run that cannot be spread (another
    method, NoE not a multiple) runs in one process with a note; ``--nproc`` makes that an error."""

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



class NetTraining(Section):
    """SGD settings of a network an expert trains on real data while it distills (IDC's network
    of each outer iteration, IDM's queue networks); the defaults are both papers' values."""

    net_lr: float = Field(0.01, gt=0)
    net_momentum: float = Field(0.9, ge=0, lt=1)
    net_weight_decay: float = Field(0.0005, ge=0)

    def net_optimizer(self, net: torch.nn.Module) -> torch.optim.SGD:
        """SGD over every parameter of ``net`` with these settings."""
        import torch

        return torch.optim.SGD(net.parameters(), lr=self.net_lr, momentum=self.net_momentum,
                               weight_decay=self.net_weight_decay)


class TrajectoriesConfig(Section):
    """Teacher trajectories for MTT (docs/methods.md §MTT teachers, ``buffer.py``): N ConvNets per shard."""

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



class FusionConfig(Section):
    """How the experts' images are combined while a new network trains on them."""

    kind: Literal["mixup", "none"] = "mixup"
    p: float = Field(0.5, ge=0, le=1)
    """Probability that a training sample is mixed with a same-class image of another expert."""
    alpha: float = Field(1.0, gt=0)
    """λ ~ Beta(alpha, alpha); 1.0 = uniform. [INFERRED]"""


class EvaluateConfig(Section):
    """The one evaluation protocol used for every table (DSA protocol, docs/methods.md §Evaluation protocol)."""

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
    test_precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """The test pass's arithmetic: fp32, bf16 autocast, or auto (bf16 where the device computes it
    natively: AVX512-BF16/AMX CPUs, CUDA compute capability >= 8). Training is always fp32. A
    result-changing choice (in the checkpoint fingerprint); its accuracy cost is in docs/results.md."""
    seeds_together: int = Field(1, ge=1)
    """How many seeds of one network train together as one stacked model (``moedd.seeds``: the
    ConvNets; other networks train seed by seed): speed on a GPU, where a small ConvNet's seeds
    are launch-bound. 1 = seed by seed. A result-changing choice (the grouped convolution sums in
    another order: the parameters agree to rounding), so it is in the checkpoint fingerprint."""
    device: str = "auto"
    checkpoint_every: int = Field(100, ge=1)
    """Epochs between checkpoints of the (network, seed) unit in training, so that `moedd evaluate`
    resumes an interrupted unit there (finished units are kept anyway). Speed only: it changes no
    result, so it is not part of the checkpoint fingerprint."""

    @field_validator("nets")
    @classmethod
    def _known_nets(cls, v: list[str]) -> list[str]:
        return _networks(v, "evaluate.nets")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _seed_list(v, "evaluate.seeds")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


class FullDataConfig(Section):
    """The full-data reference (``moedd full-data``, ``moedd.reference``): each network of ``nets``
    trained on the whole real training set with the evaluation protocol of ``evaluate`` (optimiser,
    batch, DSA, learning rate x 0.1 at half of the epochs, no fusion), for its own number of epochs.
    The report sets every cell between it and the random real subset of the same IPC."""

    nets: list[str] = ["convnet3"]
    """One cached DVC stage per dataset and network (the list is the stage matrix, so it is written
    in params.yaml, not set by the scale); the normalised gain exists for these networks."""
    epochs: int = Field(100, ge=1)
    """[INFERRED: the distillation papers quote whole-dataset accuracies without their schedule]."""
    seeds: list[int] = [0]
    checkpoint_every: int = Field(1, ge=1)
    """Epochs between checkpoints of the unit in training (an epoch is 196 batches of 256)."""

    @field_validator("nets")
    @classmethod
    def _known_nets(cls, v: list[str]) -> list[str]:
        return _networks(v, "full_data.nets")  # the report stage depends on the reference's metrics

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        return _seed_list(v, "full_data.seeds")


class MlflowConfig(Section):
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



def _networks(v: list[str], field: str) -> list[str]:
    """A non-empty list of distinct registered networks (an unknown name: one line, with the choices)."""
    from moedd.nets import NETS

    if not v or len(set(v)) != len(v):
        raise ValueError(f"{field} must name at least one network, each once")
    for name in v:
        NETS.get(name)
    return v


def _seed_list(v: list[int], field: str) -> list[int]:
    if not v or len(set(v)) != len(v):
        raise ValueError(f"{field} must be a non-empty list of distinct seeds")
    return v


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


def check_dcor_rows(distill: DistillConfig, ipc: int, noe: int) -> None:
    """Refuse, in one line, a diversity term its estimator cannot compute: the bias-corrected dCor²
    needs >= 4 images per class per expert (``moedd.moe.dcor.MIN_ROWS_BIAS_CORRECTED``)."""
    if noe > 1 and distill.dcor_weight > 0 and distill.dcor_estimator == "bias_corrected" and ipc < 4:
        raise ConfigError(
            f"{ipc}x{noe}: the bias-corrected dCor needs >= 4 images per class per expert, not {ipc}; "
            "set distill.dcor_estimator=v_statistic or distill.dcor_weight=0")


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
