"""Teacher trajectories for MTT: train teacher networks on each shard and store their parameters.

MTT (docs/methods.md §MTT teachers, mtt-distillation ``buffer.py``) matches the training trajectory of
networks trained on real data. In moedd, expert k only ever sees shard k, so its teachers are
trained on shard k alone: for every shard and every teacher i < ``num_teachers``, a fresh
``distill.net`` (ConvNet-3) is trained with SGD(lr, momentum, weight decay), batch 256 and
per-sample DSA, and its flattened parameter vector (``net.parameters()`` order) is recorded at
initialisation and after every epoch: a float32 tensor (epochs + 1, P).

Input space: the one the MTT experts will distill in. With ``experts.mtt.zca`` (after the preset
for the run's IPC) images are ZCA-whitened [0, 1] pixels, with the transform fitted ONCE on the
full training set (docs/methods.md §ZCA); otherwise they are mean/std-normalised like every other method.

Layout of an output directory (a DVC output, ``persist: true``)::

    meta.json               noe, num_teachers, epochs, net, space, zca digest, data and partition
                            digests, param_count, per-teacher fingerprints and test accuracies
    zca.pt                  the ZCA transform (only when space == "zca")
    shard{k}/teacher{i:03d}.pt
                            {"trajectory": float32 (epochs+1, P), "fingerprint", history, test_acc}

Resumability: each teacher file is written atomically and carries a fingerprint of everything
that determines it (data and partition digests, shard, index, trajectory settings except the
device, the net, the epochs, the ZCA digest). A rerun skips teachers whose file has the same
fingerprint (the file stays byte-identical) and retrains the others, so an interrupted run loses
at most the teacher in progress. ``meta.json`` is written last (atomically) and removed at the
start of a run: a directory without it is incomplete. Its content is deterministic (no times, no
device), because distillation checkpoints fingerprint it.

Teachers outlive a queued experiment: that runs in a temporary copy of the repository, deleted
afterwards, so finished teachers in its output directory would be lost with it. With a
``cache_dir`` (the CLI passes ``<checkpoint root>/teachers``, under the repository root, see
``moedd.tracking.checkpoint_root``) every teacher is first written there as ``<fingerprint>.pt``
and then linked into the output (a hard link: no second copy on one filesystem); a rerun takes
a teacher missing from the output from there. Once the run is complete the output holds them
all and their cache entries are deleted.

Deviations from ``buffer.py``: seeds derive from (trajectories.seed, shard, teacher) instead of
the clock; the learning rate never decays (MTT's ``--decay`` is off by default); training
accuracy is measured on the augmented batches of each epoch, as ``buffer.py`` reports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from moedd._atomic import atomic_file, save_torch, write_text
from moedd.augment import DSA, DSAParams
from moedd.config import ConfigError, TrajectoriesConfig, check_budget
from moedd.data import Partition, Prepared, check_ipc_fits
from moedd.data.zca import ZCA, fit_zca, load_zca
from moedd.distributed import Ranks, barrier
from moedd.device import memory_format_for
from moedd.nets import create_net
from moedd.experts.mtt import MTTConfig
from moedd.params import Params, method_config

META_FILE = "meta.json"
ZCA_FILE = "zca.pt"
_SEED_SPACE = 2**63


def teacher_path(out: str | Path, shard: int, index: int) -> Path:
    """Where teacher ``index`` of shard ``shard`` lives inside a trajectories directory."""
    return Path(out) / f"shard{shard}" / f"teacher{index:03d}.pt"


# ---------------------------------------------------------------- settings


def mtt_config(params: Params, ipc: int, paper: str | None = None) -> MTTConfig:
    """The effective MTT config at ``ipc`` images per class per expert on data ``paper``
    (``Prepared.paper``), preset row applied."""
    cfg, _ = method_config(params, "mtt", ipc, paper)
    return cfg  # type: ignore[return-value]


def teacher_epochs(params: Params, ipc: int, paper: str | None = None) -> int:
    """Epochs each teacher trains: ``trajectories.epochs``, or what MTT at ``ipc`` can use
    (``max_start_epoch + expert_epochs`` of its effective config) when that is None."""
    if params.trajectories.epochs is not None:
        return params.trajectories.epochs
    cfg = mtt_config(params, ipc, paper)
    return cfg.max_start_epoch + cfg.expert_epochs


def validate_trajectories(params: Params, prepared: Prepared, partition: Partition) -> int:
    """Every check that needs the data, before any training; returns IPC per expert.

    Raises:
        ConfigError: budget not divisible by NoE, IPC larger than a shard's smallest class,
            a partition made from other data, or an MTT preset that cannot be resolved.
    """
    ipc = check_budget(params.distill.budget, partition.noe)
    if partition.data_digest and partition.data_digest != prepared.digest:
        raise ConfigError("the partition was made from other data (digest differs); rerun `moedd partition`")
    check_ipc_fits(partition, prepared.train_labels, prepared.num_classes, ipc)
    teacher_epochs(params, ipc, prepared.paper)  # resolves the MTT preset: a bad choice fails here
    return ipc


def teacher_seed(seed: int, shard: int, index: int) -> int:
    """A seed that depends only on (trajectories.seed, shard, teacher index)."""
    h = hashlib.sha256(f"moedd-teacher:{seed}:{shard}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") % _SEED_SPACE


# ---------------------------------------------------------------- input space


@dataclass
class InputSpace:
    """How uint8 images become network inputs: ZCA-whitened [0, 1] pixels or mean/std-normalised."""

    kind: Literal["zca", "normalized"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None

    @property
    def zca_digest(self) -> str | None:
        return self.zca.digest if self.zca is not None else None

    def apply(self, images_u8: Tensor, device: torch.device) -> Tensor:
        """uint8 (N, ch, H, W) -> float32 inputs on ``device``."""
        x = images_u8.to(device)
        if self.zca is not None:
            return self.zca.apply_u8(x)
        c = len(self.mean)
        m = torch.tensor(self.mean, device=device).view(1, c, 1, 1)
        s = torch.tensor(self.std, device=device).view(1, c, 1, 1)
        return (x.float().div_(255.0) - m) / s


def input_space(cfg: MTTConfig, prepared: Prepared, cached: Path | None = None) -> InputSpace:
    """The input space of the teachers; with ZCA, fitted once on the FULL training set.

    A transform already in ``cached`` is reused when it was fitted on the same data with the
    same ε (fitting is deterministic, so refitting would give the same transform).
    """
    if not cfg.zca:
        return InputSpace("normalized", prepared.mean, prepared.std)
    zca = None
    if cached is not None and cached.exists():
        try:
            old = load_zca(cached)
        except (ValueError, KeyError, RuntimeError, OSError):
            old = None
        if old is not None and (old.data_digest, old.eps, old.n_fit) == (prepared.digest, cfg.zca_eps, len(prepared.train_images)):
            zca = old
    if zca is None:
        zca = fit_zca(prepared.train_images, eps=cfg.zca_eps, data_digest=prepared.digest)
    return InputSpace("zca", prepared.mean, prepared.std, zca)


# ---------------------------------------------------------------- one teacher


def init_teacher(net_name: str, num_classes: int, image_shape: tuple[int, ...], seed: int) -> nn.Module:
    """A freshly initialised network, seeded explicitly (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_net(net_name, num_classes, channels=image_shape[0], image_size=image_shape[1])


def flat_params(net: nn.Module) -> Tensor:
    """All parameters in ``net.parameters()`` order, flattened (logical layout, any memory format)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


EpochFn = Callable[[int, float, float], None]
"""Called as (epoch done, train accuracy, train loss) after every epoch of one teacher."""


@dataclass
class TeacherRun:
    """A trained teacher: its trajectory (epochs+1, P) on the CPU, the network, per-epoch history."""

    trajectory: Tensor
    net: nn.Module
    train_acc: list[float]
    train_loss: list[float]


def train_teacher(
    images: Tensor, labels: Tensor, num_classes: int, net_name: str, cfg: TrajectoriesConfig,
    epochs: int, seed: int, on_epoch: EpochFn | None = None,
) -> TeacherRun:
    """Train one teacher as ``buffer.py`` does and record its parameters after every epoch.

    Args:
        images: float32 inputs (N, ch, H, W) of ONE shard, already in the input space, on the device.
        labels: int64 (N,) on the same device.
        num_classes: classifier width.
        net_name: registered network name.
        cfg: optimiser, batch size and augmentation settings.
        epochs: passes over the shard.
        seed: initialisation seed; the shuffling/augmentation stream derives from it.
        on_epoch: progress callback.
    """
    device = images.device
    net = init_teacher(net_name, num_classes, tuple(images.shape[1:]), seed)
    fmt = memory_format_for(net, device)
    net = net.to(device, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed((seed + 1) % _SEED_SPACE)
    host = torch.Generator().manual_seed((seed + 2) % _SEED_SPACE)  # DSA's group per batch: no device sync
    dsa = DSA(DSAParams(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    first = flat_params(net)
    traj = torch.empty(epochs + 1, first.numel(), dtype=torch.float32)
    traj[0] = first.cpu()
    accs, losses, n = [], [], len(labels)
    for epoch in range(epochs):
        net.train()
        correct = torch.zeros((), dtype=torch.long, device=device)
        loss_sum = torch.zeros((), device=device)
        order = torch.randperm(n, generator=gen, device=device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = images[idx], labels[idx]
            if dsa is not None:
                x = dsa.per_sample(x, gen, host)
            out = net(x.contiguous(memory_format=fmt))
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == y).sum()
        traj[epoch + 1] = flat_params(net).cpu()  # one host sync per epoch
        accs.append(correct.item() / n)
        losses.append(loss_sum.item() / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, accs[-1], losses[-1])
    return TeacherRun(traj, net, accs, losses)


# ---------------------------------------------------------------- all teachers


@dataclass
class TeacherRecord:
    """What a run reports about one teacher (trained now or kept from an earlier run)."""

    shard: int
    index: int
    fingerprint: str
    train_acc: list[float]
    train_loss: list[float]
    test_acc: float
    skipped: bool = False
    seconds: float = 0.0
    rank: int = 0
    """The torchrun rank that trained (or kept) it; 0 without torchrun."""


@dataclass
class TrajectoriesResult:
    """Output of :func:`train_teachers`: the meta written, every teacher's record, timing."""

    meta: dict[str, Any]
    teachers: list[list[TeacherRecord]]
    seconds: float = 0.0

    @property
    def trained(self) -> int:
        return sum(not t.skipped for shard in self.teachers for t in shard)

    @property
    def skipped(self) -> int:
        return sum(t.skipped for shard in self.teachers for t in shard)


TeacherEpochFn = Callable[[int, int, int, float, float], None]
"""(shard, teacher, epoch done, train accuracy, train loss)."""
TeacherDoneFn = Callable[[TeacherRecord], None]


def teacher_fingerprint(params: Params, prepared: Prepared, partition: Partition, shard: int, index: int,
                        epochs: int, zca_digest: str | None) -> str:
    """Identifies everything that determines one teacher file.

    Left out on purpose: the device (a teacher is a teacher wherever it trained), the number of
    teachers (teacher i does not depend on it, so raising it keeps the old ones), the test batch
    size (it only affects how the stored test accuracy was computed) and ``trajectories.epochs``
    itself (the effective ``epochs`` is in).
    """
    cfg = params.trajectories.model_dump(exclude={"device", "num_teachers", "test_batch_size", "epochs"})
    blob = json.dumps({
        "data": prepared.digest, "partition": partition.digest, "shard": shard, "index": index,
        "trajectories": cfg, "net": params.distill.net, "epochs": epochs, "zca": zca_digest,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_teacher(path: Path) -> dict[str, Any] | None:
    """A teacher file's content (memory-mapped: the trajectory is only read where indexed), or None."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None


def _publish(src: Path, dst: Path) -> None:
    """Put the finished teacher file ``src`` at ``dst`` atomically: a hard link where both lie on
    one filesystem (no second copy; safe since teacher files are only ever replaced, never
    modified in place), else a copy."""
    with atomic_file(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _existing(path: Path, fp: str) -> TeacherRecord | None:
    d = _read_teacher(path)
    if d is None or d.get("fingerprint") != fp:
        return None
    return TeacherRecord(int(d["shard"]), int(d["index"]), fp, list(d["train_acc"]), list(d["train_loss"]),
                         float(d["test_acc"]), skipped=True)


def _write_zca(path: Path, zca: ZCA | None) -> None:
    """Keep ``path`` equal to the transform in use: untouched when it already is, removed without ZCA."""
    if zca is None:
        path.unlink(missing_ok=True)
        return
    try:
        if load_zca(path).digest == zca.digest:
            return
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    zca.save(path)


def _remove_stale(out: Path, shards: list[int], num_teachers: int) -> None:
    """Drop teacher files the current settings do not ask for, and leftovers of interrupted writes."""
    for shard_dir in out.glob("shard*"):
        for f in shard_dir.glob("teacher*.pt*"):
            stem = f.name.removeprefix("teacher").split(".")[0]
            k = shard_dir.name.removeprefix("shard")
            keep = f.suffix == ".pt" and stem.isdigit() and k.isdigit() and int(stem) < num_teachers and int(k) in shards
            if not keep:
                f.unlink()


def train_teachers(
    params: Params, prepared: Prepared, partition: Partition, out: str | Path, device: torch.device,
    on_epoch: TeacherEpochFn | None = None, on_teacher: TeacherDoneFn | None = None,
    cache_dir: str | Path | None = None, shards: list[int] | None = None, ranks: Ranks | None = None,
) -> TrajectoriesResult:
    """Train (or keep) ``trajectories.num_teachers`` teachers per shard and write the directory.

    Args:
        params: validated parameters (trajectories, experts.mtt + presets.mtt, distill.net/budget).
        prepared: the prepared dataset (ZCA is fitted on all of its training images).
        partition: NoE shards; teacher (k, i) trains only on shard k.
        out: the trajectories directory (created; existing matching teachers are kept).
        device: where to train.
        on_epoch: progress of the teacher in training.
        on_teacher: called once per teacher, trained or kept, with its record.
        cache_dir: where teachers are kept until the run is complete, keyed by fingerprint (see
            the module docstring); None = only in ``out``.
        shards: the shards that get teachers (a heterogeneous mixture's MTT experts'); None = all.
            The others have none (``Trajectories.count`` 0), recorded in meta.json.
        ranks: the ranks of a ``torchrun`` launch (``moedd.distributed``): each trains every
            world-th (shard, teacher); rank 0 fits and writes the ZCA first and writes meta.json
            once every rank is done, and gets every record (``on_teacher`` runs there for the
            others' teachers too). A teacher depends only on its seed and shard, so the files are
            the one-process run's.

    Returns:
        The meta written to ``meta.json`` and the record of every teacher.
    """
    t0 = time.perf_counter()
    ipc = validate_trajectories(params, prepared, partition)
    wanted = sorted(set(shards)) if shards is not None else list(range(partition.noe))
    if not wanted or any(not 0 <= k < partition.noe for k in wanted):
        raise ConfigError(f"teacher shards {shards} do not fit NoE={partition.noe}")
    cfg, epochs = params.trajectories, teacher_epochs(params, ipc, prepared.paper)
    out = Path(out)
    main = ranks is None or ranks.main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # incomplete until every teacher is there
        space = input_space(mtt_config(params, ipc, prepared.paper), prepared, out / ZCA_FILE)
        _write_zca(out / ZCA_FILE, space.zca)
        _remove_stale(out, wanted, cfg.num_teachers)
    if ranks is not None:
        barrier()  # the others read the ZCA rank 0 wrote, and write teachers only after its clean-up
    if not main:
        space = input_space(mtt_config(params, ipc, prepared.paper), prepared, out / ZCA_FILE)
    units = [(k, i) for k in wanted for i in range(cfg.num_teachers)]
    mine = set(ranks.share(units) if ranks is not None else units)
    cache = Path(cache_dir) if cache_dir is not None else None
    test_x = test_y = None
    records: list[list[TeacherRecord]] = []
    for k, shard in enumerate(partition.shards):
        records.append([])
        x = y = None
        for i in range(cfg.num_teachers if k in wanted else 0):
            if (k, i) not in mine:
                continue
            path = teacher_path(out, k, i)
            fp = teacher_fingerprint(params, prepared, partition, k, i, epochs, space.zca_digest)
            cached = cache / f"{fp}.pt" if cache is not None else None
            rec = _existing(path, fp)
            if rec is None and cached is not None and (rec := _existing(cached, fp)) is not None:
                _publish(cached, path)  # finished by a run whose output is gone (a queued experiment)
            if rec is None:
                if x is None:  # this shard's inputs, only when some teacher needs training
                    x, y = space.apply(prepared.train_images[shard], device), prepared.train_labels[shard].to(device)
                if test_x is None:
                    test_x, test_y = space.apply(prepared.test_images, device), prepared.test_labels.to(device)
                rec = _train_one(params, prepared.num_classes, x, y, test_x, test_y, k, i, epochs, fp,
                                 cached or path, on_epoch)
                if cached is not None:
                    _publish(cached, path)
            if ranks is not None:
                rec = replace(rec, rank=ranks.rank)
            records[k].append(rec)
            if on_teacher is not None:
                on_teacher(rec)
    if ranks is not None:
        records = _gathered(records, on_teacher if main else None, ranks.rank)
    meta = _meta(params, prepared, partition, epochs, space, records, wanted)
    if main:
        write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    if cache is not None and main:  # complete: the output holds every teacher now
        for fp in (r.fingerprint for shard_recs in records for r in shard_recs):
            (cache / f"{fp}.pt").unlink(missing_ok=True)
    return TrajectoriesResult(meta, records, time.perf_counter() - t0)


def _gathered(records: list[list[TeacherRecord]], on_teacher: TeacherDoneFn | None, rank: int) -> list[list[TeacherRecord]]:
    """Every rank's records, per shard in teacher order; ``on_teacher`` for the other ranks' ones."""
    from moedd.distributed import gather

    every = [r for rank_records in gather(records) for shard in rank_records for r in shard]
    out: list[list[TeacherRecord]] = [[] for _ in records]
    for r in sorted(every, key=lambda r: (r.shard, r.index)):
        out[r.shard].append(r)
        if on_teacher is not None and r.rank != rank:
            on_teacher(r)
    return out


def _train_one(
    params: Params, num_classes: int, x: Tensor, y: Tensor, test_x: Tensor, test_y: Tensor,
    k: int, i: int, epochs: int, fp: str, path: Path, on_epoch: TeacherEpochFn | None,
) -> TeacherRecord:
    """Train teacher (k, i), test it, write its file atomically; return its record."""
    t0 = time.perf_counter()
    cfg = params.trajectories
    cb = (lambda e, a, loss: on_epoch(k, i, e, a, loss)) if on_epoch is not None else None
    run = train_teacher(x, y, num_classes, params.distill.net, cfg, epochs,
                        teacher_seed(cfg.seed, k, i), cb)
    from moedd.evaluate import test_accuracy

    test_acc = test_accuracy(run.net, test_x, test_y, cfg.test_batch_size)
    save_torch({
        "fingerprint": fp, "shard": k, "index": i, "seed": teacher_seed(cfg.seed, k, i), "epochs": epochs,
        "trajectory": run.trajectory, "train_acc": run.train_acc, "train_loss": run.train_loss, "test_acc": test_acc,
    }, path)
    return TeacherRecord(k, i, fp, run.train_acc, run.train_loss, test_acc, seconds=time.perf_counter() - t0)


def _meta(params: Params, prepared: Prepared, partition: Partition, epochs: int, space: InputSpace,
          records: list[list[TeacherRecord]], shards: list[int]) -> dict[str, Any]:
    """The content of meta.json (deterministic: distillation checkpoints fingerprint it)."""
    ch, h, w = prepared.image_shape
    net = create_net(params.distill.net, prepared.num_classes, channels=ch, image_size=h)
    fps = [[r.fingerprint for r in shard] for shard in records]
    digest = hashlib.sha256(json.dumps([fps, space.zca_digest]).encode()).hexdigest()[:16]
    return TrajectoriesMeta(
        noe=partition.noe, num_teachers=params.trajectories.num_teachers, epochs=epochs, net=params.distill.net,
        space=space.kind, zca_digest=space.zca_digest, zca_eps=space.zca.eps if space.zca is not None else None,
        data_digest=prepared.digest, partition_digest=partition.digest,
        param_count=sum(p.numel() for p in net.parameters()), image_shape=[ch, h, w], classes=prepared.classes,
        mean=list(prepared.mean), std=list(prepared.std), digest=digest, fingerprints=fps,
        test_acc=[[r.test_acc for r in shard] for shard in records],
        shards=None if len(shards) == partition.noe else shards,
    ).model_dump()


# ---------------------------------------------------------------- reading


class TrajectoriesMeta(BaseModel):
    """``meta.json`` of a trajectories directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noe: int
    num_teachers: int
    epochs: int
    net: str
    space: Literal["zca", "normalized"]
    zca_digest: str | None
    zca_eps: float | None
    data_digest: str
    partition_digest: str
    param_count: int
    image_shape: list[int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    digest: str
    """Identifies the set of teachers: a hash of their fingerprints and the ZCA digest."""
    fingerprints: list[list[str]]
    test_acc: list[list[float]]
    """Test accuracy (fraction) of each finished teacher, [shard][teacher]."""
    shards: list[int] | None = None
    """The shards that have teachers (a mixture's MTT experts'); None = every shard."""


@dataclass
class Trajectories:
    """A complete trajectories directory, read lazily: a teacher is memory-mapped when asked for.

    Attributes:
        path: the directory.
        meta: ``meta.json`` as a dict (see :class:`TrajectoriesMeta`).
        zca: the ZCA transform when ``meta["space"] == "zca"``, else None.
    """

    path: Path
    meta: dict[str, Any]
    zca: ZCA | None = None
    _cache: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False)

    @property
    def noe(self) -> int:
        return int(self.meta["noe"])

    @property
    def epochs(self) -> int:
        return int(self.meta["epochs"])

    @property
    def shards(self) -> list[int]:
        """The shards that have teachers."""
        listed = self.meta.get("shards")
        return list(range(self.noe)) if listed is None else list(listed)

    def count(self, shard: int) -> int:
        """Number of teachers of ``shard`` (0 for a shard trained without: ``shards``)."""
        if not 0 <= shard < self.noe:
            raise IndexError(f"shard {shard} out of range (NoE={self.noe})")
        return int(self.meta["num_teachers"]) if shard in self.shards else 0

    def load(self, shard: int, index: int) -> Tensor:
        """Trajectory of teacher ``index`` of ``shard``: float32 (epochs+1, P), memory-mapped.

        Raises:
            ValueError: the file was replaced by a teacher of other inputs since meta.json was written.
        """
        key = (shard, index)
        if key not in self._cache:
            if not 0 <= index < self.count(shard):
                raise IndexError(f"teacher {index} out of range (shard {shard} has {self.count(shard)})")
            path = teacher_path(self.path, shard, index)
            d = _read_teacher(path)
            if d is None or d.get("fingerprint") != self.meta["fingerprints"][shard][index]:
                raise ValueError(f"{path} does not belong to {self.path}/meta.json; rerun `moedd trajectories`")
            self._cache[key] = d["trajectory"]  # mmap-backed: only the epochs indexed are read
        return self._cache[key]


def load_trajectories(path: str | Path) -> Trajectories:
    """Open a trajectories directory written by :func:`train_teachers`.

    Raises:
        ConfigError: no meta.json (missing or an unfinished run), unreadable meta, a missing
            teacher file, or a ZCA file that does not match the meta. One line each.
    """
    p = Path(path)
    if not (p / META_FILE).exists():
        raise ConfigError(f"{p} holds no complete teacher trajectories (no {META_FILE}); run `moedd trajectories` (again)")
    try:
        meta = TrajectoriesMeta.model_validate_json((p / META_FILE).read_text())
    except ValidationError as err:
        raise ConfigError(f"{p / META_FILE} is not a trajectories meta file ({err.error_count()} errors)") from None
    shards = range(meta.noe) if meta.shards is None else meta.shards
    missing = [teacher_path(p, k, i) for k in shards for i in range(meta.num_teachers)
               if not teacher_path(p, k, i).exists()]
    if missing:
        raise ConfigError(f"{p} is incomplete: {len(missing)} teacher file(s) missing, e.g. {missing[0]}; "
                          "rerun `moedd trajectories`")
    zca = None
    if meta.space == "zca":
        if not (p / ZCA_FILE).exists():
            raise ConfigError(f"{p} was trained in ZCA space but has no {ZCA_FILE}; rerun `moedd trajectories`")
        zca = load_zca(p / ZCA_FILE)
        if zca.digest != meta.zca_digest:
            raise ConfigError(f"{p / ZCA_FILE} is not the transform the teachers used (digest differs)")
    return Trajectories(p, meta.model_dump(), zca)


def summarize(result: TrajectoriesResult) -> dict[str, Any]:
    """Headline numbers of a run (test accuracies in percent), for the metrics JSON."""
    accs = [t.test_acc for shard in result.teachers for t in shard]
    per_shard = {str(k): round(100 * statistics.fmean(t.test_acc for t in shard), 2)
                 for k, shard in enumerate(result.teachers) if shard}
    return {
        "noe": result.meta["noe"], "num_teachers": result.meta["num_teachers"], "epochs": result.meta["epochs"],
        "space": result.meta["space"], "param_count": result.meta["param_count"],
        "test_acc_mean": round(100 * statistics.fmean(accs), 2) if accs else None,
        "test_acc_std": round(100 * statistics.pstdev(accs), 2) if len(accs) > 1 else 0.0,
        "test_acc_per_shard": per_shard, "trained": result.trained, "skipped": result.skipped,
        "seconds": round(result.seconds, 2),
    }
