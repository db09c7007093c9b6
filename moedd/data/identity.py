"""Which data a prepared store holds: its paper identity, and its name in run names, tags and keys.

The paper's tables cover CIFAR-10 and CIFAR-100. A prepared store records which of them it is
(``paper_dataset`` in its meta.json, :func:`paper_dataset`), whatever the source: torchvision's
download and an offline image folder of the same images are the same dataset, and presets
(``presets.<method>.<dataset>``), the report's paper column and metric keys key on that record,
never on ``data.source``. A store is CIFAR-10 / CIFAR-100 when its class names are exactly that
dataset's, in label order, and its images are 3x32x32: the class names are what an image folder
carries (torchvision's ``classes`` and the offline copies use the same names), and the shape
rules out a resized or grayscale copy, for which the paper's hyper-parameters were not tuned.
Other data goes by its own name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
"""CIFAR-100's 100 fine labels in label order (torchvision's ``CIFAR100.classes``)."""

PAPER_DATASETS = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
"""The paper's datasets, by the names ``data.source`` and ``presets`` give them."""

PAPER_KEYS = {"cifar10": "c10", "cifar100": "c100"}
"""Their keys in ``moedd.paper``'s table and the metrics JSON's ``paper_dataset``."""

PAPER_SHAPE = (3, 32, 32)


def paper_dataset(classes: Sequence[str], shape: Sequence[int]) -> str | None:
    """``cifar10`` / ``cifar100`` when the classes are exactly that dataset's and the images 3x32x32."""
    if tuple(shape) != PAPER_SHAPE:
        return None
    return next((name for name, names in PAPER_DATASETS.items() if list(classes) == names), None)


def dataset_label(name: str, paper: str | None) -> str:
    """What run names, tags and metric keys call the data: the paper dataset's name (``cifar10``,
    ``cifar100``) when it is one, else the prepared dataset's own name, with characters MLflow keys
    cannot hold (and '/', its level separator here) replaced by '_'."""
    if paper in PAPER_DATASETS:
        return paper
    return re.sub(r"[^\w\-. ]", "_", name).strip() or "custom"
