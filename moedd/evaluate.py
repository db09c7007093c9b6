"""Train-on-synthetic, test-on-real: the one evaluation protocol of every table.

Protocol (DESIGN.md; DSA protocol of algorithms.md §4): a fresh network per (architecture,
seed), SGD(lr, momentum 0.9, weight decay 5e-4), batch 256, cross-entropy, learning rate × 0.1
at half of the epochs, per-sample DSA augmentation, accuracy after the last epoch on the full
real test set; mean ± std over the seed list. The experts' images are fused online with mixup
(``moedd.moe.fusion``) before augmentation. Method-specific decoding (multi-formation) and a
learned learning rate (MTT) come from the synthetic set's metadata.

Deviations from ``evaluate_synset`` of the reference code, stated so numbers can be compared:
we train exactly ``epochs`` epochs (the reference runs epochs+1) and decay the learning rate in
place instead of rebuilding the optimiser (which silently reset momentum there).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moedd.augment import DSA, DSAParams
from moedd.config import EvaluateConfig, FusionConfig
from moedd.device import memory_format_for
from moedd.moe import MixupFusion
from moedd.nets import create_net
from moedd.registry import Registry
from moedd.synthetic import SyntheticSet

Decoder = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
DECODERS: Registry[Decoder] = Registry("decoding")
"""How stored synthetic images become training images, by ``meta.decoding``."""


@DECODERS.register("none")
def _identity(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return images, labels


@DECODERS.register("multiformation2")
def decode_quadrants(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """2x2 multi-formation (IDC) / partition-and-expansion (IDM), factor 2.

    Each stored image is cut into its four quadrants (top-left, bottom-left, top-right,
    bottom-right), each bilinearly upsampled back to full size, all with the stored label:
    N images -> 4N training images, quadrant-major.
    """
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    quads = [images[..., :h, :w], images[..., h:, :w], images[..., :h, w:], images[..., h:, w:]]
    up = [F.interpolate(q, size=images.shape[-2:], mode="bilinear", align_corners=False) for q in quads]
    return torch.cat(up), labels.repeat(4)


@dataclass(frozen=True)
class TrainingSet:
    """The pooled, decoded training images of all experts (on the device)."""

    images: Tensor
    labels: Tensor
    experts: Tensor
    lr: float


def pool_experts(syn: SyntheticSet, base_lr: float, device: torch.device) -> TrainingSet:
    """Decode every expert's images and pool them, remembering which expert each came from."""
    decode = DECODERS.get(syn.meta.decoding)
    c = len(syn.meta.mean)
    mean = torch.tensor(syn.meta.mean).view(1, c, 1, 1)
    std = torch.tensor(syn.meta.std).view(1, c, 1, 1)
    xs, ys, es = [], [], []
    for k, (x, y) in enumerate(zip(syn.images, syn.labels, strict=True)):
        dx, dy = decode(x.float(), y)
        if syn.meta.space == "pixel":  # IDC stores [0, 1] pixels; training uses normalised images
            dx = (dx - mean) / std
        # 'normalized' and 'zca' sets are already in their training space
        xs.append(dx)
        ys.append(dy)
        es.append(torch.full_like(dy, k))
    lr = syn.meta.learned_lr if syn.meta.learned_lr is not None else base_lr
    return TrainingSet(torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(es).to(device), lr)


def prepare_test_images(syn: SyntheticSet, images_u8: Tensor, device: torch.device) -> Tensor:
    """uint8 test images -> the space the set's networks train in: ZCA-whitened with the set's
    own transform for 'zca' sets, else mean/std-normalised (also for pixel-space sets, whose
    training images are normalised by ``pool_experts``)."""
    if syn.meta.space == "zca":
        return syn.zca.apply_u8(images_u8.to(device))
    return normalize_test(images_u8, tuple(syn.meta.mean), tuple(syn.meta.std), device)


