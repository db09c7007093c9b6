"""Train-on-synthetic, test-on-real: the one evaluation protocol of every table.

Protocol (docs/design.md; DSA protocol of docs/methods.md §Evaluation protocol): a fresh network per (architecture,
seed), SGD(lr, momentum 0.9, weight decay 5e-4), batch 256, cross-entropy, learning rate × 0.1
at half of the epochs, per-sample DSA augmentation, accuracy after the last epoch on the full
real test set; mean ± std over the seed list. The experts' images are fused online with mixup
(``moedd.moe.fusion``) before augmentation. Method-specific decoding (multi-formation) and a
learned learning rate (MTT) come from the synthetic set's metadata.

Deviations from ``evaluate_synset`` of the reference code, stated so numbers can be compared:
we train exactly ``epochs`` epochs (the reference runs epochs+1) and decay the learning rate in
place instead of rebuilding the optimiser (which silently reset momentum there).

Resume: the unit of work is one (network, seed) training. With :class:`EvaluationCheckpoints`,
every finished unit is recorded (accuracy, seconds) and the unit in training is checkpointed every
``evaluate.checkpoint_every`` epochs with everything that determines its future (network and
optimiser state, its three random generators, the epoch; the learning rate lives in the
optimiser state), so an interrupted evaluation continues where it stopped and ends with exactly
the accuracies of an uninterrupted one (same device). The checkpoints of a cell live in a
directory named by a fingerprint of everything the result depends on, so a changed protocol or
set never resumes from stale state.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moedd._atomic import save_torch, write_text
from moedd.augment import DSA, DSAParams
from moedd.config import ConfigError, EvaluateConfig, FusionConfig
from moedd.device import memory_format_for
from moedd.moe import MixupFusion
from moedd.precision import test_dtype
from moedd.nets import create_net
from moedd.synthetic import DECODERS, SyntheticMeta, SyntheticSet

if TYPE_CHECKING:
    from moedd.distributed import Ranks

SMALL_FOR_ALEXNET = 16
"""Below this image side, AlexNet (no normalisation) is built but barely leaves chance under the
protocol: its last three convolutions see 2x2 and 1x1 maps and its initial logits are about 1e-3
(0.0011 at 8 px vs 0.019 for ConvNet-3; 0.0035 vs 0.14 at 32 px), so the signal that reaches the
early layers vanishes. Measured on 10 CIFAR-100 classes at 8x8 gray, 10 images/class, 300 epochs:
AlexNet trains to 17 % (test 15 %), AlexNetBN to 100 % (test 28 %), ConvNet-3 fits the set too."""


def check_nets_fit(nets: list[str], num_classes: int, shape: tuple[int, ...]) -> list[str]:
    """Build every network of ``nets`` for images of ``shape`` (C, H, W) on the meta device, before
    any training: one that cannot take them is a one-line ``ConfigError``; returns notes on those
    that can but train poorly at that size (:data:`SMALL_FOR_ALEXNET`)."""
    from moedd.nets import create_net

    for name in nets:
        try:
            with torch.device("meta"):
                create_net(name, num_classes=num_classes, channels=shape[0], image_size=shape[1])
        except ValueError as err:
            raise ConfigError(f"evaluate.nets: {name} cannot take {shape[1]}x{shape[2]} images ({err})") from None
    if "alexnet" in nets and shape[1] < SMALL_FOR_ALEXNET:
        return [f"alexnet at {shape[1]}x{shape[2]} has no normalisation and barely leaves chance below "
                f"{SMALL_FOR_ALEXNET} px (moedd.evaluate.SMALL_FOR_ALEXNET); alexnet_bn trains there"]
    return []


@dataclass(frozen=True)
class TrainingSet:
    """The pooled, decoded training images of all experts (on the device), in one input space."""

    images: Tensor
    labels: Tensor
    experts: Tensor
    lr: float
    soft: Tensor | None = None
    """(N, C) target distributions where the set has soft labels (soft cross-entropy); else None."""
    space: str = "normalized"
    """The common input space of every expert's images (:func:`common_space`)."""
    lr_source: str = "protocol"
    """Where ``lr`` comes from (:func:`training_lr`): "learned" or "protocol"."""


