"""Any image folder: resized and converted at prepare time (data.image_size, data.channels), and a
network that cannot take the images refused before any training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from moedd.cli.main import app
from moedd.data import RawDataset, RawSplit
from moedd.data.transform import reshape_dataset

runner = CliRunner()


def _raw(images: torch.Tensor) -> RawDataset:
    labels = torch.zeros(len(images), dtype=torch.long)
    return RawDataset("x", ["a"], RawSplit(images, labels), RawSplit(images[:2], labels[:2]))


def test_gray_is_pils_luma_and_resizing_keeps_a_flat_image_flat() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    out = reshape_dataset(_raw(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()), None, "gray").train.images
    pil = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in imgs])
    # PIL rounds a fixed-point sum, we round the exact one: they can differ by one level, no more
    assert out.shape == (6, 1, 12, 12) and np.abs(out[:, 0].numpy().astype(int) - pil).max() <= 1
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    small = reshape_dataset(_raw(flat), 8, "keep")
    assert small.train.images.shape == (2, 3, 8, 8) and bool((small.train.images == 77).all())
    assert reshape_dataset(_raw(flat), None, "keep").train.images is flat  # nothing asked: nothing done
    assert reshape_dataset(_raw(flat[:, :1]), None, "rgb").train.images.shape == (2, 3, 32, 32)


def test_small_gray_folder_end_to_end(tiny_folder: Path, tmp_path: Path, mlflow_uri: str, monkeypatch) -> None:
    """8x8 gray through prepare, partition, distill and evaluate: the transform is recorded beside the
    digest; VGG11 is refused in one line before any work, AlexNet gets a note, ConvNet-3 trains."""
    monkeypatch.chdir(tmp_path)
    src = ["-S", "data.source=imagefolder", "-S", f"data.root={tiny_folder}", "-S", "data.download=false"]
    for args in (["prepare", "--out", "p8", *src, "-S", "data.image_size=8", "-S", "data.channels=gray"],
                 ["prepare", "--out", "p32", *src],
                 ["partition", "--noe", "1", "--prepared", "p8", "--out", "n1.pt", "-S", "distill.budget=2"],
                 ["distill", "--expert", "random", "--noe", "1", "--budget", "2", "--prepared", "p8", "--partition", "n1.pt",
                  "--out", "syn"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    meta = json.loads(Path("p8/meta.json").read_text())
    assert meta["shape"] == [1, 8, 8] and meta["transform"] == {"image_size": 8, "channels": "gray"}
    assert meta["digest"] != json.loads(Path("p32/meta.json").read_text())["digest"]
    ev = ["evaluate", "--synthetic", "syn", "--prepared", "p8", "--epochs", "1", "--seeds", "0"]
    bad = runner.invoke(app, [*ev, "--nets", "convnet3,vgg11", "--metrics", "bad.json"])
    assert bad.exit_code == 1 and "vgg11 cannot take 8x8 images" in bad.output and not Path("bad.json").exists()
    assert [ln for ln in bad.output.splitlines() if ln.startswith("error:")] == [
        "error: evaluate.nets: vgg11 cannot take 8x8 images (image_size 8 is too small for VGG)"]
    assert "Traceback" not in bad.output
    ok = runner.invoke(app, [*ev, "--nets", "convnet3,alexnet", "--metrics", "ok.json"])
    assert ok.exit_code == 0, ok.output
    assert "alexnet_bn trains there" in ok.output
    assert set(json.loads(Path("ok.json").read_text())["nets"]) == {"convnet3", "alexnet"}
