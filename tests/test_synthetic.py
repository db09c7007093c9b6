"""The synthetic set format: round trip, corruption detection, refusal of mismatched data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moedd.synthetic import SyntheticMeta, SyntheticSetError, check_matches, load_synthetic, save_synthetic, to_pixels


def _meta(k: int, **kw) -> SyntheticMeta:
    base = dict(method="dm", expert=k, noe=2, ipc=2, budget=4, classes=["a", "b"], image_shape=[3, 4, 4],
                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data_digest="d")
    base.update(kw)
    return SyntheticMeta(**base)


def _save(tmp_path: Path) -> Path:
    images = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    labels = [torch.tensor([0, 0, 1, 1])] * 2
    save_synthetic(tmp_path / "set", images, labels, [_meta(0), _meta(1)])
    return tmp_path / "set"


def test_roundtrip(tmp_path: Path) -> None:
    path = _save(tmp_path)
    syn = load_synthetic(path)
    assert syn.noe == 2 and syn.meta.method == "dm" and len(syn.meta.sha256) == 64
    assert syn.images[0].shape == (4, 3, 4, 4) and syn.labels[1].tolist() == [0, 0, 1, 1]


def test_corrupted_file_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path)
    pt = path / "expert-1.pt"
    data = bytearray(pt.read_bytes())
    data[-20] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(SyntheticSetError, match="does not match the sha256"):
        load_synthetic(path)


def test_missing_set_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SyntheticSetError, match="run `moedd distill` first"):
        load_synthetic(tmp_path)


def test_mismatched_classes_space_or_data_are_refused(tmp_path: Path) -> None:
    syn = load_synthetic(_save(tmp_path))
    check_matches(syn, ["a", "b"], (3, 4, 4), "d")
    with pytest.raises(SyntheticSetError, match="classes"):
        check_matches(syn, ["a", "c"], (3, 4, 4))
    with pytest.raises(SyntheticSetError, match="shape"):
        check_matches(syn, ["a", "b"], (3, 8, 8))
    with pytest.raises(SyntheticSetError, match="different data"):
        check_matches(syn, ["a", "b"], (3, 4, 4), "other")


def test_to_pixels_inverts_normalisation() -> None:
    px = torch.rand(2, 3, 4, 4)
    normed = (px - 0.5) / 0.25
    assert torch.allclose(to_pixels(normed, _meta(0)), px, atol=1e-6)