def common_space(syn: SyntheticSet) -> str:
    """The one input space every expert is brought into before mixup: ZCA when every expert was
    distilled in it (MTT, whose networks train on whitened images), else the mean/std-normalised
    space of the first expert (IDC's pixels normalised, a ZCA expert of a mixture inverted to
    pixels and normalised). Networks train and test in it."""
    return "zca" if all(s == "zca" for s in syn.spaces) else "normalized"


def training_lr(syn: SyntheticSet, base_lr: float) -> tuple[float, str]:
    """The learning rate a set trains with: the mean of the experts' learned rates when every
    expert learned one (MTT; one expert: its own), else the protocol's ``evaluate.lr`` (a mixture
    with other methods: a rate learned for one expert's images says nothing about the others')."""
    lrs = [m.learned_lr for m in syn.metas]
    if all(x is not None for x in lrs):
        return statistics.fmean(lrs), "learned"  # type: ignore[arg-type]
    return base_lr, "protocol"


def to_space(images: Tensor, meta: SyntheticMeta, target: str, target_meta: SyntheticMeta, zca: Any) -> Tensor:
    """Decoded images of one expert (in ``meta.space``) -> the common space ``target``; the
    identity where they are already there (same space, and for 'normalized' the same mean/std)."""
    same_norm = meta.mean == target_meta.mean and meta.std == target_meta.std
    if meta.space == target and (target != "normalized" or same_norm):
        return images
    if target == "zca":  # only when every expert is in ZCA space (common_space): one transform
        return images
    if meta.space == "zca":
        pixels = zca.invert(images)
    elif meta.space == "pixel":
        pixels = images
    else:
        pixels = images * _channels(meta.std) + _channels(meta.mean)
    return (pixels - _channels(target_meta.mean)) / _channels(target_meta.std)


def _channels(values: list[float]) -> Tensor:
    return torch.tensor(values).view(1, -1, 1, 1)


