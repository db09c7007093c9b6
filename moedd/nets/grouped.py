"""G copies of one ConvNet in one pass, for per-group gradients (IDC's per-class gradient matching).

Gradient matching needs, for every class c, the gradient of that class's loss with respect to the
conv weights. Class by class that is C small forward/backward passes, and on a GPU each is a few
dozen kernel launches on 40-64 images: the loop is launch-bound. Here the conv weights are
replicated G times and the G batches run as ONE grouped convolution (``groups=G``: group g sees
only its own batch and its own copy), so one backward of Σ_g L_g yields every group's gradient at
once (the gradient w.r.t. copy g is ∂L_g/∂W). Instance norm (GroupNorm with one channel per group),
ReLU and 2x2 pooling act per channel and need no change; the classifier is applied per group.
Same math as the per-group loop (tests/test_idc.py compares them).

Supported: :class:`moedd.nets.convnet.ConvNet` with instance norm or no norm (batch norm mixes
samples, so a grouped pass would not equal per-class passes). :meth:`GroupedConvNet.supports`
says whether a network qualifies; callers fall back to per-class passes otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedd.device import memory_format_for
from moedd.nets.conv import conv2d
from moedd.nets.norm import instance_norm


def _is_instance_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels and m.affine


class GroupedConvNet:
    """A ConvNet evaluated on G batches at once with G copies of its conv weights.

    The copies are the only tensors differentiated; biases, norm affines and the classifier are
    shared (IDC matches conv weights only). Build once per network; the copies are made fresh by
    :meth:`replicate` (detached from the network: its own training is unaffected).
    """

    def __init__(self, net: nn.Module) -> None:
        if not self.supports(net):
            raise ValueError(f"{type(net).__name__} is not a ConvNet with instance norm or no norm")
        self.blocks: list[tuple[nn.Conv2d, nn.Module | None, nn.Module]] = []
        layers = list(net.features)  # type: ignore[attr-defined]
        for i in range(0, len(layers), 4):
            conv, norm, _relu, pool = layers[i:i + 4]
            self.blocks.append((conv, None if isinstance(norm, nn.Identity) else norm, pool))
        self.classifier: nn.Linear = net.classifier  # type: ignore[attr-defined]
        self.net = net

    @staticmethod
    def supports(net: nn.Module) -> bool:
        """ConvNet-style trunk of (conv, instance norm | identity, ReLU, pool) blocks + a linear head."""
        from moedd.nets.convnet import ConvNet

        if not isinstance(net, ConvNet):
            return False
        layers = list(net.features)
        if len(layers) % 4:
            return False
        for i in range(0, len(layers), 4):
            conv, norm, relu, pool = layers[i:i + 4]
            if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(relu, nn.ReLU)
                    and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                    and (isinstance(norm, nn.Identity) or _is_instance_norm(norm))
                    and isinstance(pool, (nn.AvgPool2d, nn.MaxPool2d))):
                return False
        return True

    def replicate(self, groups: int) -> list[Tensor]:
        """G detached copies of every conv weight, stacked along dim 0: (G·out, in, k, k) each, leaves."""
        return [conv.weight.detach().repeat(groups, 1, 1, 1).requires_grad_(True) for conv, _, _ in self.blocks]

    def forward(self, x: Tensor, weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Logits and features of G batches.

        Args:
            x: (G, n, ch, H, W) images, batch g for copy g.
            weights: :meth:`replicate`'s copies (or any tensors of those shapes).

        Returns:
            logits (G, n, classes) and flattened trunk features (G, n, D), D ordered as the
            network's own ``embed``.
        """
        g, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, g * x.shape[2], *x.shape[3:])
        h = h.contiguous(memory_format=memory_format_for(self.net, h.device))  # the net's own layout
        for (conv, norm, pool), w in zip(self.blocks, weights, strict=True):
            bias = conv.bias.repeat(g) if conv.bias is not None else None
            h = conv2d(h, w, bias, conv.stride, conv.padding, conv.dilation, groups=g)
            if norm is not None:
                h = instance_norm(h, norm.weight.repeat(g), norm.bias.repeat(g), norm.eps)
            h = pool(F.relu(h))
        feats = h.reshape(n, g, -1).transpose(0, 1)  # (G, n, width·s·s), channel-major as flatten(1)
        logits = torch.einsum("gnd,kd->gnk", feats, self.classifier.weight) + self.classifier.bias
        return logits, feats

    @staticmethod
    def group_losses(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of every group: logits (G, n, K), labels (G,) -> (G,)."""
        g, n, k = logits.shape
        ce = F.cross_entropy(logits.reshape(g * n, k), labels.repeat_interleave(n), reduction="none")
        return ce.view(g, n).mean(1)
