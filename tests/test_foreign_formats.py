"""Distilled sets in the reference repositories' formats, built here from their documented layouts
at tiny size (8x8 images of CIFAR-10's ten classes): DatasetCondensation/DM ``res_*.pt``,
mtt-distillation ``images_best.pt``/``labels_best.pt``, DATM's files with learned soft labels and
learned lr, IDC's ``data.pt``. Each is imported with full metadata, evaluated under the one
protocol, exported and imported back to equal images; an imported set is fused with a distilled one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_params
from moedd.cli.main import app
from moedd.data import load_prepared, load_source, make_partition, save_prepared
from moedd.data.identity import CIFAR10_CLASSES
from moedd.data.zca import fit_zca
from moedd.distill import run_distillation
from moedd.evaluate import evaluate_synthetic, pool_experts, train_network
from moedd.formats import FORMATS, ImportOptions
from moedd.formats.base import DC_CONSTANTS
from moedd.synthetic import SyntheticSetError, combine, load_synthetic, save_synthetic
from tinydata import make_image_folder

CPU = torch.device("cpu")
runner = CliRunner()
IPC = 2


@pytest.fixture(scope="module")
def cifar8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared store with CIFAR-10's classes in its label order, 8x8 images (so a ZCA refit is
    a 192 x 192 eigenproblem): it is not 'CIFAR-10' by shape, so imports name the constants'
    dataset with --dataset cifar10."""
    folder = make_image_folder(tmp_path_factory.mktemp("c8") / "folder", train_per_class=6, test_per_class=2,
                               size=8, classes=CIFAR10_CLASSES)
    out = tmp_path_factory.mktemp("c8p") / "prepared"
    save_prepared(load_source("imagefolder", folder), out)
    return out


def _images(seed: int, n: int = 10 * IPC) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _labels() -> torch.Tensor:
    return torch.arange(10).repeat_interleave(IPC)  # class-major, as every reference repository writes them


def _import(src: Path, prepared: Path, out: Path, fmt: str, *extra: str) -> None:
    res = runner.invoke(app, ["import", str(src), "--prepared", str(prepared), "--out", str(out), "--format", fmt,
                              "--dataset", "cifar10", *extra])
    assert res.exit_code == 0, res.output


def _evaluate(syn, prepared_dir: Path) -> float:
    prep = load_prepared(prepared_dir)
    cfg = tiny_params().evaluate.model_copy(update={"epochs": 2, "seeds": [0], "test_batch_size": 16})
    return evaluate_synthetic(syn, prep.test_images, prep.test_labels, cfg, tiny_params().fusion, CPU)["convnet3"].mean


