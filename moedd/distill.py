"""The distillation driver: builds the experts of one run, optimises them, checkpoints, resumes.

``run_distillation`` is what the ``distill`` stage calls. :func:`plan_run` validates everything
that can be validated (budget / NoE, IPC against the smallest class of every shard, data digests,
the method's own checks) before any optimisation and resolves the run once (:class:`RunPlan`:
IPC, effective config with the preset row applied); building, fingerprinting and the metadata
all read that plan. The driver writes a checkpoint every ``checkpoint_every`` iterations (atomically), and, when
started again with the same inputs, resumes from the checkpoint. Because all randomness of
iteration ``it`` derives from (seed, it), a resumed run ends with exactly the images of an
uninterrupted one.

Experts on ranks (``torchrun --nproc-per-node N -m moedd.cli distill ...``, ``moedd.distributed``):
rank r optimises the r-th contiguous block of NoE/N experts (``DistillContext.local``), drawing
exactly the random numbers those experts draw in one process; the diversity term spans the ranks.
Each rank checkpoints its block (:class:`RankCheckpoints`); rank 0 gathers the metric rows and the
images, and the caller lets it alone track and write.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pydantic import BaseModel

from moedd._atomic import save_torch
from moedd.distributed import Ranks, barrier, gather
from moedd.config import ConfigError, check_budget, check_dcor_rows
from moedd.data import Partition, Prepared, check_ipc_fits
from moedd.experts import EXPERTS, DistillContext, ExpertMethod, RunSpec
from moedd.experts.mixture import Mixture, MixtureConfig, mixture_name, parse_methods, shard_teachers
from moedd.params import Params, PresetChoice, method_config
from moedd.synthetic import SyntheticMeta

LogFn = Callable[[int, int, list[dict[str, float]]], None]
"""Called as (iterations done, total, new metric rows) every ``log_every`` iterations."""


@dataclass
class DistillResult:
    """Output of one run: images (NoE, C·IPC, ...), labels (C·IPC,), per-step metrics."""

    images: Tensor
    labels: Tensor
    metas: list[SyntheticMeta]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    zca: Any = None
    """The ZCA transform of a ZCA-space set (MTT), saved with it."""


class CheckpointMismatch(ConfigError):
    """A checkpoint exists but was written for other inputs."""


class SpreadError(ConfigError):
    """The run's experts cannot be shared over the ranks asked for."""


@dataclass(frozen=True)
class RunPlan:
    """One distill run, validated and resolved once (:func:`plan_run`)."""

    method: str
    noe: int
    ipc: int
    """Synthetic images per class per expert (budget / NoE)."""
    config: BaseModel
    """The effective ``experts.<method>`` section: class defaults < preset row < explicit keys
    (a mixture: :class:`MixtureConfig`, its members' sections)."""
    preset: PresetChoice | None
    members: tuple["RunPlan", ...] = ()
    """A heterogeneous mixture's one-expert plans, expert k = member k (``moedd.experts.mixture``)."""

    @property
    def iterations(self) -> int:
        return int(getattr(self.config, "iterations", 0))

    @property
    def preset_label(self) -> str:
        if self.members:
            return "+".join(m.preset_label for m in self.members)
        return self.preset.label if self.preset else "none"

    @property
    def methods(self) -> list[str]:
        """The method of each expert, in order."""
        return [m.method for m in self.members] if self.members else [self.method] * self.noe

    @property
    def sections(self) -> dict[str, BaseModel]:
        """Each method's effective ``experts.<method>`` section (one for a homogeneous run)."""
        return {m.method: m.config for m in self.members} if self.members else {self.method: self.config}


