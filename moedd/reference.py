"""The full-data reference: a network trained on the whole real training set.

Every accuracy of the table sits between two reference points of the same protocol: a random real
subset of the same IPC (the ``random`` expert, an ordinary cell) and the full real training set
(this module). The report's normalised gain, (acc − random) / (full − random), is moedd's own
measure (``moedd.report``), not a published one: 0 means no better than real images picked at
random, 1 means as good as training on everything.

Protocol: ``evaluate``'s (SGD, momentum, weight decay, batch, per-sample DSA, learning rate x 0.1
at half of the epochs, accuracy after the last epoch on the whole test set) with the epochs and
seeds of ``full_data``, no fusion (one "expert": the data itself). Resumable like an evaluation:
every finished (network, seed) unit is recorded and the unit in training is checkpointed every
``full_data.checkpoint_every`` epochs, in a directory named by a fingerprint of the data, the
network and the protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moedd.config import EvaluateConfig, FullDataConfig, FusionConfig
from moedd.data import Prepared
from moedd.evaluate import (
    SPEED_ONLY, CurveFn, EpochFn, EvaluationCheckpoints, NetResult, ResultFn, ResumeFn, TrainingSet,
    evaluate_training_set, normalize_test, tensor_digest,
)

NO_FUSION = FusionConfig(kind="none")


def protocol(evaluate: EvaluateConfig, full: FullDataConfig, net: str) -> EvaluateConfig:
    """The evaluation protocol with the reference's network, epochs, seeds and checkpoint interval."""
    return evaluate.model_copy(update={"nets": [net], "epochs": full.epochs, "seeds": full.seeds,
                                       "checkpoint_every": full.checkpoint_every})


def full_training_set(prep: Prepared, lr: float, device: torch.device) -> TrainingSet:
    """The whole real training set, normalised, on the device (float32: 600 MiB for CIFAR)."""
    images = normalize_test(prep.train_images, tuple(prep.mean), tuple(prep.std), device)
    labels = prep.train_labels.to(device)
    return TrainingSet(images, labels, torch.zeros_like(labels), lr)


def checkpoints_for(root: Path, prep: Prepared, cfg: EvaluateConfig) -> EvaluationCheckpoints:
    """Where the reference of ``prep`` under ``cfg`` (one network) keeps its units."""
    contents: dict[str, Any] = {
        "reference": "full training set",
        "data_digest": prep.digest,
        "evaluate": cfg.model_dump(mode="json", exclude=set(SPEED_ONLY)),
        "test_data": tensor_digest(prep.test_images, prep.test_labels),
    }
    return EvaluationCheckpoints(root, f"full-{cfg.nets[0]}", contents)


def train_full_data(
    prep: Prepared, cfg: EvaluateConfig, device: torch.device, checkpoints: EvaluationCheckpoints | None = None,
    on_result: ResultFn | None = None, on_epoch: EpochFn | None = None, on_resume: ResumeFn | None = None,
    on_curve: CurveFn | None = None,
) -> NetResult:
    """Train ``cfg.nets[0]`` on the full training set of ``prep`` over ``cfg.seeds``; test on its
    test set. Callbacks and checkpoints as :func:`moedd.evaluate.evaluate_synthetic`."""
    data = full_training_set(prep, cfg.lr, device)
    test_x = normalize_test(prep.test_images, tuple(prep.mean), tuple(prep.std), device)
    results = evaluate_training_set(data, test_x, prep.test_labels.to(device), prep.num_classes, cfg, NO_FUSION,
                                    on_result, on_epoch, checkpoints, on_resume, on_curve)
    return results[cfg.nets[0]]
