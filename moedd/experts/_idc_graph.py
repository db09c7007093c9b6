"""IDC's inner step (matching phase + network update) as ONE CUDA graph, replayed ``inner_loop``
times per outer iteration.

Why: an IDC inner step at the CIFAR-10 IPC 10 size is the grouped matching pass (a forward,
backward and double backward of the C·NoE grouped ConvNets, the closed-form image step) and 32
SGD steps of the network on real batches with DiffAug and CutMix: about 9,000 small ops whose
launches, not their arithmetic, bound a GPU (the H200 took 0.34 s per inner step on both moedd
and the reference). A captured graph launches them with one call.

What changes to make it capturable (each also runs eagerly, on any device):

* the network of an outer iteration is ONE static module whose parameters are overwritten with
  the fresh initialisation of that iteration (:meth:`StaticInnerSteps.begin`), and whose SGD
  momentum buffers are zeroed (torch's first step, ``buf = grad``, is the same as 0·μ + grad);
* the matching augmentation draws once for real and synthetic images (no generator replay) and
  gates each op per unit on the device when a strategy has several groups
  (``DSA.apply_units(static=True)``); the default strategies have one group per stage, so their
  draws are exactly eager mode's;
* CutMix's coin, λ and box come from a device generator (:func:`~moedd.experts.idc.cutmix_static`,
  λ ~ U(0, 1) = Beta(1, 1): ``mix_beta`` must be 1) instead of IDC's host ``np.random``;
* the per-class losses, dCor and correct counts add up in static buffers inside the graph.

The three generators (matching, network, CutMix) are registered with the graph and re-seeded at
each outer iteration from the run's (seed, iteration, stream): the graph's replays draw what the
eager loop would draw in sequence, so with ``mix_p`` 0 graph and eager runs agree (up to
floating-point summation order).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moedd._graphs import GraphRunner, capture


STREAM_MATCH, STREAM_NET, STREAM_MIX = 2, 3, 4
"""The generator streams of an outer iteration, eager or graphed (stream 1 is the network's
initialisation; eager IDC seeds its host CutMix with stream 4)."""


class StaticInnerSteps(GraphRunner):
    """IDC's inner steps of every outer iteration, on static tensors (capturable).

    Args:
        method: the IDC expert method (``moedd.experts.idc.IDC``; not imported: it imports this module).
        syn: the stored images (NoE, C·IPC, ch, H, W), a leaf updated in place.
        capture: capture the body in a CUDA graph at the first :meth:`step` and replay it after;
            False runs the body eagerly (any device).
    """

    def __init__(self, method: Any, syn: Tensor, capture: bool) -> None:
        super().__init__(syn, capture)
        ctx, cfg = method.ctx, method.cfg
        dev = syn.device
        self.method = method
        self.net = method.fresh_net(0)
        self.opt = cfg.net_optimizer(self.net)
        self.bufs = [torch.zeros_like(p) for p in self.net.parameters()]
        for p, b in zip(self.net.parameters(), self.bufs, strict=True):
            self.opt.state[p]["momentum_buffer"] = b
        self.gens = {s: torch.Generator(device=dev) for s in (STREAM_MATCH, STREAM_NET, STREAM_MIX)}
        self.per_class = torch.zeros(ctx.num_classes, ctx.noe, device=dev)
        self.dcor = torch.zeros((), device=dev)
        self.correct = torch.zeros((), dtype=torch.long, device=dev)
        self.seen_per_step = 0  # set by the body (train_net's count)
        self._it = 0

    def begin(self, it: int) -> None:
        """Start outer iteration ``it``: its fresh network, zero momentum and sums, seeded streams."""
        fresh = self.method.fresh_net(it)
        with torch.no_grad():
            for p, q in zip(self.net.parameters(), fresh.parameters(), strict=True):
                p.copy_(q)
            for b in self.bufs:
                b.zero_()
            for t in (self.per_class, self.dcor, self.correct):
                t.zero_()
        self._it = it
        self._seed()

    def _seed(self) -> None:
        for stream, g in self.gens.items():
            g.manual_seed(self.method.ctx.seed_for(self._it, stream))

    def body(self) -> None:
        """One inner step: the matching phase (image step included), then the network update."""
        m = self.method
        pc, dc = m.match_phase(self.net, self.syn, self.gens[STREAM_MATCH], static=True)
        ok, self.seen_per_step = m.train_net(self.net, self.opt, self.gens[STREAM_NET], None,
                                             static_mix=self.gens[STREAM_MIX])
        self.per_class += pc
        self.dcor += dc
        self.correct += ok

    def step(self) -> None:
        """Runs one inner step (replays the graph; captures it first if needed)."""
        if not self.capture:
            self.body()
            return
        if self.graph is None:
            self._capture()
        assert self.graph is not None
        self.graph.replay()

    def _state(self) -> list[Tensor]:
        return [self.syn, self.method.opt.buf, *self.net.parameters(), *self.bufs,
                self.per_class, self.dcor, self.correct]

    def _capture(self) -> None:
        """Warm-up runs (then undone) and the capture (which runs nothing itself), by
        :func:`moedd._graphs.capture`. On failure the state is restored before the error
        propagates, so eager mode can go on."""
        saved = [t.detach().clone() for t in self._state()]
        try:
            self.graph, _ = capture(self.body, list(self.gens.values()), self.syn.device,
                                    before_capture=lambda: self._restore(saved))
        finally:
            self._restore(saved)

    def _restore(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for t, s in zip(self._state(), saved, strict=True):
                t.copy_(s)
        self._seed()