def pool_experts(syn: SyntheticSet, base_lr: float, device: torch.device) -> TrainingSet:
    """Decode every expert's images by its own metadata (decoding, space), bring them into the
    :func:`common_space` and pool them, remembering which expert each came from."""
    space, first = common_space(syn), syn.meta
    xs, ys, es, softs = [], [], [], []
    for k, (x, y, meta) in enumerate(zip(syn.images, syn.labels, syn.metas, strict=True)):
        dx, dy = DECODERS.get(meta.decoding)(x.float(), y)
        xs.append(to_space(dx, meta, space, first, syn.zca))
        ys.append(dy)
        es.append(torch.full_like(dy, k))
        soft = syn.soft[k] if syn.soft is not None else None
        softs.append(soft.repeat(len(dy) // len(y), 1) if soft is not None
                     else F.one_hot(dy, len(first.classes)).float())
    lr, source = training_lr(syn, base_lr)
    soft_all = torch.cat(softs).to(device) if syn.soft is not None else None
    return TrainingSet(torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(es).to(device), lr,
                       soft_all, space, source)


def prepare_test_images(syn: SyntheticSet, images_u8: Tensor, device: torch.device) -> Tensor:
    """uint8 test images -> the set's :func:`common_space`: ZCA-whitened with the set's own
    transform, or normalised with the first expert's mean/std."""
    if common_space(syn) == "zca":
        return syn.zca.apply_u8(images_u8.to(device))
    return normalize_test(images_u8, tuple(syn.meta.mean), tuple(syn.meta.std), device)


def normalize_test(images_u8: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """uint8 test images -> float32 in the synthetic set's normalised space, on the device."""
    c = len(mean)
    m = torch.tensor(mean, device=device).view(1, c, 1, 1)
    s = torch.tensor(std, device=device).view(1, c, 1, 1)
    return ((images_u8.to(device).float() / 255.0) - m) / s


@torch.inference_mode()
def test_accuracy(net: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int,
                  dtype: torch.dtype = torch.float32) -> float:
    """Top-1 accuracy (fraction) on the whole test set, in large inference-mode batches; with
    ``dtype`` bfloat16 the network runs under bf16 autocast (``evaluate.test_precision``)."""
    net.eval()
    dev = images.device
    fmt = memory_format_for(net, dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].contiguous(memory_format=fmt)
            correct += (net(x).argmax(1) == labels[i : i + batch_size]).sum()
    return correct.item() / len(images)


StateFn = Callable[[dict[str, Any]], None]
"""Receives a unit's training state (see :func:`train_network`) to keep it."""
StatsFn = Callable[[int, float, float], None]
"""Receives (epoch done, training accuracy, mean training loss) from :func:`train_network`."""


def train_network(
    net_name: str, data: TrainingSet, cfg: EvaluateConfig, fusion: FusionConfig, seed: int,
    num_classes: int, on_epoch: Callable[[int], None] | None = None,
    resume: dict[str, Any] | None = None, checkpoint: StateFn | None = None,
    on_stats: StatsFn | None = None,
) -> torch.nn.Module:
    """Train a fresh ``net_name`` on the (fused) synthetic set with the fixed protocol.

    Args:
        on_epoch: called with the number of epochs done after each epoch (after ``checkpoint``).
        resume: a state handed to ``checkpoint`` by an earlier call with the same arguments:
            training continues at its epoch and ends exactly as without the interruption.
        checkpoint: called with the full training state every ``cfg.checkpoint_every`` epochs
            (not after the last): network and optimiser state (momentum, the learning rate of the
            schedule), the batch-order/augmentation/mixup-partner generator ``gen``, DSA's host
            generator, the numpy generator of mixup's weights, and the epoch.
        on_stats: called (epoch done, training accuracy, mean training loss) after each epoch:
            the accuracy of the batches as trained (fused and augmented) against their labels.
            Only computed when given (one device sync per epoch); the training is unchanged.
    """
    device = data.images.device
    ch, h = data.images.shape[1], data.images.shape[2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_net(net_name, num_classes, channels=ch, image_size=h)
    fmt = memory_format_for(net, device)
    net = net.to(device, data.images.dtype, memory_format=fmt)  # the images' dtype: float32 (float64 in tests)
    opt = torch.optim.SGD(net.parameters(), lr=data.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    host = torch.Generator().manual_seed(seed + 15_485_863)  # DSA's group per batch, drawn without a device sync
    rng = np.random.default_rng(seed)
    dsa = DSA(DSAParams(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    mixer = MixupFusion(data.images, data.labels, data.experts, fusion.p, fusion.alpha) if fusion.kind == "mixup" else None
    n = len(data.labels)
    start = 0
    if resume is not None:
        if resume["device_type"] != device.type:
            raise UnitCheckpointMismatch(
                f"the checkpoint of {net_name} seed {seed} was written on {resume['device_type']}, not {device.type} "
                "(its generator states do not carry over); resume on that device or delete the checkpoint")
        net.load_state_dict(resume["net"])
        opt.load_state_dict(resume["opt"])
        gen.set_state(resume["gen"])
        host.set_state(resume["host"])
        rng.bit_generator.state = json.loads(resume["numpy"])
        start = int(resume["epoch"])
    net.train()
    for epoch in range(start, cfg.epochs):
        if epoch == cfg.epochs // 2:
            for group in opt.param_groups:
                group["lr"] = data.lr * 0.1
        order = torch.randperm(n, generator=gen, device=device)
        correct = loss_sum = torch.zeros((), device=device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = data.images[idx]
            target = data.labels[idx] if data.soft is None else data.soft[idx]
            if mixer is not None:
                x, lam, partner = mixer.mix(x, idx, gen, rng)
                if data.soft is not None:  # the partner's distribution mixed in with the images
                    w = lam.view(-1, 1)
                    target = w * target + (1 - w) * data.soft[partner]
            if dsa is not None:
                x = dsa.per_sample(x, gen, host)
            logits = net(x.contiguous(memory_format=fmt))
            loss = F.cross_entropy(logits, target)  # soft targets: soft cross-entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_stats is not None:
                correct = correct + (logits.detach().argmax(1) == data.labels[idx]).sum()
                loss_sum = loss_sum + loss.detach() * len(idx)
        done = epoch + 1
        if on_stats is not None:
            on_stats(done, float(correct) / n, float(loss_sum) / n)
        if checkpoint is not None and done % cfg.checkpoint_every == 0 and done < cfg.epochs:
            checkpoint({
                "epoch": done, "device_type": device.type, "net": net.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "host": host.get_state(), "numpy": json.dumps(rng.bit_generator.state),
            })
        if on_epoch:
            on_epoch(done)
    return net


@dataclass
class NetResult:
    """Accuracies of one architecture over the seed list."""

    net: str
    accs: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs) if self.accs else math.nan

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accs) if len(self.accs) > 1 else 0.0


ResultFn = Callable[[str, int, float], None]
CurveFn = Callable[[str, int, int, float, float], None]
"""Called as (net, seed, epoch, training accuracy, training loss) after each epoch trained."""
EpochFn = Callable[[str, int, int], None]
ResumeFn = Callable[[str, int, int, int], None]
"""Called as (net, seed, epoch, units done) when a call continues earlier work (see evaluate_synthetic)."""

SPEED_ONLY = frozenset({"device", "test_batch_size", "checkpoint_every"})
"""Evaluate knobs that change how fast, never what: left out of the checkpoint fingerprint."""


class UnitCheckpointMismatch(ConfigError):
    """An evaluation checkpoint exists but was written for other inputs (or another device)."""


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 over the dtypes, shapes and bytes of ``tensors`` (content identity, any device)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_contents(syn: SyntheticSet, test_images: Tensor, test_labels: Tensor, cfg: EvaluateConfig,
                         fusion: FusionConfig) -> dict[str, Any]:
    """Everything an evaluation's accuracies depend on: the synthetic set (every expert's metadata,
    with its file digest, data digest, decoding, space, learned lr and ZCA digest, and a digest of
    the images and labels themselves, so that an in-memory set is identified too), the protocol
    without :data:`SPEED_ONLY` knobs (nets, seeds, epochs, optimiser, batch size, DSA), the fusion
    config and the fusion actually applied, and a digest of the real test images and labels."""
    return {
        "synthetic": [m.model_dump(mode="json") for m in syn.metas],
        "synthetic_tensors": tensor_digest(*syn.images, *syn.labels, *[x for x in syn.soft or [] if x is not None]),
        "evaluate": cfg.model_dump(mode="json", exclude=set(SPEED_ONLY)),
        "fusion": fusion.model_dump(mode="json"),
        "fusion_effective": fusion_effective(syn, fusion),
        "test_data": tensor_digest(test_images, test_labels),
    }


@dataclass(frozen=True)
class UnitRecord:
    """A finished unit: the test accuracy (fraction) of ``net`` trained with ``seed``."""

    net: str
    seed: int
    acc: float
    seconds: float


class EvaluationCheckpoints:
    """The resumable state of one cell's evaluation, in ``root/<name>-<fingerprint>/``.

    Holds ``fingerprint.json`` (what the fingerprint hashes, readable), ``<net>-seed<s>.json`` per
    finished unit and ``<net>-seed<s>.pt`` for a unit in training. Files are per unit and written
    atomically, so units may later be spread over processes. Every file carries the fingerprint
    and is refused when it does not match (:class:`UnitCheckpointMismatch`).

    Args:
        root: the directory of all evaluation checkpoints (``<project root>/.moedd/checkpoints/evaluate``).
        name: a readable prefix of the cell's directory (e.g. ``dm-10x2``).
        contents: what the result depends on (:func:`fingerprint_contents`).
    """

    def __init__(self, root: Path, name: str, contents: dict[str, Any]) -> None:
        self.contents = contents
        self.fingerprint = hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()[:16]
        self.root, self.name = Path(root), name
        self.dir = self.root / f"{name}-{self.fingerprint}"

    @classmethod
    def for_cell(cls, root: Path, name: str, syn: SyntheticSet, test_images: Tensor, test_labels: Tensor,
                 cfg: EvaluateConfig, fusion: FusionConfig) -> EvaluationCheckpoints:
        """The checkpoints of evaluating ``syn`` with this protocol on this test data."""
        return cls(root, name, fingerprint_contents(syn, test_images, test_labels, cfg, fusion))

    def others(self) -> list[Path]:
        """Directories of the same name prefix but another fingerprint (another protocol, set or
        test data, or another cell's run in parallel): never resumed from, never touched."""
        if not self.root.is_dir():
            return []
        prefix = f"{self.name}-"
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir and p.name.startswith(prefix)
                      and len(tail := p.name[len(prefix):]) == 16 and all(c in "0123456789abcdef" for c in tail))

    def _check(self, found: str, path: Path) -> None:
        if found != self.fingerprint:
            raise UnitCheckpointMismatch(f"checkpoint {path} belongs to other inputs; delete it to start afresh")

    def _prepare(self) -> None:
        fp = self.dir / "fingerprint.json"
        if fp.exists():
            self._check(json.loads(fp.read_text()).get("fingerprint", ""), fp)
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"fingerprint": self.fingerprint, "contents": self.contents}, indent=2, sort_keys=True)
        write_text(fp, blob)

    def _unit(self, net: str, seed: int, suffix: str) -> Path:
        return self.dir / f"{net}-seed{seed}{suffix}"

    def finished(self, net: str, seed: int) -> UnitRecord | None:
        """The record of a finished unit, or None."""
        path = self._unit(net, seed, ".json")
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        self._check(d.pop("fingerprint", ""), path)
        return UnitRecord(**d)

    def finish(self, record: UnitRecord) -> None:
        """Record a finished unit (then its training checkpoint is dropped)."""
        self._prepare()
        blob = json.dumps({"fingerprint": self.fingerprint, **asdict(record)})
        write_text(self._unit(record.net, record.seed, ".json"), blob)
        self._unit(record.net, record.seed, ".pt").unlink(missing_ok=True)

    def load_state(self, net: str, seed: int) -> dict[str, Any] | None:
        """The training state of an unfinished unit (on the CPU), or None."""
        path = self._unit(net, seed, ".pt")
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._check(state.get("fingerprint", ""), path)
        return state

    def save_state(self, net: str, seed: int, state: dict[str, Any]) -> None:
        """Keep the training state of a unit (atomically)."""
        self._prepare()
        save_torch({"fingerprint": self.fingerprint, **state}, self._unit(net, seed, ".pt"))

    def clear(self) -> None:
        """Remove this cell's checkpoints (once its metrics are written)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def evaluate_synthetic(
    syn: SyntheticSet, test_images: Tensor, test_labels: Tensor, cfg: EvaluateConfig, fusion: FusionConfig,
    device: torch.device, on_result: ResultFn | None = None, on_epoch: EpochFn | None = None,
    checkpoints: EvaluationCheckpoints | None = None, on_resume: ResumeFn | None = None,
    on_curve: CurveFn | None = None, ranks: Ranks | None = None,
) -> dict[str, NetResult]:
    """Evaluate a synthetic set on every network of ``cfg.nets`` over ``cfg.seeds``.

    Args:
        syn: the synthetic set (all experts).
        test_images: uint8 real test images (N, ch, H, W); labels int64.
        cfg: the evaluation protocol.
        fusion: how experts are fused while training.
        device: where to train.
        on_result: called (net, seed, accuracy) for each unit in order, also for the units
            restored as finished from ``checkpoints`` (each unit once per call).
        on_epoch: called (net, seed, epoch) after each epoch trained in this call (progress).
        checkpoints: where finished units are recorded and the unit in training is checkpointed
            (every ``cfg.checkpoint_every`` epochs); what they hold is resumed. The caller
            clears them once the results are kept. None: no checkpoints.
        on_resume: called (net, seed, epoch, units done) before unit (net, seed) trains when this
            call continues earlier work: it resumes at ``epoch`` from its checkpoint (0: from
            scratch), after ``units done`` units restored as finished so far. Called for every
            unit resumed from a checkpoint, and for the first unit trained after restored ones.
        on_curve: called (net, seed, epoch, training accuracy, loss) after each epoch trained in
            this call (the curve of a resumed unit starts where it resumed).
        ranks: the ranks of a ``torchrun`` launch (``moedd.distributed``): each trains its share
            of the (network, seed) units; every rank returns all results, and ``on_result`` /
            ``on_curve`` run on rank 0 only, for every unit (curves gathered from the others).

    Returns:
        Per network name, the accuracies (fractions) in seed order; ``seconds`` sums the units'
        training and test times (across interruptions).
    """
    data = pool_experts(syn, cfg.lr, device)
    test_x = prepare_test_images(syn, test_images, device)
    return evaluate_training_set(data, test_x, test_labels.to(device), len(syn.meta.classes), cfg, fusion,
                                 on_result, on_epoch, checkpoints, on_resume, on_curve, ranks)


def evaluate_training_set(
    data: TrainingSet, test_x: Tensor, test_y: Tensor, num_classes: int, cfg: EvaluateConfig, fusion: FusionConfig,
    on_result: ResultFn | None = None, on_epoch: EpochFn | None = None,
    checkpoints: EvaluationCheckpoints | None = None, on_resume: ResumeFn | None = None,
    on_curve: CurveFn | None = None, ranks: Ranks | None = None,
) -> dict[str, NetResult]:
    """:func:`evaluate_synthetic` on a training set already on the device (a pooled synthetic set,
    or the full real training set of the reference, ``moedd.reference``) and test images already
    in its space; same arguments and result."""
    if ranks is not None and ranks.world > 1:
        return _evaluate_on_ranks(data, test_x, test_y, num_classes, cfg, fusion, on_result, on_epoch,
                                  checkpoints, on_curve, ranks)
    results: dict[str, NetResult] = {}
    restored, announced = 0, False
    for name in cfg.nets:
        res = results[name] = NetResult(name)
        done = {s: r for s in cfg.seeds if checkpoints and (r := checkpoints.finished(name, s)) is not None}
        trained = _train_groups(name, [s for s in cfg.seeds if s not in done], data, test_x, test_y, num_classes,
                                cfg, fusion, on_epoch, checkpoints, on_curve)
        for seed in cfg.seeds:
            record = done.get(seed) or trained.get(seed)
            if record is None:
                record = _train_unit(name, seed, data, test_x, test_y, num_classes, cfg, fusion, on_epoch,
                                     checkpoints, on_resume, restored, announced, on_curve)
                announced = True
            elif seed in done:
                restored += 1
            res.accs.append(record.acc)
            res.seconds += record.seconds
            if on_result:
                on_result(name, seed, record.acc)
    return results


def _evaluate_on_ranks(
    data: TrainingSet, test_x: Tensor, test_y: Tensor, num_classes: int, cfg: EvaluateConfig, fusion: FusionConfig,
    on_result: ResultFn | None, on_epoch: EpochFn | None, checkpoints: EvaluationCheckpoints | None,
    on_curve: CurveFn | None, ranks: Ranks,
) -> dict[str, NetResult]:
    """The (network, seed) units shared over the ranks (every world-th unit, in table order), each
    trained and checkpointed as in one process; records and curves gathered on every rank. A unit
    is deterministic given its seed, so the accuracies are those of the one-process run with the
    same kernels (threads per process included)."""
    from moedd.distributed import gather

    units = [(net, seed) for net in cfg.nets for seed in cfg.seeds]
    mine: list[UnitRecord] = []
    curves: list[tuple[str, int, int, float, float]] = []
    keep = lambda n, s, e, a, loss: curves.append((n, s, e, a, loss))  # noqa: E731  (every rank: rank 0 logs them)
    for net, seed in ranks.share(units):
        record = checkpoints.finished(net, seed) if checkpoints else None
        if record is None:
            record = _train_unit(net, seed, data, test_x, test_y, num_classes, cfg, fusion, on_epoch,
                                 checkpoints, None, 0, True, keep)
        mine.append(record)
    gathered = gather((mine, curves))
    by_unit = {(r.net, r.seed): r for recs, _ in gathered for r in recs}
    if on_curve and ranks.main:  # before the results: a unit's curve goes with its result
        for _recs, rank_curves in gathered:
            for point in rank_curves:
                on_curve(*point)
    results = {net: NetResult(net) for net in cfg.nets}
    for net, seed in units:
        record = by_unit[(net, seed)]
        results[net].accs.append(record.acc)
        results[net].seconds += record.seconds
        if on_result and ranks.main:
            on_result(net, seed, record.acc)
    return results


def _train_groups(
    name: str, seeds: list[int], data: TrainingSet, test_x: Tensor, test_y: Tensor, num_classes: int,
    cfg: EvaluateConfig, fusion: FusionConfig, on_epoch: EpochFn | None,
    checkpoints: EvaluationCheckpoints | None, on_curve: CurveFn | None,
) -> dict[int, UnitRecord]:
    """The units of ``seeds`` trained ``cfg.seeds_together`` at a time (``moedd.seeds``), where the
    network can be stacked; {} when seed by seed (the default, 1). A group resumes when all its
    units have checkpoints of one epoch (else those units train alone, resuming their own)."""
    from moedd.seeds import can_stack, train_seeds_together

    ch, h = data.images.shape[1], data.images.shape[2]
    if cfg.seeds_together < 2 or len(seeds) < 2 or not can_stack(name, num_classes, ch, h):
        return {}
    out: dict[int, UnitRecord] = {}
    for i in range(0, len(seeds), cfg.seeds_together):
        group = seeds[i:i + cfg.seeds_together]
        states = [checkpoints.load_state(name, s) if checkpoints else None for s in group]
        if any(st is not None for st in states) and (None in states or len({int(st["epoch"]) for st in states}) > 1):
            continue  # mixed progress: each unit trains (and resumes) alone
        if len(group) < 2:
            continue
        t0 = time.perf_counter()
        before = sum(float(st["seconds"]) for st in states) if states[0] is not None else 0.0

        def save(seed: int, st: dict[str, Any], _t0: float = t0, _n: int = len(group)) -> None:
            if checkpoints is not None:
                checkpoints.save_state(name, seed, {**st, "seconds": (before + time.perf_counter() - _t0) / _n})

        cb = (lambda s, e: on_epoch(name, s, e)) if on_epoch else None
        stats = (lambda s, e, a, loss: on_curve(name, s, e, a, loss)) if on_curve else None
        nets = train_seeds_together(name, data, cfg, fusion, group, num_classes, cb,
                                    resume=states if states[0] is not None else None, checkpoint=save, on_stats=stats)
        share = (before + time.perf_counter() - t0) / len(group)
        for seed, net in zip(group, nets, strict=True):
            acc = test_accuracy(net, test_x, test_y, cfg.test_batch_size, test_dtype(cfg.test_precision, test_x.device))
            out[seed] = UnitRecord(name, seed, acc, share)
            if checkpoints is not None:
                checkpoints.finish(out[seed])
    return out


def _train_unit(
    name: str, seed: int, data: TrainingSet, test_x: Tensor, test_y: Tensor, num_classes: int,
    cfg: EvaluateConfig, fusion: FusionConfig, on_epoch: EpochFn | None,
    checkpoints: EvaluationCheckpoints | None, on_resume: ResumeFn | None, restored: int, announced: bool,
    on_curve: CurveFn | None = None,
) -> UnitRecord:
    """Train and test one (network, seed) unit, resuming and checkpointing it when asked."""
    t0 = time.perf_counter()
    state = checkpoints.load_state(name, seed) if checkpoints else None
    before = float(state["seconds"]) if state else 0.0
    if on_resume and (state is not None or (restored and not announced)):
        on_resume(name, seed, int(state["epoch"]) if state else 0, restored)
    save: StateFn | None = None
    if checkpoints is not None:
        def save(st: dict[str, Any], _c: EvaluationCheckpoints = checkpoints) -> None:
            _c.save_state(name, seed, {**st, "seconds": before + time.perf_counter() - t0})
    cb = (lambda e: on_epoch(name, seed, e)) if on_epoch else None
    stats = (lambda e, a, loss: on_curve(name, seed, e, a, loss)) if on_curve else None
    net = train_network(name, data, cfg, fusion, seed, num_classes, cb, resume=state, checkpoint=save, on_stats=stats)
    acc = test_accuracy(net, test_x, test_y, cfg.test_batch_size, test_dtype(cfg.test_precision, test_x.device))
    record = UnitRecord(name, seed, acc, before + time.perf_counter() - t0)
    if checkpoints is not None:
        checkpoints.finish(record)
    return record


def fusion_effective(syn: SyntheticSet, fusion: FusionConfig) -> str:
    """The fusion actually applied: mixup needs at least two experts."""
    return fusion.kind if (fusion.kind == "none" or syn.noe > 1) else "none"
