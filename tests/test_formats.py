"""Sets in other projects' formats: export a moedd set, import it back, evaluate it."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_params
from moedd.cli.main import app
from moedd.data import make_partition, save_prepared, load_source
from moedd.distill import run_distillation
from moedd.evaluate import evaluate_synthetic
from moedd.synthetic import load_synthetic, save_synthetic, to_pixels

CPU = torch.device("cpu")
runner = CliRunner()


def _set(prepared, tmp_path: Path, **meta_update) -> Path:
    """A tiny two-expert set of the random expert, saved (metadata changed as asked)."""
    params = tiny_params(**{"distill.budget": 4})
    part = make_partition(prepared.train_labels, 3, 2, 0, prepared.digest)
    r = run_distillation("random", params, prepared, part, CPU)
    metas = [m.model_copy(update=meta_update) for m in r.metas]
    out = tmp_path / "set"
    save_synthetic(out, list(r.images), [r.labels] * 2, metas)
    return out


def test_folder_round_trip_keeps_experts_images_and_lr(tiny_folder: Path, tiny_prepared, tmp_path: Path) -> None:
    """export -> import gives each expert's images back as the 8-bit pixels they were written as
    (bitwise: the same rounding, PNG is lossless), in the same order, with the learned lr."""
    src = _set(tiny_prepared, tmp_path, learned_lr=0.03)
    prep_dir = tmp_path / "prepared"
    save_prepared(load_source("imagefolder", tiny_folder), prep_dir)
    res = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "folder")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "folder").iterdir() if p.is_dir()) == tiny_prepared.classes
    assert len(list((tmp_path / "folder").rglob("e1_*.png"))) == 3 * 2  # expert 1: 2 images x 3 classes
    res = runner.invoke(app, ["import", str(tmp_path / "folder"), "--prepared", str(prep_dir), "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    orig, back = load_synthetic(src), load_synthetic(tmp_path / "back")
    assert back.noe == 2 and back.meta.method == "random" and back.meta.learned_lr == 0.03
    assert back.meta.config["format"] == "folder" and back.meta.data_digest == ""
    mean, std = torch.tensor(tiny_prepared.mean).view(1, 3, 1, 1), torch.tensor(tiny_prepared.std).view(1, 3, 1, 1)
    for k in range(2):
        u8 = (to_pixels(orig.images[k], orig.metas[k]) * 255).round().to(torch.uint8)
        assert torch.equal(back.images[k], (u8.float() / 255.0 - mean) / std)
        assert torch.equal(back.labels[k], orig.labels[k])
    res = evaluate_synthetic(back, tiny_prepared.test_images, tiny_prepared.test_labels,
                             tiny_params().evaluate.model_copy(update={"epochs": 2, "seeds": [0]}),
                             tiny_params().fusion, CPU)
    assert 0.0 <= res["convnet3"].mean <= 1.0  # an imported set is evaluated like any other


def test_export_decodes_multiformation_sets(tiny_prepared, tmp_path: Path) -> None:
    """An IDC/IDM-style set (2x2 multi-formation, pixel space) exports four images per stored one."""
    src = _set(tiny_prepared, tmp_path, decoding="multiformation2")
    syn = load_synthetic(src)
    pix = [to_pixels(x, m) for x, m in zip(syn.images, syn.metas)]
    metas = [m.model_copy(update={"space": "pixel"}) for m in syn.metas]
    save_synthetic(tmp_path / "px", pix, syn.labels, metas)
    res = runner.invoke(app, ["export", str(tmp_path / "px"), "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "f").rglob("*.png"))) == 4 * 2 * 2 * 3  # 4 decoded x 2 stored x 2 experts x 3 classes


def test_import_refuses_what_does_not_fit_in_one_line(tiny_folder: Path, tmp_path: Path) -> None:
    prep_dir = tmp_path / "prepared"
    save_prepared(load_source("imagefolder", tiny_folder), prep_dir)
    bad = tmp_path / "bad"
    for cls, n, size in (("zebra", 1, 32),):
        (bad / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (size, size)).save(bad / cls / f"{i}.png")
    res = runner.invoke(app, ["import", str(bad), "--prepared", str(prep_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not classes of the prepared data" in res.output
    small = tmp_path / "small"
    for cls in sorted(p.name for p in (tiny_folder / "train").iterdir()):
        (small / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(small / cls / "0.png")
    res = runner.invoke(app, ["import", str(small), "--prepared", str(prep_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "16x16 images, the prepared data's are 32x32" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--format", "npz"])
    assert res.exit_code == 1 and "npz" in res.output
    assert not (tmp_path / "o").exists()
