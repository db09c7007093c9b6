"""Which dataset a prepared store holds (moedd.data.identity): recorded at prepare, and what presets,
the report and metric keys go by, whatever the source the images came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moedd.data import load_prepared, load_source, make_partition, save_prepared
from moedd.data.identity import CIFAR10_CLASSES, CIFAR100_CLASSES, dataset_label, paper_dataset
from moedd.distill import plan_run
from moedd.params import load_params
from tinydata import make_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def c100_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline "CIFAR-100" image folder: the 100 fine-label folders, 10 train / 1 test image each."""
    return make_image_folder(tmp_path_factory.mktemp("c100") / "my images", 10, 1, classes=CIFAR100_CLASSES)


def test_paper_datasets_by_class_names_and_shape() -> None:
    assert paper_dataset(CIFAR10_CLASSES, (3, 32, 32)) == "cifar10"
    assert paper_dataset(CIFAR100_CLASSES, [3, 32, 32]) == "cifar100"
    assert len(set(CIFAR100_CLASSES)) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)  # label order
    assert paper_dataset(CIFAR10_CLASSES, (3, 64, 64)) is None  # resized: not the data the rows were tuned on
    assert paper_dataset(CIFAR10_CLASSES, (1, 32, 32)) is None
    assert paper_dataset(CIFAR10_CLASSES[::-1], (3, 32, 32)) is None  # other label order
    assert paper_dataset(CIFAR100_CLASSES[:99], (3, 32, 32)) is None
    assert dataset_label("my images", "cifar100") == "cifar100" and dataset_label("my images", None) == "my images"


def test_an_offline_cifar100_folder_gets_the_cifar100_preset_rows(c100_folder: Path, tmp_path: Path) -> None:
    """`preset: auto` on an image folder of CIFAR-100 (data.source imagefolder): the prepared store
    records cifar100, and every method's plan takes the CIFAR-100 row of its IPC (IDC n_data 500,
    IDM ce_weight 0.1 and model_train_steps 50, MTT without ZCA), not CIFAR-10's."""
    out = tmp_path / "prepared"
    save_prepared(load_source("imagefolder", c100_folder), out)
    assert json.loads((out / "meta.json").read_text())["paper_dataset"] == "cifar100"
    prep = load_prepared(out)
    assert prep.paper == "cifar100"
    params = load_params(REPO / "params.yaml", {"data.source": "imagefolder", "data.root": str(c100_folder),
                                                "distill.budget": 10})
    part = make_partition(prep.train_labels, prep.num_classes, 1, 0, prep.digest)
    plans = {m: plan_run(m, params, prep, part) for m in ("idc", "idm")}
    assert plans["idc"].preset_label == plans["idm"].preset_label == "cifar100/ipc10"
    assert plans["idc"].config.n_data == 500
    assert (plans["idm"].config.ce_weight, plans["idm"].config.model_train_steps) == (0.1, 50)
    from moedd.trajectories import mtt_config

    assert mtt_config(params, 10, prep.paper).zca is False


def test_other_folders_get_no_paper_rows_and_older_stores_are_read(tiny_prepared, tmp_path: Path) -> None:
    assert tiny_prepared.paper is None  # 3 classes: not a paper dataset, so the class defaults
    params = load_params(REPO / "params.yaml", {"data.source": "cifar100", "distill.budget": 2})
    part = make_partition(tiny_prepared.train_labels, tiny_prepared.num_classes, 1, 0, tiny_prepared.digest)
    assert plan_run("idc", params, tiny_prepared, part).preset is None  # data.source does not decide
    # a store written before paper_dataset was recorded: the same rule on its classes and shape
    out = tmp_path / "old"
    save_prepared(load_source("imagefolder", make_image_folder(tmp_path / "c10", 1, 1, classes=CIFAR10_CLASSES)), out)
    meta = json.loads((out / "meta.json").read_text())
    del meta["paper_dataset"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert load_prepared(out).paper == "cifar10"
