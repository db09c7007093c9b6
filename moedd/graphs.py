"""CUDA-graph capture for the experts' graph runners (``moedd.experts.mtt_graph``,
``moedd.experts.idc_graph``): warm-up, generator registration, capture, and a check that this
PyTorch replays random draws the way the runners rely on.

The runners draw their randomness inside the graph from their own ``torch.Generator`` objects,
registered with the graph, and re-seed them between replays (per iteration); each replay must
then draw what eager code would draw from that seed and offset, and successive replays must
advance the offset. :func:`check_rng_replay` verifies exactly that once per device, so a
PyTorch that behaves otherwise turns the graphs off (with a warning, by the runners' fallback)
instead of silently repeating one augmentation at every iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

WARMUP_RUNS = 2
"""Eager runs of a body on a side stream before its capture (PyTorch's rule: lazy
initialisation, cuDNN's autotuning and autograd's and the optimisers' state must not first
happen while capturing)."""

_RNG_CHECKED: set[int] = set()


def capture(body: Callable[[], T], generators: Sequence[torch.Generator], device: torch.device,
            before_capture: Callable[[], None] | None = None,
            warmup: int = WARMUP_RUNS) -> tuple[torch.cuda.CUDAGraph, T]:
    """Captures ``body`` in a CUDA graph; returns the graph and the body's (static) outputs.

    Args:
        body: the work to capture; it must not read device values back nor depend on them for
            shapes, and may use only ``generators`` for randomness.
        generators: device generators the body draws from; registered with the graph, so each
            replay reads their current seed and offset and advances them.
        device: the CUDA device.
        before_capture: called after the warm-up runs (e.g. to undo their effects, re-seed).
        warmup: eager runs on a side stream first.

    Raises:
        ValueError: not a CUDA device.
        RuntimeError: this PyTorch cannot replay registered generators as needed, or the capture
            failed (an op that syncs, out of memory, ...).
    """
    if device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
    check_rng_replay(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


def check_rng_replay(device: torch.device) -> None:
    """Replays of a graph drawing from a registered generator give eager's draws for the seed
    set before each replay, and successive replays advance the offset (once per device).

    Raises:
        RuntimeError: with what differs (the runners then run eagerly).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _RNG_CHECKED:
        return
    dev = torch.device("cuda", index)
    gen = torch.Generator(device=dev)
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise RuntimeError(f"torch {torch.__version__} cannot register generators with a CUDA graph")
    out = torch.zeros(8, device=dev)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    gen.manual_seed(1)
    with torch.cuda.graph(graph):
        out.copy_(torch.rand(8, device=dev, generator=gen))

    def replayed(seed: int | None) -> torch.Tensor:
        if seed is not None:
            gen.manual_seed(seed)
        graph.replay()
        return out.clone()

    def eager(seed: int, n: int) -> list[torch.Tensor]:
        g = torch.Generator(device=dev).manual_seed(seed)
        return [torch.rand(8, device=dev, generator=g) for _ in range(n)]

    got = [replayed(7), replayed(None), replayed(8)]
    want = [*eager(7, 2), *eager(8, 1)]
    what = ("first replay after seeding", "second replay (offset advanced)", "replay after re-seeding")
    bad = [w for w, a, b in zip(what, got, want, strict=True) if not torch.equal(a, b)]
    if bad:
        raise RuntimeError(f"CUDA graph replays of a registered generator differ from eager draws ({', '.join(bad)}) "
                           f"in torch {torch.__version__}")
    _RNG_CHECKED.add(index)
