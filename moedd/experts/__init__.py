"""Expert methods, found by name: a new method is one module here (its config class, its
``ExpertMethod`` subclass, its smoke sizes) plus its section in params.yaml.

Importing this package imports every module of it whose name does not start with an
underscore, which registers the methods they define; ``moedd.params`` builds the ``experts``
params section from the registry.
"""

import importlib
import pkgutil

from moedd.experts.base import EXPERTS, DistillContext, ExpertMethod, RunSpec, register_expert

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EXPERTS", "DistillContext", "ExpertMethod", "RunSpec", "register_expert"]