def plan_run(name: str, params: Params, prepared: Prepared, partition: Partition,
             device: torch.device | None = None, trajectories: Any = None) -> RunPlan:
    """Every check of a run that needs the data, cheap and before any work; the resolved run.

    ``name`` is a method, or a heterogeneous mixture (``idc+idm`` / ``idc,idm``: expert k runs the
    k-th method, ``moedd.experts.mixture``), which needs one method per expert.

    Raises:
        ConfigError: one line, for inputs that do not fit together (budget / NoE, IPC against the
            smallest class of a shard, digests of partition and teachers, the method's checks).
    """
    methods = parse_methods(name, EXPERTS.names())
    ipc = check_budget(params.distill.budget, partition.noe)
    if len(set(methods)) > 1 and len(methods) != partition.noe:
        raise ConfigError(f"--expert {name} names {len(methods)} methods for {partition.noe} experts: give one "
                          f"method (every expert runs it) or one per expert")
    if partition.data_digest and partition.data_digest != prepared.digest:
        raise ConfigError("the partition was made from other data (digest differs); rerun `moedd partition`")
    check_ipc_fits(partition, prepared.train_labels, prepared.num_classes, ipc)
    if any(EXPERTS.get(m).optimises for m in methods):
        check_dcor_rows(params.distill, ipc, partition.noe)
    if trajectories is not None:
        _check_teachers(trajectories, prepared, partition)
    dev = device or torch.device("cpu")
    if len(set(methods)) == 1:
        return _plan_one(methods[0], params, prepared, partition.noe, ipc, dev, trajectories)
    if any(EXPERTS.get(m).needs_trajectories for m in methods) and trajectories is None:
        raise ConfigError(f"--expert {name}: its MTT expert needs teacher trajectories (`moedd trajectories`, --trajectories)")
    members = tuple(
        _plan_one(m, params, prepared, 1, ipc, dev, shard_teachers(trajectories, k) if EXPERTS.get(m).needs_trajectories else None)
        for k, m in enumerate(methods))
    cfg = MixtureConfig(methods=methods, members=[m.config.model_dump() for m in members],
                        iterations=max(m.iterations for m in members))
    return RunPlan(mixture_name(methods), partition.noe, ipc, cfg, None, members)


def _plan_one(name: str, params: Params, prepared: Prepared, noe: int, ipc: int, device: torch.device,
              trajectories: Any) -> RunPlan:
    """One method's resolved config and its own checks, for ``noe`` experts."""
    cfg, preset = method_config(params, name, ipc, prepared.paper)  # a bad preset choice fails here
    spec = RunSpec(noe, ipc, prepared.num_classes, tuple(prepared.image_shape), params.distill.net, device, trajectories)
    EXPERTS.get(name).check_inputs(cfg, spec)
    return RunPlan(name, noe, ipc, cfg, preset)


def _check_teachers(trajectories: Any, prepared: Prepared, partition: Partition) -> None:
    meta = trajectories.meta
    if meta.get("partition_digest") and meta["partition_digest"] != partition.digest:
        raise ConfigError("the teacher trajectories were trained on another partition; rerun `moedd trajectories`")
    if meta.get("data_digest") and meta["data_digest"] != prepared.digest:
        raise ConfigError("the teacher trajectories were trained on other data; rerun `moedd trajectories`")


def member_seed(seed: int, k: int) -> int:
    """The seed of a mixture's member k: derived from (distill.seed, k), so two members of one
    run never replay each other's draws."""
    return (seed * 1_000_003 + 7_919 * (k + 1)) % (2**31 - 1)


def check_spread(plan: RunPlan, world: int) -> None:
    """Whether the run's experts can be shared over ``world`` ranks (one line if not)."""
    if world <= 1:
        return
    if plan.members or not EXPERTS.get(plan.method).spreads:
        raise SpreadError(f"--expert {plan.method} cannot run its experts on ranks yet (dm, idm, idc and random can): "
                          f"run it in one process")
    if plan.noe % world:
        raise SpreadError(f"{world} ranks do not divide NoE={plan.noe}: use a number of ranks that divides the experts")


def rank_block(noe: int, ranks: Ranks | None) -> tuple[int, ...] | None:
    """The experts of this rank: the rank-th of ``world`` contiguous blocks (None: all, one process)."""
    if ranks is None:
        return None
    per = noe // ranks.world
    return tuple(range(ranks.rank * per, (ranks.rank + 1) * per))


