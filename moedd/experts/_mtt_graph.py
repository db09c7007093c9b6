"""MTT's unrolls and meta-gradients of one iteration as ONE CUDA graph, replayed every iteration.

Why: on a GPU an MTT iteration at the CIFAR-10 IPC 10 size is a few thousand small kernels (30
unrolled steps of a ConvNet-3 forward, backward with ``create_graph`` and update, then the
meta-backward through all of them) whose arithmetic takes a fraction of the time the host needs
to launch them: on the H200 both moedd and the reference took ~0.36-0.39 s per iteration, about
12 ms per unrolled step. A captured graph launches them all with one call.

What is captured (:meth:`StaticUnrolls.body`): for every expert k, the unroll from the static
buffer ``start[k]`` towards ``target[k]`` over the minibatch order ``order[k]``, then
``autograd.grad`` of its loss w.r.t. the synthetic images and the learnable learning rate, summed
over experts into static outputs. Everything that varies per iteration is either a tensor
refilled before the replay (teacher start/target parameters, the order) or drawn inside the graph
from ONE registered device generator re-seeded per iteration (the DSA groups and parameters:
:meth:`moedd.augment.DSA.per_sample_static`, the group drawn on the device because a host choice
would change the captured kernels). The images and the learning rate are read in place, so the
optimisers' steps (outside the graph) are seen by the next replay.

Not in the graph: the host choices of teacher and start epoch (as in eager mode), the order's
``randperm`` (eager, copied in), the dCor term (a fresh random network per iteration) and the
optimiser steps. Memory: the graph's private pool holds what one eager iteration peaks at, for
as long as the expert lives.

The body also runs eagerly (``capture=False``): that is how the CPU tests check it against the
ordinary unroll, and how a CUDA run compares the graph with the eager body.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moedd._graphs import GraphRunner, capture



class StaticUnrolls(GraphRunner):
    """Every expert's unrolled loss and its gradients, from static buffers (capturable).

    Args:
        method: the MTT expert method (``moedd.experts.mtt``; not imported: it imports this module).
        syn: the synthetic images (NoE, C·IPC, ch, H, W), a leaf updated in place.
        capture: capture the body in a CUDA graph at the first :meth:`run` and replay it after;
            False runs the body eagerly every time (any device).
    """

    def __init__(self, method: Any, syn: Tensor, capture: bool) -> None:
        super().__init__(syn, capture)
        ctx, cfg = method.ctx, method.cfg
        dev = syn.device
        self.method = method
        n = ctx.num_classes * ctx.ipc
        batch = min(cfg.batch_syn or n, n)
        params = sum(method.numels)
        self.labels = ctx.labels()
        self.start = torch.zeros(ctx.noe, params, device=dev)
        self.target = torch.zeros(ctx.noe, params, device=dev)
        self.order = torch.zeros(ctx.noe, cfg.syn_steps * batch, dtype=torch.long, device=dev)
        self.gen = torch.Generator(device=dev)
        self.outputs: tuple[Tensor, Tensor, Tensor] | None = None

    def body(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per-expert losses (NoE,), d(Σ losses)/d syn and d(Σ losses)/d lr, from the buffers.

        Each expert's graph is differentiated (and freed) before the next one is built, as in
        eager mode, so the peak is one expert's unroll.
        """
        m = self.method
        losses, g_syn, g_lr = [], torch.zeros_like(self.syn), torch.zeros_like(m.lr)
        for k in range(self.start.shape[0]):
            loss = m.unroll(self.syn[k], self.labels, self.start[k], self.target[k], self.gen,
                            self.order[k], host=None)
            gs, gl = torch.autograd.grad(loss, (self.syn, m.lr))
            g_syn += gs
            g_lr += gl
            losses.append(loss.detach())
        return torch.stack(losses), g_syn, g_lr

    def run(self, start: Tensor, target: Tensor, order: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Fills the buffers, seeds the augmentation and runs the body (replays the graph).

        Args:
            start, target: (NoE, P) flat teacher parameters of this iteration.
            order: (NoE, syn_steps·batch) minibatch indices.
            seed: the augmentation generator's seed for this iteration.

        Returns:
            losses, gradient w.r.t. the images and w.r.t. the learning rate; with a graph these
            are its static outputs, overwritten by the next run (copy what must outlive it).
        """
        self.start.copy_(start)
        self.target.copy_(target)
        self.order.copy_(order)
        if not self.capture:
            self.gen.manual_seed(seed)
            return self.body()
        if self.graph is None:
            self._capture(seed)
        self.gen.manual_seed(seed)  # the replay reads the generator's seed and offset now
        assert self.graph is not None and self.outputs is not None
        self.graph.replay()
        return self.outputs

    def _capture(self, seed: int) -> None:
        """Warm-up runs, then the capture (which runs nothing itself): :func:`moedd._graphs.capture`."""
        self.gen.manual_seed(seed)
        self.graph, self.outputs = capture(self.body, [self.gen], self.syn.device,
                                           before_capture=lambda: self.gen.manual_seed(seed))
