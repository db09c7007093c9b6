"""The report's cells as metrics of the pipeline run (what the MLflow runs table compares)."""

from __future__ import annotations

from moedd.data.identity import dataset_label
from moedd.report import Cell, run_metrics


def _cell(ipc: int, noe: int, mean: float, net: str = "convnet3", paper: str | None = "c10",
          name: str = "cifar10") -> Cell:
    return Cell("dm", net, 10, ipc, noe, mean, 0.5, 3, "mixup", 300, paper, name)


def test_cells_become_accuracy_and_gain_metrics() -> None:
    cells = [_cell(5, 2, 49.0), _cell(10, 1, 47.5), _cell(5, 2, 30.0, "vgg11"), _cell(5, 2, 20.0, paper=None, name="pets"),
             _cell(5, 2, 25.0, paper="c100", name="my-cifar100 png")]
    m = run_metrics(cells)
    assert m["acc/cifar10/b10/5x2/dm/convnet3"] == 49.0 and m["acc_std/cifar10/b10/10x1/dm/convnet3"] == 0.5
    assert m["gain/cifar10/b10/5x2/dm/convnet3"] == 1.5
    assert "gain/cifar10/b10/5x2/dm/vgg11" not in m  # no single-expert cell to compare with
    assert "gain/cifar10/b10/10x1/dm/convnet3" not in m  # a single expert has no gain over itself
    assert m["acc/pets/b10/5x2/dm/convnet3"] == 20.0  # other data: under its own name, compared with nothing else
    assert m["acc/cifar100/b10/5x2/dm/convnet3"] == 25.0  # a paper dataset: params.yaml's name, whatever the folder
    assert len(m) == 2 * len(cells) + 1


def test_dataset_labels_are_metric_key_safe() -> None:
    assert dataset_label("folder", "cifar10") == "cifar10"
    assert dataset_label("a/b:c?", None) == "a_b_c_"
    assert dataset_label("///", None) == "___"
    assert dataset_label("", None) == "custom"
