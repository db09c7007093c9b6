"""Data: sources, the prepared store and its digest, class-balanced partitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moedd.config import ConfigError
from moedd.data import (
    DataSourceError, check_ipc_fits, load_partition, load_prepared, load_source, make_partition, save_partition,
    save_prepared,
)
from tinydata import TINY_CLASSES, make_image_folder


def test_imagefolder_source_reads_both_splits(tiny_folder: Path) -> None:
    ds = load_source("imagefolder", tiny_folder)
    assert ds.classes == sorted(TINY_CLASSES)
    assert ds.train.images.shape == (72, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (24, 3, 32, 32)
    assert torch.bincount(ds.train.labels).tolist() == [24, 24, 24]


def test_imagefolder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="train/<class>/ and test/<class>/"):
        load_source("imagefolder", tmp_path)


def test_cifar_offline_names_the_imagefolder_alternative(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="data.source=imagefolder"):
        load_source("cifar10", tmp_path / "empty", download=False)


def test_prepared_roundtrip_and_digest(tiny_folder: Path, tmp_path: Path) -> None:
    ds = load_source("imagefolder", tiny_folder)
    a = save_prepared(ds, tmp_path / "a")
    b = load_prepared(tmp_path / "a")
    assert a.digest == b.digest and torch.equal(a.train_images, b.train_images)
    assert b.classes == sorted(TINY_CLASSES) and len(b.mean) == 3 and all(s > 0 for s in b.std)
    other = make_image_folder(tmp_path / "other", seed=1)
    assert save_prepared(load_source("imagefolder", other), tmp_path / "b").digest != a.digest


def test_partition_is_disjoint_covering_balanced_and_seeded(tiny_prepared) -> None:
    y = tiny_prepared.train_labels
    part = make_partition(y, 3, 3, seed=0, data_digest=tiny_prepared.digest)
    allidx = torch.cat(part.shards)
    assert len(allidx) == len(y) and len(torch.unique(allidx)) == len(y)  # disjoint and covering
    for shard in part.shards:
        assert torch.bincount(y[shard], minlength=3).tolist() == [8, 8, 8]  # class-balanced
    same = make_partition(y, 3, 3, seed=0)
    other = make_partition(y, 3, 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(part.shards, same.shards))
    assert any(not torch.equal(a, b) for a, b in zip(part.shards, other.shards))


def test_partition_file_roundtrip(tiny_prepared, tmp_path: Path) -> None:
    part = make_partition(tiny_prepared.train_labels, 3, 2, seed=0, data_digest=tiny_prepared.digest)
    save_partition(part, tmp_path / "p.pt")
    back = load_partition(tmp_path / "p.pt")
    assert back.digest == part.digest and back.noe == 2 and back.data_digest == tiny_prepared.digest


def test_ipc_larger_than_a_shard_class_is_refused(tiny_prepared) -> None:
    part = make_partition(tiny_prepared.train_labels, 3, 2, seed=0)
    check_ipc_fits(part, tiny_prepared.train_labels, 3, 12)
    with pytest.raises(ConfigError, match="IPC 13 is larger than the smallest class of shard 0"):
        check_ipc_fits(part, tiny_prepared.train_labels, 3, 13)
