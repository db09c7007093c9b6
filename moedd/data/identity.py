"""Which data a prepared store holds, as run names, tags and the paper table know it.

The paper's tables cover CIFAR-10 and CIFAR-100; their keys here are ``c10`` and ``c100``, and
their names in run names, tags and metric keys ``cifar10`` and ``cifar100`` (as ``data.source``
names them), whatever folder or source the images came from. Other data goes by its own name.
"""

from __future__ import annotations

import re

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

PAPER_NAMES = {"c10": "cifar10", "c100": "cifar100"}
"""The paper datasets' keys to the names params.yaml's ``data.source`` gives them."""


def dataset_key(name: str, classes: list[str]) -> str | None:
    """'c10' / 'c100' when the data is CIFAR-10 / CIFAR-100 (by class names), else None."""
    if list(classes) == CIFAR10_CLASSES:
        return "c10"
    if len(classes) == 100 and "100" in name:
        return "c100"
    return None


def dataset_label(name: str, paper_key: str | None) -> str:
    """What run names, tags and metric keys call the data: ``cifar10`` / ``cifar100`` for the paper's
    datasets (``paper_key`` from :func:`dataset_key`), else the prepared dataset's own name, with
    characters MLflow keys cannot hold (and '/', its level separator here) replaced by '_'."""
    if paper_key in PAPER_NAMES:
        return PAPER_NAMES[paper_key]
    return re.sub(r"[^\w\-. ]", "_", name).strip() or "custom"