def test_dc_result_file_in_evaluated_out_and_back(cifar8: Path, tmp_path: Path) -> None:
    src = tmp_path / "dc"
    src.mkdir()
    first, last = _images(1), _images(2)
    torch.save({"data": [[first, _labels()], [last, _labels()]], "accs_all_exps": {"ConvNet": [0.5, 0.6]}},
               src / "res_DM_CIFAR10_ConvNet_2ipc.pt")
    _import(src, cifar8, tmp_path / "set", "dc")
    syn = load_synthetic(tmp_path / "set")
    m = syn.meta
    assert (m.method, m.space, m.decoding, m.ipc, m.noe, m.data_digest) == ("dm", "normalized", "none", IPC, 1, "")
    assert (tuple(m.mean), tuple(m.std)) == DC_CONSTANTS["cifar10"] and m.source.startswith("dc:")
    assert m.config["experiment"] == -1 and m.config["experiments_in_file"] == 2
    assert torch.equal(syn.images[0], last) and torch.equal(syn.labels[0], _labels())  # the last experiment, as is
    assert 0 <= _evaluate(syn, cifar8) <= 1
    res = runner.invoke(app, ["export", str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--format", "dc"])
    assert res.exit_code == 0, res.output
    (file,) = (tmp_path / "out").glob("res_*.pt")
    blob = torch.load(file, weights_only=True)
    assert torch.equal(blob["data"][0][0], last)  # same constants, no decoding: bit for bit
    _import(tmp_path / "out", cifar8, tmp_path / "back", "dc")
    assert torch.equal(load_synthetic(tmp_path / "back").images[0], last)
    _import(src, cifar8, tmp_path / "first", "dc", "--experiment", "0")
    assert torch.equal(load_synthetic(tmp_path / "first").images[0], first)


def test_labels_map_to_the_prepared_classes_by_name(cifar8: Path, tmp_path: Path) -> None:
    prep = load_prepared(cifar8)
    flipped = dataclasses.replace(prep, classes=list(reversed(prep.classes)))
    src = tmp_path / "res_DM_CIFAR10_ConvNet_2ipc.pt"
    torch.save({"data": [[_images(3), _labels()]], "accs_all_exps": {}}, src)
    got = FORMATS.get("dc")().read(src, flipped, ImportOptions(dataset="cifar10"))
    # CIFAR-10's label 0 (airplane) is the flipped store's class 9; class-major again after mapping
    assert torch.equal(got.labels[0], _labels())
    assert torch.equal(got.images[0][:IPC], _images(3)[-IPC:])


def test_mtt_run_directory_in_zca_space_with_the_refit_transform(cifar8: Path, tmp_path: Path) -> None:
    src = tmp_path / "mtt"
    src.mkdir()
    zimg = _images(4)
    torch.save(zimg, src / "images_best.pt")
    torch.save(_labels(), src / "labels_best.pt")
    _import(src, cifar8, tmp_path / "set", "mtt", "--lr", "0.01")
    syn = load_synthetic(tmp_path / "set")
    prep = load_prepared(cifar8)
    assert (syn.meta.space, syn.meta.learned_lr, syn.meta.method) == ("zca", 0.01, "mtt")
    # MTT fits kornia's ZCA (eps 0.1) on [0, 1] training pixels: refit on the prepared training set
    assert syn.zca.digest == fit_zca(prep.train_images, eps=0.1, data_digest=prep.digest).digest == syn.meta.zca_digest
    assert torch.equal(syn.images[0], zimg)
    assert pool_experts(syn, 0.5, CPU).lr == 0.01 and 0 <= _evaluate(syn, cifar8) <= 1
    res = runner.invoke(app, ["export", str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--format", "mtt"])
    assert res.exit_code == 0, res.output
    assert torch.equal(torch.load(tmp_path / "out/images_best.pt", weights_only=True), zimg)
    assert float(torch.load(tmp_path / "out/lr_best.pt", weights_only=True)) == pytest.approx(0.01)
    assert json.loads((tmp_path / "out/moedd-export.json").read_text())["zca"] is True
    _import(tmp_path / "out", cifar8, tmp_path / "back", "mtt")  # the sidecar says ZCA and the lr
    back = load_synthetic(tmp_path / "back")
    assert torch.equal(back.images[0], zimg) and back.meta.learned_lr == pytest.approx(0.01)
    _import(src, cifar8, tmp_path / "plain", "mtt", "--no-zca")
    plain = load_synthetic(tmp_path / "plain").meta
    assert plain.space == "normalized" and (tuple(plain.mean), tuple(plain.std)) == DC_CONSTANTS["cifar10"]


def test_datm_soft_labels_and_learned_lr_train_with_soft_cross_entropy(cifar8: Path, tmp_path: Path) -> None:
    src = tmp_path / "datm"
    src.mkdir()
    logits = torch.randn(10 * IPC, 10, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    torch.save(_images(6), src / "images_best.pt")
    torch.save(logits, src / "labels_best.pt")  # DATM saves its learnable logits as they are
    torch.save(torch.tensor(0.02), src / "lr_best.pt")
    _import(src, cifar8, tmp_path / "set", "datm", "--no-zca")
    syn = load_synthetic(tmp_path / "set")
    assert syn.meta.soft_labels and syn.meta.learned_lr == pytest.approx(0.02)
    torch.testing.assert_close(syn.soft[0], torch.softmax(logits.detach(), 1), rtol=0, atol=0)
    assert torch.equal(syn.labels[0], _labels())
    cfg = tiny_params().evaluate.model_copy(update={"epochs": 2})
    soft = pool_experts(syn, 0.02, CPU)
    hard = dataclasses.replace(soft, soft=None)
    nets = [train_network("convnet3", d, cfg, tiny_params().fusion, 0, 10) for d in (soft, hard)]
    assert not torch.equal(next(nets[0].parameters()), next(nets[1].parameters()))  # the targets matter
    assert 0 <= _evaluate(syn, cifar8) <= 1
    res = runner.invoke(app, ["export", str(tmp_path / "set"), "--out", str(tmp_path / "x"), "--format", "datm"])
    assert res.exit_code == 1 and "does not write it" in res.output


def test_idc_data_file_is_a_multiformation_pixel_set(cifar8: Path, tmp_path: Path) -> None:
    src = tmp_path / "idc"
    src.mkdir()
    pixels = _images(7).sigmoid()
    torch.save([pixels, _labels()], src / "data.pt")
    _import(src, cifar8, tmp_path / "set", "idc")
    syn = load_synthetic(tmp_path / "set")
    assert (syn.meta.space, syn.meta.decoding, syn.meta.method) == ("pixel", "multiformation2", "idc")
    assert len(pool_experts(syn, 0.01, CPU).images) == 4 * 10 * IPC
    assert 0 <= _evaluate(syn, cifar8) <= 1
    res = runner.invoke(app, ["export", str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--format", "dc"])
    assert res.exit_code == 0, res.output
    blob = torch.load(next((tmp_path / "out").glob("res_*.pt")), weights_only=True)
    assert blob["data"][0][0].shape == (4 * 10 * IPC, 3, 8, 8)  # decoded for evaluators that do not decode


def test_an_imported_set_fused_with_a_distilled_one(cifar8: Path, tmp_path: Path) -> None:
    src = tmp_path / "res_DM_CIFAR10_ConvNet_2ipc.pt"
    torch.save({"data": [[_images(8), _labels()]], "accs_all_exps": {}}, src)
    _import(src, cifar8, tmp_path / "imported", "dc")
    prep = load_prepared(cifar8)
    params = tiny_params(**{"distill.budget": IPC})
    r = run_distillation("dm", params, prep, make_partition(prep.train_labels, 10, 1, 0, prep.digest), CPU)
    save_synthetic(tmp_path / "dm", list(r.images), [r.labels], r.metas)
    res = runner.invoke(app, ["combine", str(tmp_path / "imported"), str(tmp_path / "dm"), "--out", str(tmp_path / "mix")])
    assert res.exit_code == 0, res.output
    mix = load_synthetic(tmp_path / "mix")
    assert mix.method == "dm+dm" and mix.noe == 2 and mix.metas[1].data_digest == prep.digest
    data = pool_experts(mix, 0.01, CPU)
    # the common space is the first expert's (DC's constants): the distilled expert is re-normalised into it
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DC_CONSTANTS["cifar10"])
    pm, ps = (torch.tensor(v).view(1, 3, 1, 1) for v in (prep.mean, prep.std))
    torch.testing.assert_close(data.images[10 * IPC:], ((r.images[0] * ps + pm) - mean) / std)
    assert 0 <= _evaluate(mix, cifar8) <= 1


def test_foreign_files_that_do_not_fit_are_one_line(cifar8: Path, tmp_path: Path) -> None:
    prep = load_prepared(cifar8)
    read = lambda fmt, p, **kw: FORMATS.get(fmt)().read(p, prep, ImportOptions(dataset="cifar10", **kw))  # noqa: E731
    torch.save({"data": [[_images(1), _labels()]]}, tmp_path / "res_DM.pt")
    with pytest.raises(SyntheticSetError, match="out of range"):
        read("dc", tmp_path / "res_DM.pt", experiment=3)
    torch.save({"data": [[torch.randn(20, 3, 16, 16), _labels()]]}, tmp_path / "big.pt")
    with pytest.raises(SyntheticSetError, match=r"shape \(3, 16, 16\), the prepared data's are \(3, 8, 8\)"):
        read("dc", tmp_path / "big.pt")
    torch.save({"data": [[_images(1), torch.zeros(20, dtype=torch.long)]]}, tmp_path / "one.pt")
    with pytest.raises(SyntheticSetError, match="the same number of images"):
        read("dc", tmp_path / "one.pt")
    torch.save([_images(1), torch.full((20,), 12)], tmp_path / "data.pt")
    with pytest.raises(SyntheticSetError, match="labels up to 12"):
        read("idc", tmp_path / "data.pt")
    with pytest.raises(SyntheticSetError, match="images_best.pt not found"):
        (tmp_path / "empty").mkdir()
        torch.save(_labels(), tmp_path / "empty/labels_best.pt")
        read("mtt", tmp_path / "empty")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(SyntheticSetError, match="not a tensor file"):
        read("idc", tmp_path / "junk.pt")
