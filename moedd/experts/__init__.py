"""Expert methods, found by name: a new method is one module here plus its params section.

Importing this package registers every built-in method.
"""

from moedd.experts.base import EXPERTS, DistillContext, ExpertMethod, RunSpec, register_expert

from moedd.experts import dm as _dm  # noqa: E402,F401  (registration)
from moedd.experts import idc as _idc  # noqa: E402,F401
from moedd.experts import idm as _idm  # noqa: E402,F401
from moedd.experts import mtt as _mtt  # noqa: E402,F401
from moedd.experts import random as _random  # noqa: E402,F401

__all__ = ["EXPERTS", "DistillContext", "ExpertMethod", "RunSpec", "register_expert"]
