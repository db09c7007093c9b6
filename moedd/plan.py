"""A cost plan: how long the grid of params.yaml takes on this device, before anything long starts.

The plan multiplies counts that follow from the params (iterations, teachers x epochs x batches,
evaluation epochs x batches x seeds x networks) by unit costs measured on this device by a short
calibration, cached in ``.moedd/calibration.json`` per device (its name, the torch version and the
thread count), so a second plan costs nothing:

- ``step``: one SGD training step of an evaluation network with per-sample DSA at a batch size,
  measured at two batch sizes and interpolated linearly (a step's cost is a fixed part plus a
  per-image part), for the evaluation, the full-data reference, MTT's teachers and herding's
  embedding networks;
- ``test``: inference seconds per test image (the test pass);
- ``iteration``: a few real iterations of each optimising method on random images of the
  dataset's shape at the planned configuration (NoE, IPC, classes, the effective method config),
  after one warm-up; a method may probe a cheaper configuration and scale it back
  (``ExpertMethod.calibration_probe``: IDC times 2 inner steps of its ``inner_loop``). MTT needs
  teachers to step, so its iteration is modelled as 3 x ``syn_steps`` training steps of
  ``batch_syn`` images (unrolled forward, backward through the unroll, the meta-gradient).

What it leaves out: prepare and partition (I/O, seconds to a minute), process start-up and the
MLflow bookkeeping (a few seconds per stage), and the report. The estimate is checked against a
real run in docs/results.md.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moedd._atomic import write_text
from moedd.config import check_budget
from moedd.experts import EXPERTS
from moedd.params import Params, dataset_data, method_config

PROBE_BATCHES = (64, 256)
"""Batch sizes the step cost is measured at (linear between and beyond)."""


@dataclass(frozen=True)
class DataShape:
    """What the plan needs to know of a dataset."""

    name: str
    paper: str | None
    num_train: int
    num_test: int
    num_classes: int
    shape: tuple[int, int, int]


@dataclass
class Line:
    """One stage of the plan: its cells and their estimated seconds (total over the cells)."""

    stage: str
    cells: int
    seconds: float
    detail: str


def device_key(device: torch.device) -> str:
    """Which hardware and software a calibration belongs to."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return f"{device.type}|{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Calibration:
    """Measured unit costs of one device, read from and written to a JSON cache."""

    def __init__(self, path: Path, device: torch.device, fresh: bool = False) -> None:
        self.path, self.device, self.key = Path(path), device, device_key(device)
        all_ = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.all = all_
        self.costs: dict[str, float] = {} if fresh else dict(all_.get(self.key, {}))
        self.measured: list[str] = []

    def get(self, key: str, measure: Callable[[], float]) -> float:
        """The cached cost ``key``, or ``measure()`` (then cached)."""
        if key not in self.costs:
            self.costs[key] = measure()
            self.measured.append(key)
        return self.costs[key]

    def save(self) -> None:
        self.all[self.key] = self.costs
        write_text(self.path, json.dumps(self.all, indent=1, sort_keys=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _measure_step(net_name: str, data: DataShape, batch: int, dsa_strategy: str | None, device: torch.device) -> float:
    from moedd.augment import DSA, DSAParams
    from moedd.device import memory_format_for
    from moedd.nets import create_net

    torch.manual_seed(0)
    ch, h, _ = data.shape
    net = create_net(net_name, data.num_classes, channels=ch, image_size=h)
    fmt = memory_format_for(net, device)
    net = net.to(device, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *data.shape, device=device)
    y = torch.randint(0, data.num_classes, (batch,), device=device)
    gen, host = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0)
    dsa = DSA(DSAParams(strategy=dsa_strategy)) if dsa_strategy else None

    def step() -> None:
        xb = dsa.per_sample(x, gen, host) if dsa is not None else x
        loss = F.cross_entropy(net(xb.contiguous(memory_format=fmt)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, device, reps=3)


def _measure_test(net_name: str, data: DataShape, batch: int, device: torch.device) -> float:
    from moedd.device import memory_format_for
    from moedd.nets import create_net

    ch, h, _ = data.shape
    net = create_net(net_name, data.num_classes, channels=ch, image_size=h).to(device).eval()
    fmt = memory_format_for(net, device)
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, *data.shape, device=device).contiguous(memory_format=fmt)

    def run() -> None:
        with torch.inference_mode():
            net(x)

    return _timed(run, device, reps=2) / batch


class UnitCosts:
    """The unit costs the plan multiplies, measured through a :class:`Calibration`."""

    def __init__(self, cal: Calibration, params: Params) -> None:
        self.cal, self.params, self.device = cal, params, cal.device

    def step(self, net: str, data: DataShape, batch: int, dsa: str | None) -> float:
        """Seconds of one training step of ``net`` on ``batch`` images (linear in the batch)."""
        b0, b1 = PROBE_BATCHES
        at = [self.cal.get(f"step|{net}|{data.shape}|{data.num_classes}|{b}|{dsa}",
                           lambda b=b: _measure_step(net, data, b, dsa, self.device)) for b in (b0, b1)]
        return max(at[0] + (at[1] - at[0]) * (batch - b0) / (b1 - b0), 0.25 * at[0])

    def epoch(self, net: str, data: DataShape, images: int, batch: int, dsa: str | None) -> float:
        """Seconds of one epoch over ``images`` images in batches of ``batch``."""
        full, rest = divmod(images, batch)
        return full * self.step(net, data, batch, dsa) + (self.step(net, data, rest, dsa) if rest else 0.0)

    def test_pass(self, net: str, data: DataShape) -> float:
        batch = self.params.evaluate.test_batch_size
        per = self.cal.get(f"test|{net}|{data.shape}|{data.num_classes}|{batch}",
                           lambda: _measure_test(net, data, min(batch, 1000), self.device))
        return per * data.num_test

    def iteration(self, method: str, cfg: Any, data: DataShape, noe: int, ipc: int) -> float:
        """Seconds of one iteration of an optimising method at this configuration."""
        key = f"iteration|{method}|{data.shape}|{data.num_classes}|noe{noe}|ipc{ipc}|{json.dumps(cfg.model_dump(mode='json'), sort_keys=True)}"
        return self.cal.get(key, lambda: _measure_iteration(method, cfg, data, noe, ipc, self.params, self.device))


def _measure_iteration(method: str, cfg: Any, data: DataShape, noe: int, ipc: int, params: Params,
                       device: torch.device) -> float:
    """A few real iterations of ``method`` on random uint8 images of the dataset's shape."""
    from moedd.distill import start_images
    from moedd.experts.base import DistillContext

    cls = EXPERTS.get(method)
    probe, factor = cls.calibration_probe(cfg)
    per_class = max(ipc * 4, int(getattr(probe, "batch_real", 0) or 0), 64)
    gen = torch.Generator().manual_seed(0)
    shards = [torch.randint(0, 256, (data.num_classes * per_class, *data.shape), generator=gen, dtype=torch.uint8)
              for _ in range(noe)]
    labels = torch.arange(data.num_classes).repeat_interleave(per_class)
    ctx = DistillContext(
        shard_images=[s.to(device) for s in shards], shard_labels=[labels.to(device) for _ in range(noe)],
        num_classes=data.num_classes, ipc=ipc, mean=(0.5,) * data.shape[0], std=(0.25,) * data.shape[0],
        device=device, net=params.distill.net, dcor_weight=params.distill.dcor_weight,
        dcor_estimator=params.distill.dcor_estimator, seed=0,
    )
    expert = cls(probe, ctx)
    syn = start_images(expert)
    it = iter(range(10_000))
    return factor * _timed(lambda: expert.step(syn, next(it)), device, reps=2)


def dataset_shape(params: Params, name: str, root: Path = Path(".")) -> DataShape:
    """The shape of grid dataset ``name``: from its prepared store when there is one, else from
    what its source is (CIFAR-10/100 sizes, or the image folder's files counted)."""
    from moedd.data.identity import paper_dataset

    meta_path = root / "data" / name / "prepared" / "meta.json"
    if meta_path.exists():
        m = json.loads(meta_path.read_text())
        return DataShape(name, m.get("paper_dataset") or paper_dataset(m["classes"], m["shape"]), int(m["num_train"]),
                         int(m["num_test"]), len(m["classes"]), tuple(m["shape"]))  # type: ignore[arg-type]
    cfg = dataset_data(params, name)
    known = {"cifar10": (10, "cifar10"), "cifar100": (100, "cifar100")}
    if cfg.source in known:
        classes, paper = known[cfg.source]
        side = cfg.image_size or 32
        ch = 1 if cfg.channels == "gray" else 3
        return DataShape(name, paper if (side, ch) == (32, 3) else None, 50_000, 10_000, classes, (ch, side, side))
    return _folder_shape(name, Path(cfg.root), cfg.image_size, cfg.channels)


def _folder_shape(name: str, root: Path, image_size: int | None, channels: str) -> DataShape:
    from PIL import Image

    from moedd.data.identity import paper_dataset

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root} has no train/<class>/ folders; run `moedd prepare` or fix datasets.{name}.root")
    count = {split: sum(1 for c in classes for f in (root / split / c).iterdir() if f.is_file())
             for split in ("train", "test") if (root / split).is_dir()}
    first = next(f for f in (root / "train" / classes[0]).iterdir() if f.is_file())
    with Image.open(first) as im:
        ch = {"gray": 1, "rgb": 3}.get(channels, len(im.getbands()))
        side = image_size or im.size[1]
    shape = (ch, side, side)
    return DataShape(name, paper_dataset(classes, list(shape)), count.get("train", 0), count.get("test", 0), len(classes), shape)


def _decoded_per_stored(cfg: Any) -> int:
    factor = getattr(cfg, "factor", 1) or 1
    return int(factor) ** 2


def plan(params: Params, costs: UnitCosts, shapes: dict[str, DataShape]) -> list[Line]:
    """The stages of the grid with their estimated seconds on this device."""
    p, g, ev = params, params.grid, params.evaluate
    dsa = ev.dsa_strategy if ev.dsa else None
    lines = [_trajectories(p, costs, shapes), _distill(p, costs, shapes), _evaluate(p, costs, shapes, dsa)]
    full = Line("full_data", 0, 0.0, f"{p.full_data.epochs} epochs x {len(p.full_data.seeds)} seeds")
    for name in g.datasets:
        data = shapes[name]
        for net in p.full_data.nets:
            full.cells += 1
            full.seconds += len(p.full_data.seeds) * (p.full_data.epochs * costs.epoch(net, data, data.num_train, ev.batch_size, dsa)
                                                       + costs.test_pass(net, data))
    return [line for line in [*lines, full] if line.cells]


def _trajectories(p: Params, costs: UnitCosts, shapes: dict[str, DataShape]) -> Line:
    t = p.trajectories
    line = Line("trajectories", 0, 0.0, f"{t.num_teachers} teachers per shard")
    for name in p.grid.datasets:
        data = shapes[name]
        for noe in p.grid.mtt_noe:
            ipc = check_budget(max(p.grid.budgets), noe)
            cfg, _ = method_config(p, "mtt", ipc, data.paper)
            epochs = t.epochs or (cfg.max_start_epoch + cfg.expert_epochs)  # type: ignore[attr-defined]
            dsa = t.dsa_strategy if t.dsa else None
            per_shard = t.num_teachers * epochs * costs.epoch("convnet3", data, data.num_train // noe, t.batch_size, dsa)
            line.cells += 1
            line.seconds += noe * per_shard
    return line


def _grid_cells(p: Params, shapes: dict[str, DataShape]) -> Iterator[tuple[DataShape, int, str, int, int, Any]]:
    """Every (data, budget, method, NoE, IPC, effective config) set of the grid, MTT's included."""
    for name in p.grid.datasets:
        data = shapes[name]
        for budget in p.grid.budgets:
            cells = [(m, n) for m in [*p.grid.experts, *p.grid.baselines] for n in p.grid.noe]
            for method, noe in cells + [("mtt", n) for n in p.grid.mtt_noe]:
                ipc = check_budget(budget, noe)
                yield data, budget, method, noe, ipc, method_config(p, method, ipc, data.paper)[0]


def _mixture_cells(p: Params, shapes: dict[str, DataShape]) -> Iterator[tuple[DataShape, int, int, list[tuple[str, Any]]]]:
    """Every heterogeneous mixture of the grid: (data, budget, IPC, [(method, effective config)]
    per expert); each member costs what its method's one-expert run costs (``moedd.experts.mixture``)."""
    from moedd.experts.mixture import parse_methods

    for name in p.grid.datasets:
        data = shapes[name]
        for budget in p.grid.budgets:
            for mix in p.grid.mixtures:
                ipc = check_budget(budget, mix.noe)
                yield data, budget, ipc, [(m, method_config(p, m, ipc, data.paper)[0])
                                          for m in parse_methods(mix.experts, EXPERTS.names())]


def _distill(p: Params, costs: UnitCosts, shapes: dict[str, DataShape]) -> Line:
    line = Line("distill", 0, 0.0, "iterations x measured iteration")
    for data, _budget, method, noe, ipc, cfg in _grid_cells(p, shapes):
        line.cells += 1
        line.seconds += _distill_cell(method, cfg, data, noe, ipc, costs, p.evaluate.batch_size)
    for data, _budget, ipc, members in _mixture_cells(p, shapes):
        line.cells += 1
        line.seconds += sum(_distill_cell(m, cfg, data, 1, ipc, costs, p.evaluate.batch_size) for m, cfg in members)
    return line


def _distill_cell(method: str, cfg: Any, data: DataShape, noe: int, ipc: int, costs: UnitCosts, batch: int) -> float:
    cls = EXPERTS.get(method)
    if method == "mtt":
        batch_syn = getattr(cfg, "batch_syn", None) or data.num_classes * ipc
        dsa = getattr(cfg, "dsa_strategy", None)
        return cfg.iterations * 3 * cfg.syn_steps * costs.step("convnet3", data, batch_syn, dsa)
    if not cls.optimises:  # herding trains an embedding net per shard; random only draws
        epochs = int(getattr(cfg, "train_epochs", 0) or 0)
        bs = int(getattr(cfg, "batch_size", batch) or batch)
        return noe * epochs * costs.epoch("convnet3", data, data.num_train // noe, bs, None) if epochs else 0.0
    return cfg.iterations * costs.iteration(method, cfg, data, noe, ipc)


def _evaluate(p: Params, costs: UnitCosts, shapes: dict[str, DataShape], dsa: str | None) -> Line:
    ev = p.evaluate
    line = Line("evaluate", 0, 0.0, f"{len(ev.nets)} nets x {len(ev.seeds)} seeds x {ev.epochs} epochs")
    sets = [(data, data.num_classes * budget * _decoded_per_stored(cfg)) for data, budget, _m, _n, _i, cfg in _grid_cells(p, shapes)]
    sets += [(data, sum(data.num_classes * ipc * _decoded_per_stored(cfg) for _m, cfg in members))
             for data, _budget, ipc, members in _mixture_cells(p, shapes)]
    for data, images in sets:
        line.cells += 1
        for net in ev.nets:
            epoch = costs.epoch(net, data, images, ev.batch_size, dsa)
            line.seconds += len(ev.seeds) * (ev.epochs * epoch + costs.test_pass(net, data))
    return line


def human(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def total(lines: list[Line]) -> float:
    return math.fsum(line.seconds for line in lines)