def build_method(name: str, params: Params, prepared: Prepared, partition: Partition, device: torch.device,
                 trajectories: Any = None, plan: RunPlan | None = None,
                 local: tuple[int, ...] | None = None) -> ExpertMethod:
    """Construct the experts of method ``name`` on ``partition`` (no optimisation yet); validates
    first unless given the run's ``plan``. ``local``: the experts this process optimises (a
    rank's block, :func:`rank_block`; None = all)."""
    plan = plan or plan_run(name, params, prepared, partition, device, trajectories)
    images = prepared.train_images.to(device)
    labels = prepared.train_labels.to(device)
    shard_images = [images[s.to(device)] for s in partition.shards]
    shard_labels = [labels[s.to(device)] for s in partition.shards]

    def context(shards: list[int], seed: int, teachers: Any) -> DistillContext:
        return DistillContext(
            shard_images=[shard_images[k] for k in shards], shard_labels=[shard_labels[k] for k in shards],
            num_classes=prepared.num_classes, ipc=plan.ipc, mean=prepared.mean, std=prepared.std,
            device=device, net=params.distill.net, dcor_weight=params.distill.dcor_weight,
            dcor_estimator=params.distill.dcor_estimator, seed=seed, trajectories=teachers,
            local=local if len(shards) == partition.noe else None,
        )

    ctx = context(list(range(partition.noe)), params.distill.seed, trajectories)
    if not plan.members:
        return EXPERTS.get(plan.method)(plan.config, ctx)
    members = []
    for k, m in enumerate(plan.members):
        teachers = shard_teachers(trajectories, k) if EXPERTS.get(m.method).needs_trajectories else None
        members.append(EXPERTS.get(m.method)(m.config, context([k], member_seed(params.distill.seed, k), teachers)))
    zca = next((x.zca for x in members if getattr(x, "zca", None) is not None), None)
    return Mixture(plan.config, ctx, members, zca)  # type: ignore[arg-type]


SPEED_ONLY = frozenset({"real_chunk", "match_pass", "class_chunk", "max_memory_gb"})
"""Method settings that change speed or memory, not the images (DM's real-batch chunking, IDC's
pass layout and class grouping, MTT's memory guard): left out of :func:`fingerprint`, so a run
resumed with another value keeps its checkpoint."""


