"""CUDA-graph capture for the experts' graph runners (``moedd.experts._mtt_graph``,
``moedd.experts._idc_graph``): warm-up, generator registration, capture, and a check that this
PyTorch replays random draws the way the runners rely on.

The runners draw their randomness inside the graph from their own ``torch.Generator`` objects,
registered with the graph, and re-seed them between replays (per iteration); each replay must
then draw what eager code would draw from that seed and offset, and successive replays must
advance the offset. :func:`check_rng_replay` verifies exactly that once per device, so a
PyTorch that behaves otherwise turns the graphs off (with a warning, by the runners' fallback)
instead of silently repeating one augmentation at every iteration.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

WARMUP_RUNS = 2
"""Eager runs of a body on a side stream before its capture (PyTorch's rule: lazy
initialisation, cuDNN's autotuning and autograd's and the optimisers' state must not first
happen while capturing)."""

_RNG_CHECKED: set[int] = set()


class GraphRunner:
    """Base of the experts' graph runners: the images they work on, whether they capture, the graph.

    Args:
        syn: the expert's images, a leaf updated in place (the graph reads it by address).
        capture: capture a CUDA graph and replay it; False runs the body eagerly (any device).
    """

    def __init__(self, syn: torch.Tensor, capture: bool) -> None:
        if capture and syn.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, the images are on {syn.device}")
        self.syn, self.capture = syn, capture
        self.graph: torch.cuda.CUDAGraph | None = None


R = TypeVar("R", bound=GraphRunner)


class RunnerSlot(Generic[R]):
    """An expert's graph runner: built on first use where ``cuda_graph`` applies (a CUDA device),
    rebuilt for other images, and off for good after a failed capture (warned once).

    Args:
        enabled: the expert's ``cuda_graph`` setting.
        build: makes a capturing runner for the given images.
        name: the method, for the warning.
    """

    def __init__(self, enabled: bool, build: Callable[[torch.Tensor], R], name: str) -> None:
        self.enabled, self.build, self.name = enabled, build, name
        self.runner: R | None = None
        self.failed = False

    def get(self, syn: torch.Tensor) -> R | None:
        """The runner for ``syn``, or None when graphs do not apply (off, not CUDA, failed)."""
        if not self.enabled or syn.device.type != "cuda" or self.failed:
            return None
        if self.runner is None or self.runner.syn is not syn:
            self.runner = self.build(syn)
        return self.runner

    def fail(self, err: BaseException) -> None:
        """Turns graphs off for this run after a failed capture, with a warning that says why."""
        self.failed, self.runner = True, None
        warnings.warn(f"{self.name}: CUDA graph capture failed ({str(err).splitlines()[0]}); running eagerly",
                      RuntimeWarning, stacklevel=3)

    @property
    def replaying(self) -> bool:
        """True when the current runner has a captured graph (the ``cuda_graph`` metric)."""
        return self.runner is not None and self.runner.graph is not None


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
