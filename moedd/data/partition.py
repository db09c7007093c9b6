"""Class-balanced, seeded, disjoint partitions of the training set into NoE shards.

Expert k only ever sees shard k. Each class's training indices are shuffled with the partition
seed and cut into NoE near-equal consecutive chunks; chunk k of every class forms shard k.
A partition stores indices only (no image copies) plus the digest of the data it indexes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moedd._atomic import save_torch
from moedd.errors import ConfigError


@dataclass(frozen=True)
class Partition:
    """NoE shards of training-set indices."""

    shards: list[Tensor]
    seed: int
    data_digest: str

    @property
    def noe(self) -> int:
        return len(self.shards)

    @property
    def digest(self) -> str:
        """SHA-256 of the shard indices, seed and data digest."""
        h = hashlib.sha256(f"{self.seed}:{self.data_digest}".encode())
        for s in self.shards:
            h.update(s.numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()


def make_partition(labels: Tensor, num_classes: int, noe: int, seed: int, data_digest: str = "") -> Partition:
    """Split indices ``0..len(labels)-1`` into ``noe`` class-balanced disjoint shards."""
    if noe < 1:
        raise ConfigError(f"the number of experts must be >= 1, not {noe}")
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(noe)]
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for k, chunk in enumerate(torch.tensor_split(idx, noe)):
            parts[k].append(chunk)
    shards = [torch.sort(torch.cat(p)).values for p in parts]
    return Partition(shards, seed, data_digest)


def save_partition(part: Partition, path: str | Path) -> None:
    """Write a partition file (a small .pt with indices and provenance)."""
    save_torch({"shards": part.shards, "seed": part.seed, "data_digest": part.data_digest}, path)  # atomic


def load_partition(path: str | Path) -> Partition:
    """Read a partition written by :func:`save_partition`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"partition {path} does not exist; run `moedd partition` first")
    d = torch.load(path, weights_only=True)
    return Partition(list(d["shards"]), int(d["seed"]), str(d["data_digest"]))


def check_ipc_fits(part: Partition, labels: Tensor, num_classes: int, ipc: int) -> None:
    """Raise ConfigError unless every shard holds at least ``ipc`` images of every class."""
    for k, shard in enumerate(part.shards):
        counts = torch.bincount(labels[shard], minlength=num_classes)
        smallest = int(counts.min())
        if ipc > smallest:
            raise ConfigError(
                f"IPC {ipc} is larger than the smallest class of shard {k} ({smallest} images); "
                "lower the budget or the number of experts"
            )