def fingerprint(plan: RunPlan, params: Params, prepared: Prepared, partition: Partition, trajectories: Any = None) -> str:
    """Identifies the inputs of a run: a checkpoint is only resumed for the same fingerprint.

    In: the method and its effective config (preset applied), the distill settings (budget, seed,
    net, dcor weight), the prepared data and partition digests (so data, partition seed and NoE)
    and the teachers' meta (MTT). Out: what only changes speed or bookkeeping (the device,
    ``checkpoint_every``, ``log_every``, ``nproc``, :data:`SPEED_ONLY`). The code version is not in: a
    checkpoint survives code changes, as a resumed run is expected to.
    """
    cfg = plan.config.model_dump(exclude=set(SPEED_ONLY))
    if plan.members:
        cfg["members"] = [{k: v for k, v in m.items() if k not in SPEED_ONLY} for m in cfg["members"]]
    d = params.distill.model_dump(exclude={"device", "checkpoint_every", "log_every", "nproc"})
    teachers = trajectories.meta if trajectories is not None else None
    blob = json.dumps([plan.method, cfg, d, prepared.digest, partition.digest, teachers], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def start_images(method: ExpertMethod) -> Tensor:
    """The method's initial synthetic images as the leaf its steps update, after its set-up
    (``setup`` builds what depends on the images: optimisers, queues, graph captures)."""
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    return syn


class FileCheckpoint:
    """The checkpoint of a one-process run: one file, replaced atomically at every save."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, device: torch.device) -> dict[str, Any] | None:
        return torch.load(self.path, map_location=device, weights_only=True) if self.path.exists() else None

    def save(self, state: dict[str, Any], iteration: int) -> None:
        save_torch(state, self.path)  # atomic: a kill never leaves a half-written checkpoint

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class RankCheckpoints:
    """One rank's checkpoints of its experts: a file per saved iteration, the older one deleted
    only after every rank has written the newer (a barrier). A kill at any moment thus leaves an
    iteration that every rank holds, and each resumes from the newest such one."""

    def __init__(self, stem: Path, ranks: Ranks) -> None:
        self.stem = stem.with_name(f"{stem.name}-rank{ranks.rank}of{ranks.world}")

    def _path(self, iteration: int) -> Path:
        return self.stem.with_name(f"{self.stem.name}-it{iteration}.pt")

    def _saved(self) -> list[int]:
        prefix = f"{self.stem.name}-it"
        return sorted(int(p.name[len(prefix):-3]) for p in self.stem.parent.glob(f"{prefix}*.pt"))

    def load(self, device: torch.device) -> dict[str, Any] | None:
        common = set.intersection(*(set(s) for s in gather(self._saved())))
        if not common:
            return None
        return torch.load(self._path(max(common)), map_location=device, weights_only=True)

    def save(self, state: dict[str, Any], iteration: int) -> None:
        save_torch(state, self._path(iteration))
        barrier()  # every rank holds `iteration` now: the older files can go
        for old in self._saved():
            if old < iteration:
                self._path(old).unlink(missing_ok=True)

    def clear(self) -> None:
        for it in self._saved():
            self._path(it).unlink(missing_ok=True)


def optimise(
    method: ExpertMethod,
    checkpoint: FileCheckpoint | RankCheckpoints | None = None,
    fp: str = "",
    checkpoint_every: int = 100,
    log_every: int = 10,
    on_log: LogFn | None = None,
) -> tuple[Tensor, list[dict[str, float]], int]:
    """Run the method's iterations with periodic checkpoints.

    Returns:
        (final images (noe, C·IPC, ...), metric history, iteration resumed from).
    """
    syn = start_images(method)
    start, history = 0, []
    ck = checkpoint.load(syn.device) if checkpoint is not None else None
    if ck is not None:
        if ck["fingerprint"] != fp:
            raise CheckpointMismatch(f"the checkpoint {_stem(checkpoint)} belongs to other inputs; delete it to "
                                     f"start afresh")
        with torch.no_grad():
            syn.copy_(ck["syn"])
        method.load_state_dict(ck["method"])
        start, history = int(ck["iteration"]), list(ck["history"])
    total, pending = method.iterations, []

    def flush(done: int) -> None:
        rows = [{"step": float(i), **{k: float(v) for k, v in m.items()}} for i, m in pending]
        pending.clear()
        history.extend(rows)
        if on_log and rows:
            on_log(done, total, rows)

    if on_log and start:
        on_log(start, total, list(history))  # a fresh tracking run gets the curve so far
    for it in range(start, total):
        pending.append((it, method.step(syn, it)))  # tensors: no host sync inside the loop
        done = it + 1
        if done % log_every == 0 or done == total:
            flush(done)
        if checkpoint is not None and done % checkpoint_every == 0 and done < total:
            flush(done)
            checkpoint.save({
                "fingerprint": fp, "iteration": done, "syn": syn.detach(),
                "method": method.state_dict(), "history": history,
            }, done)
    return syn.detach(), history, start


def _stem(store: FileCheckpoint | RankCheckpoints) -> Path:
    return store.path if isinstance(store, FileCheckpoint) else store.stem


SUMMED = ("loss", "match", "ce")
"""Metric keys (and prefixes: ``match_c{class}``) that are sums over the experts: on ranks, the
sum of the ranks' values. ``match_e{k}`` is renumbered to the run's expert; any other key (dCor,
the shared networks' accuracy, the queue size) is the same on every rank and taken from rank 0."""


def merge_rows(per_rank: list[list[dict[str, float]]], blocks: list[tuple[int, ...]]) -> list[dict[str, float]]:
    """The ranks' metric rows of the same iterations, as the rows of the one-process run."""
    out = []
    for rows in zip(*per_rank, strict=True):
        row = {k: v for k, v in rows[0].items() if not k.startswith("match_e")}
        for key in row:
            if key.startswith(SUMMED):
                row[key] = sum(r[key] for r in rows)
        for r, block in zip(rows, blocks, strict=True):
            row.update({f"match_e{k}": r[f"match_e{j}"] for j, k in enumerate(block) if f"match_e{j}" in r})
        out.append(row)
    return out


def run_distillation(
    name: str,
    params: Params,
    prepared: Prepared,
    partition: Partition,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    on_log: LogFn | None = None,
    git_commit: str = "",
    trajectories: Any = None,
    plan: RunPlan | None = None,
    ranks: Ranks | None = None,
) -> DistillResult:
    """Distill ``prepared`` with NoE = ``partition.noe`` experts of method ``name``.

    Args:
        name: registered expert method.
        params: validated parameters (distill + experts.<name> are used).
        prepared: the prepared dataset.
        partition: NoE shards of the training set.
        device: where to compute.
        checkpoint_dir: where to keep the resumable checkpoint (None = no checkpoints).
        on_log: progress/metrics callback.
        git_commit: recorded in the metadata.
        trajectories: teacher trajectories of the shards (MTT), from ``moedd.trajectories``.
        plan: the run's :func:`plan_run` when the caller validated already (else done here).
        ranks: the ranks of a ``torchrun`` launch: this process optimises its block of experts,
            and every rank returns the whole result; ``on_log`` gets the merged rows on rank 0 only.
    """
    t0 = time.perf_counter()
    plan = plan or plan_run(name, params, prepared, partition, device, trajectories)
    check_spread(plan, ranks.world if ranks else 1)
    if ranks is not None and device.type == "cuda":
        # every rank trains its own copy of the shared networks (IDC's, IDM's queue): the same
        # kernels on every rank keep the copies equal (cuDNN's autotuning and its nondeterministic
        # backward could let them drift apart)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    method = build_method(name, params, prepared, partition, device, trajectories, plan,
                          rank_block(partition.noe, ranks))
    fp = fingerprint(plan, params, prepared, partition, trajectories)
    stem = f"{plan.method}-noe{partition.noe}-{fp}"
    ckpt: FileCheckpoint | RankCheckpoints | None = None
    if checkpoint_dir is not None:
        ckpt = RankCheckpoints(checkpoint_dir / stem, ranks) if ranks else FileCheckpoint(checkpoint_dir / f"{stem}.pt")
    log = _ranked_log(on_log, ranks, partition.noe) if ranks else on_log
    images, history, start = optimise(
        method, ckpt, fp, params.distill.checkpoint_every, params.distill.log_every, log
    )
    if ranks is not None:  # the run's images and curves, on every rank
        images = torch.cat(gather(images.cpu()))
        history = merge_rows(gather(history), _blocks(partition.noe, ranks))
    labels = method.ctx.labels().cpu()
    ipc = plan.ipc
    zca = getattr(method, "zca", None)
    experts = method.members if isinstance(method, Mixture) else [method] * partition.noe
    plans = plan.members or (plan,) * partition.noe
    metas = [
        SyntheticMeta(
            method=p.method, expert=k, noe=partition.noe, ipc=ipc, budget=params.distill.budget,
            classes=prepared.classes, image_shape=list(prepared.image_shape), space=e.space,  # type: ignore[arg-type]
            mean=list(prepared.mean), std=list(prepared.std), decoding=e.decoding,
            learned_lr=e.learned_lr(), data_digest=prepared.digest, partition_digest=partition.digest,
            shard_size=len(partition.shards[k]), seed=params.distill.seed, iterations=e.iterations,
            net=params.distill.net, git_commit=git_commit,
            zca_digest=zca.digest if zca is not None and e.space == "zca" else "",
            config={"distill": params.distill.model_dump(), p.method: p.config.model_dump(),
                    "preset": p.preset_label, "scale": params.scale},
            mixture=plan.method if plan.members else "",
        )
        for k, (e, p) in enumerate(zip(experts, plans, strict=True))
    ]
    if ckpt is not None:
        ckpt.clear()
    return DistillResult(images.cpu(), labels, metas, history, start, time.perf_counter() - t0, zca)


def _blocks(noe: int, ranks: Ranks) -> list[tuple[int, ...]]:
    return [rank_block(noe, Ranks(r, ranks.world, 0)) or () for r in range(ranks.world)]


def _ranked_log(on_log: LogFn | None, ranks: Ranks, noe: int) -> LogFn:
    """Every rank sends its rows; rank 0 passes on the run's rows (:func:`merge_rows`)."""
    blocks = _blocks(noe, ranks)

    def log(done: int, total: int, rows: list[dict[str, float]]) -> None:
        merged = merge_rows(gather(rows), blocks)
        if on_log is not None and ranks.main:
            on_log(done, total, merged)

    return log
