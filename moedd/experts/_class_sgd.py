"""SGD with momentum stepped once per class on one image tensor, computed in closed form.

IDM and IDC step their image optimizer once per class (``for c: zero_grad; L_c.backward();
step``) on the single tensor that holds every class's images. With momentum, each of those steps
also moves the other classes' rows by their momentum buffers, so C sequential steps are not one
joint step; but because L_c depends only on class c's rows, the C steps have a closed form that
needs the gradient of every class at one known point (:meth:`ClassSequentialSGD.lookahead`).
That lets the C class losses be computed in one batched pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ClassSequentialSGD:
    """SGD with momentum stepped once per class, in class order, on ONE tensor -- computed exactly.

    Reproduces ``for c in range(C): opt.zero_grad(); L_c.backward(); opt.step()`` with
    ``opt = torch.optim.SGD([param], lr, momentum)`` (no dampening, no Nesterov, no weight decay)
    when L_c depends only on the rows of class c. For the rows x of class c, with buffer b₀ at the
    start and S(k) = μ + μ² + ... + μ^k, the C steps are:

    * steps 0..c-1 (other classes, zero grad): x₁ = x − lr·S(c)·b₀, b₁ = μ^c·b₀;
    * step c: g = ∇L_c(x₁), b₂ = μ·b₁ + g, x₂ = x₁ − lr·b₂;
    * steps c+1..C-1 (zero grad): x₃ = x₂ − lr·S(C-1-c)·b₂, b₃ = μ^(C-1-c)·b₂.

    So :meth:`lookahead` gives the point where IDM/IDC evaluate every class's gradient, and
    :meth:`step` applies the closed-form end result. A fresh buffer of zeros equals torch's lazily
    created one (its first ``buf = grad.clone()`` is μ·0 + grad).

    Args:
        param: the leaf tensor, rows class-major along ``dim`` 1: shape (E, C·per_class, ...).
        num_classes: C.
        per_class: rows per class.
        lr: learning rate.
        momentum: μ.
    """

    def __init__(self, param: Tensor, num_classes: int, per_class: int, lr: float, momentum: float) -> None:
        self.param, self.lr, self.momentum = param, float(lr), float(momentum)
        self.num_classes, self.per_class = num_classes, per_class
        self.buf = torch.zeros_like(param, memory_format=torch.contiguous_format).detach()
        mu, c_n = self.momentum, num_classes

        def s(k: int) -> float:
            return sum(mu**j for j in range(1, k + 1))

        def rows(values: list[float]) -> Tensor:
            t = torch.tensor(values, dtype=torch.float64).repeat_interleave(per_class)
            return t.to(param.dtype).to(param.device).view(1, -1, *([1] * (param.dim() - 2)))

        self._pre = rows([s(c) for c in range(c_n)])
        self._x_buf = rows([s(c) + (1 + s(c_n - 1 - c)) * mu ** (c + 1) for c in range(c_n)])
        self._x_grad = rows([1 + s(c_n - 1 - c) for c in range(c_n)])
        self._b_grad = rows([mu ** (c_n - 1 - c) for c in range(c_n)])
        self._b_buf = mu**c_n

    def lookahead(self) -> Tensor:
        """Where the gradient of each class is taken (detached; class 0: the current images)."""
        return (self.param.detach() - self.lr * self._pre * self.buf).detach()

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        """Apply the C per-class steps, ``grad`` being ∇ Σ_c L_c taken at :meth:`lookahead`."""
        self.param.sub_(self.lr * (self._x_buf * self.buf + self._x_grad * grad))
        self.buf.mul_(self._b_buf).add_(self._b_grad * grad)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffer": self.buf.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buf.copy_(state["momentum_buffer"])
