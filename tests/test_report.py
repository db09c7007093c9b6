"""The report's cells as metrics of the pipeline run (what the MLflow runs table compares)."""

from __future__ import annotations

from moedd.report import Cell, run_metrics


def _cell(ipc: int, noe: int, mean: float, net: str = "convnet3", dataset: str | None = "cifar10") -> Cell:
    return Cell("dm", net, 10, ipc, noe, mean, 0.5, 3, "mixup", 300, dataset)


def test_cells_become_accuracy_and_gain_metrics() -> None:
    cells = [_cell(5, 2, 49.0), _cell(10, 1, 47.5), _cell(5, 2, 30.0, "vgg11"), _cell(5, 2, 20.0, dataset=None)]
    m = run_metrics(cells)
    assert m["acc/cifar10/b10/5x2/dm/convnet3"] == 49.0 and m["acc_std/cifar10/b10/10x1/dm/convnet3"] == 0.5
    assert m["gain/cifar10/b10/5x2/dm/convnet3"] == 1.5
    assert "gain/cifar10/b10/5x2/dm/vgg11" not in m  # no single-expert cell to compare with
    assert "gain/cifar10/b10/10x1/dm/convnet3" not in m  # a single expert has no gain over itself
    assert m["acc/custom/b10/5x2/dm/convnet3"] == 20.0
    assert len(m) == 2 * len(cells) + 1
