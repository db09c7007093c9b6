"""The distillation driver: builds the experts of one run, optimises them, checkpoints, resumes.

``run_distillation`` is what the ``distill`` stage calls. :func:`plan_run` validates everything
that can be validated (budget / NoE, IPC against the smallest class of every shard, data digests,
the method's own checks) before any optimisation and resolves the run once (:class:`RunPlan`:
IPC, effective config with the preset row applied); building, fingerprinting and the metadata
all read that plan. The driver writes a checkpoint every ``checkpoint_every`` iterations (atomically), and, when
started again with the same inputs, resumes from the checkpoint. Because all randomness of
iteration ``it`` derives from (seed, it), a resumed run ends with exactly the images of an
uninterrupted one.
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
from moedd.config import ConfigError, check_budget, check_dcor_rows
from moedd.data import Partition, Prepared, check_ipc_fits
from moedd.experts import EXPERTS, DistillContext, ExpertMethod, RunSpec
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


@dataclass(frozen=True)
class RunPlan:
    """One distill run, validated and resolved once (:func:`plan_run`)."""

    method: str
    noe: int
    ipc: int
    """Synthetic images per class per expert (budget / NoE)."""
    config: BaseModel
    """The effective ``experts.<method>`` section: class defaults < preset row < explicit keys."""
    preset: PresetChoice | None

    @property
    def iterations(self) -> int:
        return int(getattr(self.config, "iterations", 0))

    @property
    def preset_label(self) -> str:
        return self.preset.label if self.preset else "none"


def plan_run(name: str, params: Params, prepared: Prepared, partition: Partition,
             device: torch.device | None = None, trajectories: Any = None) -> RunPlan:
    """Every check of a run that needs the data, cheap and before any work; the resolved run.

    Raises:
        ConfigError: one line, for inputs that do not fit together (budget / NoE, IPC against the
            smallest class of a shard, digests of partition and teachers, the method's checks).
    """
    cls = EXPERTS.get(name)
    ipc = check_budget(params.distill.budget, partition.noe)
    if partition.data_digest and partition.data_digest != prepared.digest:
        raise ConfigError("the partition was made from other data (digest differs); rerun `moedd partition`")
    check_ipc_fits(partition, prepared.train_labels, prepared.num_classes, ipc)
    if cls.optimises:
        check_dcor_rows(params.distill, ipc, partition.noe)
    cfg, preset = method_config(params, name, ipc, prepared.paper)  # a bad preset choice fails here
    if trajectories is not None:
        meta = trajectories.meta
        if meta.get("partition_digest") and meta["partition_digest"] != partition.digest:
            raise ConfigError("the teacher trajectories were trained on another partition; rerun `moedd trajectories`")
        if meta.get("data_digest") and meta["data_digest"] != prepared.digest:
            raise ConfigError("the teacher trajectories were trained on other data; rerun `moedd trajectories`")
    spec = RunSpec(partition.noe, ipc, prepared.num_classes, tuple(prepared.image_shape), params.distill.net,
                   device or torch.device("cpu"), trajectories)
    cls.check_inputs(cfg, spec)
    return RunPlan(name, partition.noe, ipc, cfg, preset)


def build_method(name: str, params: Params, prepared: Prepared, partition: Partition, device: torch.device,
                 trajectories: Any = None, plan: RunPlan | None = None) -> ExpertMethod:
    """Construct the experts of method ``name`` on ``partition`` (no optimisation yet); validates
    first unless given the run's ``plan``."""
    plan = plan or plan_run(name, params, prepared, partition, device, trajectories)
    images = prepared.train_images.to(device)
    labels = prepared.train_labels.to(device)
    ctx = DistillContext(
        shard_images=[images[s.to(device)] for s in partition.shards],
        shard_labels=[labels[s.to(device)] for s in partition.shards],
        num_classes=prepared.num_classes, ipc=plan.ipc, mean=prepared.mean, std=prepared.std,
        device=device, net=params.distill.net, dcor_weight=params.distill.dcor_weight,
        dcor_estimator=params.distill.dcor_estimator, seed=params.distill.seed,
        trajectories=trajectories,
    )
    return EXPERTS.get(name)(plan.config, ctx)


SPEED_ONLY = frozenset({"real_chunk", "match_pass", "class_chunk", "max_memory_gb"})
"""Method settings that change speed or memory, not the images (DM's real-batch chunking, IDC's
pass layout and class grouping, MTT's memory guard): left out of :func:`fingerprint`, so a run
resumed with another value keeps its checkpoint."""


def fingerprint(plan: RunPlan, params: Params, prepared: Prepared, partition: Partition, trajectories: Any = None) -> str:
    """Identifies the inputs of a run: a checkpoint is only resumed for the same fingerprint.

    In: the method and its effective config (preset applied), the distill settings (budget, seed,
    net, dcor weight), the prepared data and partition digests (so data, partition seed and NoE)
    and the teachers' meta (MTT). Out: what only changes speed or bookkeeping (the device,
    ``checkpoint_every``, ``log_every``, :data:`SPEED_ONLY`). The code version is not in: a
    checkpoint survives code changes, as a resumed run is expected to.
    """
    cfg = plan.config.model_dump(exclude=set(SPEED_ONLY))
    d = params.distill.model_dump(exclude={"device", "checkpoint_every", "log_every"})
    teachers = trajectories.meta if trajectories is not None else None
    blob = json.dumps([plan.method, cfg, d, prepared.digest, partition.digest, teachers], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def start_images(method: ExpertMethod) -> Tensor:
    """The method's initial synthetic images as the leaf its steps update, after its set-up
    (``setup`` builds what depends on the images: optimisers, queues, graph captures)."""
    syn = method.init_images().detach().clone().requires_grad_(True)
    method.setup(syn)
    return syn


def optimise(
    method: ExpertMethod,
    checkpoint: Path | None = None,
    fp: str = "",
    checkpoint_every: int = 100,
    log_every: int = 10,
    on_log: LogFn | None = None,
) -> tuple[Tensor, list[dict[str, float]], int]:
    """Run the method's iterations with periodic checkpoints.

    Returns:
        (final images (NoE, C·IPC, ...), metric history, iteration resumed from).
    """
    syn = start_images(method)
    start, history = 0, []
    if checkpoint is not None and checkpoint.exists():
        ck = torch.load(checkpoint, map_location=syn.device, weights_only=True)
        if ck["fingerprint"] != fp:
            raise CheckpointMismatch(f"checkpoint {checkpoint} belongs to other inputs; delete it to start afresh")
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
            save_torch({
                "fingerprint": fp, "iteration": done, "syn": syn.detach(),
                "method": method.state_dict(), "history": history,
            }, checkpoint)  # atomic: a kill never leaves a half-written checkpoint
    return syn.detach(), history, start


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
    """
    t0 = time.perf_counter()
    plan = plan or plan_run(name, params, prepared, partition, device, trajectories)
    method = build_method(name, params, prepared, partition, device, trajectories, plan)
    fp = fingerprint(plan, params, prepared, partition, trajectories)
    ckpt = checkpoint_dir / f"{name}-noe{partition.noe}-{fp}.pt" if checkpoint_dir else None
    images, history, start = optimise(
        method, ckpt, fp, params.distill.checkpoint_every, params.distill.log_every, on_log
    )
    labels = method.ctx.labels().cpu()
    ipc = plan.ipc
    zca = getattr(method, "zca", None)
    metas = [
        SyntheticMeta(
            method=name, expert=k, noe=partition.noe, ipc=ipc, budget=params.distill.budget,
            classes=prepared.classes, image_shape=list(prepared.image_shape), space=method.space,  # type: ignore[arg-type]
            mean=list(prepared.mean), std=list(prepared.std), decoding=method.decoding,
            learned_lr=method.learned_lr(), data_digest=prepared.digest, partition_digest=partition.digest,
            shard_size=len(partition.shards[k]), seed=params.distill.seed, iterations=method.iterations,
            net=params.distill.net, git_commit=git_commit, zca_digest=zca.digest if zca is not None else "",
            config={"distill": params.distill.model_dump(), name: plan.config.model_dump(),
                    "preset": plan.preset_label, "scale": params.scale},
        )
        for k in range(partition.noe)
    ]
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return DistillResult(images.cpu(), labels, metas, history, start, time.perf_counter() - t0, zca)
