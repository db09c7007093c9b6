"""moedd._graphs: the CUDA-graph capture shared by the IDC and MTT graph runners (CUDA tests run
where a GPU is present, e.g. in benchmarks/gpu_session.sh phase graphtests)."""

from __future__ import annotations

import pytest
import torch

from moedd._graphs import capture, check_rng_replay

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_capture_refuses_a_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        capture(lambda: None, [], torch.device("cpu"))


@CUDA
def test_cuda_graph_rng_contract_holds() -> None:
    """This PyTorch replays a registered generator from the seed set before each replay and
    advances its offset between replays (what the runners' per-iteration seeding relies on)."""
    check_rng_replay(torch.device("cuda"))


@CUDA
def test_cuda_graph_capture_replays_state_and_draws() -> None:
    """A captured body that updates a tensor in place and draws from a registered generator:
    each replay equals the eager body from the same state and seed; warm-up effects are undone
    by ``before_capture``."""
    dev = torch.device("cuda")
    w = torch.ones(16, device=dev)
    gen = torch.Generator(device=dev)

    def body() -> torch.Tensor:
        noise = torch.rand(16, device=dev, generator=gen)
        w.mul_(0.5).add_(noise)
        return w.sum()

    graph, total = capture(body, [gen], dev, before_capture=lambda: w.fill_(1.0))
    assert torch.equal(w, torch.ones(16, device=dev))  # capturing ran nothing
    ref_w, ref_gen = torch.ones(16, device=dev), torch.Generator(device=dev)
    for seed in (3, 4):
        gen.manual_seed(seed)
        ref_gen.manual_seed(seed)
        for _ in range(2):
            graph.replay()
            ref_w.mul_(0.5).add_(torch.rand(16, device=dev, generator=ref_gen))
            assert torch.equal(w, ref_w) and torch.equal(total, ref_w.sum())
