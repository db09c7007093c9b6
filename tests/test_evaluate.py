"""Evaluation: fusion, protocol, accuracy on real test data."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_params
from moedd.data import make_partition
from moedd.distill import run_distillation
from moedd.evaluate import evaluate_synthetic, fusion_effective
from moedd.synthetic import DECODERS
from moedd.evaluate import test_accuracy as accuracy_of  # alias: keep pytest from collecting it
from moedd.registry import UnknownNameError
from moedd.synthetic import SyntheticSet

CPU = torch.device("cpu")


def _syn(prepared, noe: int, expert: str = "random") -> SyntheticSet:
    params = tiny_params(**{"distill.budget": 4})
    part = make_partition(prepared.train_labels, 3, noe, 0, prepared.digest)
    r = run_distillation(expert, params, prepared, part, CPU)
    return SyntheticSet(list(r.images), [r.labels] * noe, r.metas)


def test_training_on_real_images_beats_chance(tiny_prepared) -> None:
    syn = _syn(tiny_prepared, noe=2)
    params = tiny_params(**{"evaluate.epochs": 30, "evaluate.seeds": [0, 1], "evaluate.nets": ["convnet3", "alexnet"]})
    seen = []
    res = evaluate_synthetic(syn, tiny_prepared.test_images, tiny_prepared.test_labels, params.evaluate, params.fusion,
                             CPU, on_result=lambda n, s, a: seen.append((n, s)))
    assert seen == [("convnet3", 0), ("convnet3", 1), ("alexnet", 0), ("alexnet", 1)]
    assert res["convnet3"].mean > 0.6  # 3 easy classes: chance is 0.33
    assert all(0.0 <= a <= 1.0 for r in res.values() for a in r.accs)
    assert res["convnet3"].std >= 0.0


def test_same_seed_same_accuracy(tiny_prepared) -> None:
    syn = _syn(tiny_prepared, noe=2)
    params = tiny_params(**{"evaluate.epochs": 3, "evaluate.seeds": [3]})
    a = evaluate_synthetic(syn, tiny_prepared.test_images, tiny_prepared.test_labels, params.evaluate, params.fusion, CPU)
    b = evaluate_synthetic(syn, tiny_prepared.test_images, tiny_prepared.test_labels, params.evaluate, params.fusion, CPU)
    assert a["convnet3"].accs == b["convnet3"].accs


def test_fusion_needs_two_experts(tiny_prepared) -> None:
    params = tiny_params()
    assert fusion_effective(_syn(tiny_prepared, noe=1), params.fusion) == "none"
    assert fusion_effective(_syn(tiny_prepared, noe=2), params.fusion) == "mixup"


def test_test_accuracy_counts_correct_predictions() -> None:
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.tensor([0, 1, 2, 1]).float().view(4, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 0])
    assert accuracy_of(Oracle(), x, y, batch_size=3) == 0.75


def test_unknown_decoding_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="unknown decoding"):
        DECODERS.get("quadrants9")


def test_multiformation_decodes_four_upsampled_quadrants() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2, :2], x[..., 2:, :2], x[..., :2, 2:], x[..., 2:, 2:] = 1.0, 2.0, 3.0, 4.0
    dx, dy = DECODERS.get("multiformation2")(x, torch.tensor([7]))
    assert dx.shape == (4, 1, 4, 4) and dy.tolist() == [7, 7, 7, 7]
    assert [float(v) for v in dx.mean((1, 2, 3))] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_test_pass_runs_in_the_precision_asked_for(tiny_prepared, precision: str, expected) -> None:
    """evaluate.test_precision reaches the test pass: the convolutions compute in bf16 under it and
    in fp32 without (training is fp32 either way). Its accuracy cost is measured on real data by
    benchmarks/bf16_test_pass.py (docs/results.md), not asserted here."""
    from moedd.nets import create_net
    from moedd.precision import test_dtype

    net = create_net("convnet3", 3)
    seen = []
    net.features[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    x = torch.randn(12, 3, 32, 32)
    acc = accuracy_of(net, x, torch.zeros(12, dtype=torch.long), 5, test_dtype(precision, CPU))
    assert 0.0 <= acc <= 1.0 and seen and set(seen) == {expected}
    assert test_dtype("auto", CPU) in (torch.float32, torch.bfloat16)