def normalize_test(images_u8: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """uint8 test images -> float32 in the synthetic set's normalised space, on the device."""
    c = len(mean)
    m = torch.tensor(mean, device=device).view(1, c, 1, 1)
    s = torch.tensor(std, device=device).view(1, c, 1, 1)
    return ((images_u8.to(device).float() / 255.0) - m) / s


@torch.inference_mode()
def test_accuracy(net: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    """Top-1 accuracy (fraction) on the whole test set, in large inference-mode batches."""
    net.eval()
    fmt = memory_format_for(net, images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].contiguous(memory_format=fmt)
        correct += (net(x).argmax(1) == labels[i : i + batch_size]).sum()
    return correct.item() / len(images)


def train_network(
    net_name: str, data: TrainingSet, cfg: EvaluateConfig, fusion: FusionConfig, seed: int,
    num_classes: int, on_epoch: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """Train a fresh ``net_name`` on the (fused) synthetic set with the fixed protocol."""
    device = data.images.device
    ch, h = data.images.shape[1], data.images.shape[2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_net(net_name, num_classes, channels=ch, image_size=h)
    fmt = memory_format_for(net, device)
    net = net.to(device, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=data.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    host = torch.Generator().manual_seed(seed + 15_485_863)  # DSA's group per batch, drawn without a device sync
    rng = np.random.default_rng(seed)
    dsa = DSA(DSAParams(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    mixer = MixupFusion(data.images, data.labels, data.experts, fusion.p, fusion.alpha) if fusion.kind == "mixup" else None
    n = len(data.labels)
    net.train()
    for epoch in range(cfg.epochs):
        if epoch == cfg.epochs // 2:
            for group in opt.param_groups:
                group["lr"] = data.lr * 0.1
        order = torch.randperm(n, generator=gen, device=device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = data.images[idx]
            if mixer is not None:
                x = mixer(x, idx, gen, rng)
            if dsa is not None:
                x = dsa.per_sample(x, gen, host)
            loss = F.cross_entropy(net(x.contiguous(memory_format=fmt)), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch:
            on_epoch(epoch + 1)
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
EpochFn = Callable[[str, int, int], None]


def evaluate_synthetic(
    syn: SyntheticSet, test_images: Tensor, test_labels: Tensor, cfg: EvaluateConfig, fusion: FusionConfig,
    device: torch.device, on_result: ResultFn | None = None, on_epoch: EpochFn | None = None,
) -> dict[str, NetResult]:
    """Evaluate a synthetic set on every network of ``cfg.nets`` over ``cfg.seeds``.

    Args:
        syn: the synthetic set (all experts).
        test_images: uint8 real test images (N, ch, H, W); labels int64.
        cfg: the evaluation protocol.
        fusion: how experts are fused while training.
        device: where to train.
        on_result: called (net, seed, accuracy) after each trained network.
        on_epoch: called (net, seed, epoch) after each epoch (progress).

    Returns:
        Per network name, the accuracies (fractions) in seed order.
    """
    data = pool_experts(syn, cfg.lr, device)
    test_x = prepare_test_images(syn, test_images, device)
    test_y = test_labels.to(device)
    num_classes = len(syn.meta.classes)
    results: dict[str, NetResult] = {}
    for name in cfg.nets:
        res = results[name] = NetResult(name)
        t0 = time.perf_counter()
        for seed in cfg.seeds:
            cb = (lambda e, _n=name, _s=seed: on_epoch(_n, _s, e)) if on_epoch else None
            net = train_network(name, data, cfg, fusion, seed, num_classes, cb)
            acc = test_accuracy(net, test_x, test_y, cfg.test_batch_size)
            res.accs.append(acc)
            if on_result:
                on_result(name, seed, acc)
        res.seconds = time.perf_counter() - t0
    return results


def fusion_effective(syn: SyntheticSet, fusion: FusionConfig) -> str:
    """The fusion actually applied: mixup needs at least two experts."""
    return fusion.kind if (fusion.kind == "none" or syn.noe > 1) else "none"
