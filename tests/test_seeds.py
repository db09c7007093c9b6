"""Seeds trained together (``evaluate.seeds_together``, moedd/seeds.py): each seed's parameters
after k steps equal its sequential run's, its checkpoints resume like a sequential unit's, and the
evaluation uses the mode for ConvNets only. Real ConvNet-3 training on the tiny data of conftest.

Tolerance of the parameter comparison, derived: the stacked and the sequential runs do the same
arithmetic except the order in which the convolutions sum (one grouped kernel vs one per seed).
Run in float64 (u = 2^-53), a sum of m terms computed in two orders differs by at most
γ_m·Σ|terms| with γ_m = m·u / (1 − m·u) (Higham, Accuracy and Stability, §4.2); the longest sums
are the weight gradients' over batch x H x W = 32 x 32 x 32 = 32,768 positions, so γ_m < 3.7e-12.
Each of the k SGD steps moves a parameter by lr·g and so adds at most lr·γ_m·Σ|terms| ≤ γ_m·|p|max
for these magnitudes (|lr·g| < 1, |p| ≤ 1.1 here); differences already present propagate with a
factor (1 + lr·L) per step, which is ≤ 2 over these few steps at lr 0.01. Bound: 2·k·γ_m·max|p|,
about 1e-10 for k = 6 (the float64 runs differ by ~1e-16; float32 runs differ by ~1e-5 and grow
where a ReLU input crosses 0, so float32 is not what is compared).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from moedd.evaluate import EvaluationCheckpoints, TrainingSet, evaluate_training_set, train_network
from moedd.seeds import can_stack, train_seeds_together

U64 = 2.0 ** -53


def _data(prep, dtype=torch.float64, soft: bool = False) -> TrainingSet:
    x = ((prep.train_images.to(dtype) / 255) - 0.5) / 0.25
    y = prep.train_labels
    targets = torch.softmax(torch.randn(len(y), 3, generator=torch.Generator().manual_seed(0), dtype=dtype), 1) if soft else None
    return TrainingSet(x, y, torch.arange(len(x)) % 2, 0.01, targets)


@pytest.mark.parametrize("soft", [False, True])
def test_each_seed_ends_with_its_sequential_parameters(tiny_prepared, soft: bool) -> None:
    p = tiny_params()
    cfg = p.evaluate.model_copy(update={"epochs": 2, "batch_size": 32})
    data = _data(tiny_prepared, soft=soft)
    steps = cfg.epochs * -(-len(data.labels) // cfg.batch_size)
    m = cfg.batch_size * 32 * 32
    gamma = m * U64 / (1 - m * U64)
    seeds = [0, 3, 5]
    together = train_seeds_together("convnet3", data, cfg, p.fusion, seeds, 3)
    for seed, net in zip(seeds, together, strict=True):
        alone = train_network("convnet3", data, cfg, p.fusion, seed, 3)
        pmax = max(x.abs().max().item() for x in alone.parameters())
        bound = 2 * steps * gamma * max(pmax, 1.0)
        for a, b in zip(alone.parameters(), net.parameters(), strict=True):
            assert (a - b).abs().max().item() <= bound
    # seeds really differ (own init, own batches): the stack did not train one network three times
    assert not torch.equal(next(together[0].parameters()), next(together[1].parameters()))


def test_a_group_checkpoint_resumes_like_the_uninterrupted_group(tiny_prepared) -> None:
    p = tiny_params()
    cfg = p.evaluate.model_copy(update={"epochs": 4, "batch_size": 32, "checkpoint_every": 2})
    data = _data(tiny_prepared)
    states: dict[int, dict] = {}
    whole = train_seeds_together("convnet3", data, cfg, p.fusion, [0, 1], 3,
                                 checkpoint=lambda s, st: states.__setitem__(s, copy.deepcopy(st)))  # as written to disk
    assert sorted(states) == [0, 1] and {st["epoch"] for st in states.values()} == {2}
    resumed = train_seeds_together("convnet3", data, cfg, p.fusion, [0, 1], 3, resume=[states[0], states[1]])
    for a, b in zip(whole, resumed, strict=True):
        for x, y in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(x, y)
    # a unit checkpoint written by the group resumes as a sequential unit too (same format), to the
    # bound of the module docstring over the steps after the checkpoint
    alone = train_network("convnet3", data, cfg, p.fusion, 1, 3, resume=states[1])
    steps, m = 2 * -(-len(data.labels) // cfg.batch_size), cfg.batch_size * 32 * 32
    bound = 2 * steps * (m * U64 / (1 - m * U64)) * max(1.0, max(x.abs().max().item() for x in alone.parameters()))
    assert all((x - y).abs().max().item() <= bound for x, y in zip(alone.parameters(), whole[1].parameters()))


def test_evaluation_groups_convnets_and_keeps_units(tiny_prepared, tmp_path: Path) -> None:
    assert can_stack("convnet3", 3, 3, 32) and not can_stack("vgg11", 3, 3, 32)
    p = tiny_params()
    cfg = p.evaluate.model_copy(update={"epochs": 2, "seeds": [0, 1, 2], "seeds_together": 2,
                                        "nets": ["convnet3", "alexnet"]})
    data = _data(tiny_prepared, torch.float32)
    test_x = ((tiny_prepared.test_images.float() / 255) - 0.5) / 0.25
    store = EvaluationCheckpoints(tmp_path / "ck", "cell", {"any": "contents"})
    seen: list[tuple[str, int]] = []
    out = evaluate_training_set(data, test_x, tiny_prepared.test_labels, 3, cfg, p.fusion, checkpoints=store,
                                on_result=lambda n, s, a: seen.append((n, s)))
    assert seen == [("convnet3", 0), ("convnet3", 1), ("convnet3", 2), ("alexnet", 0), ("alexnet", 1), ("alexnet", 2)]
    assert all(store.finished(n, s) is not None for n, s in seen)  # every unit recorded as its own
    again = evaluate_training_set(data, test_x, tiny_prepared.test_labels, 3, cfg, p.fusion, checkpoints=store)
    assert again["convnet3"].accs == out["convnet3"].accs  # restored, not retrained
