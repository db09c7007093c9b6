"""Helpers for the hand-written double backward passes (moedd.nets.norm, moedd.nets.conv)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def engine_needs(ctx, i: int) -> bool:
    """Whether the running backward pass will use the gradient of the ``i``-th input of ``ctx``'s
    node. ``ctx.needs_input_grad`` only says the input requires grad; ``torch.autograd.grad(loss,
    images)`` with trainable weights still does not need the weights' gradient (IDC's
    meta-gradient), and skipping it saves a full convolution per layer."""
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # not in a backward pass / older PyTorch: assume needed
        return True


class _NoThirdDerivative(torch.autograd.Function):
    """Passes a second derivative through; differentiating it raises (instead of silently
    dropping the terms a third derivative would need)."""

    @staticmethod
    def forward(ctx, what: str, value: Tensor, *deps: Tensor) -> Tensor:  # type: ignore[override]
        ctx.what = what
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise RuntimeError(f"{ctx.what} has no third derivative; use the torch.nn.functional op for "
                           "third-order derivatives")


def no_third_derivative(grads: Sequence[Tensor | None], deps: Sequence[Tensor | None], what: str
                        ) -> tuple[Tensor | None, ...]:
    """``grads`` unchanged, but when the graph is being recorded (create_graph), made to raise if
    differentiated: a hand-written double backward computed under no_grad would otherwise give a
    silently wrong (zero) third derivative."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    live = [t for t in deps if t is not None and t.requires_grad]
    if not live:
        return tuple(grads)
    return tuple(None if g is None else _NoThirdDerivative.apply(what, g, *live) for g in grads)
