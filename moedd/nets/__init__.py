"""Evaluation networks for dataset distillation (docs/methods.md §Networks).

Every architecture lives in its own module as one generic class that takes the normalization
as a keyword; thin entrypoints register fixed configurations under short names (timm style),
so a config or command line picks a net by name via :func:`create_net`.

Conventions shared by all nets (docs/methods.md §Networks):

* ``norm="instance"`` is ``nn.GroupNorm(C, C, affine=True)``, as in the DC/MTT repos -- not
  ``nn.InstanceNorm2d``, which has no affine parameters by default and different state. It is
  built as :class:`moedd.nets.norm.InstanceNorm`, a GroupNorm subclass with the same parameters
  and values whose double backward (gradient matching, MTT unrolls) is analytic.
* ConvNet's convolutions are :class:`moedd.nets.conv.Conv2d` (an ``nn.Conv2d`` with the same
  state) whose double backward on the CPU is three native oneDNN calls, skipping unused terms.
* Every net exposes ``embed(x)`` (the flattened penultimate feature, used by DM/IDM feature
  matching) and a linear ``classifier``, with ``forward(x) == classifier(embed(x))``.
"""

from __future__ import annotations

import importlib
import pkgutil

from moedd.nets.base import DISPLAY_NAMES, NETS, NORMS, NetProtocol, create_net, list_nets, make_norm, register_net

for _module in pkgutil.iter_modules(__path__):  # importing a network module registers its entrypoints
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DISPLAY_NAMES",
    "NETS",
    "NORMS",
    "NetProtocol",
    "create_net",
    "list_nets",
    "make_norm",
    "register_net",
]
