"""Importing a reference repository from a checkout the user names, in this process.

The references are not vendored. Each section module imports its reference through these
helpers: the checkout is checked for the files it needs, module-level imports this environment
lacks get stand-ins (never on a timed path), and the repositories' clashing top-level names
(``utils``, ``networks``, ``train``, ``data``) are kept apart.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any


def stub_module(name: str, **attrs: Any) -> None:
    """Register a stand-in module ``name`` holding ``attrs``."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def stub_if_missing(name: str, **attrs: Any) -> None:
    """A stand-in module ``name`` holding ``attrs``, only when ``name`` cannot be imported."""
    try:
        importlib.import_module(name)
    except ImportError:
        stub_module(name, **attrs)


def common_shims() -> None:
    """Stand-ins for module-level imports of the reference repositories that this environment lacks.

    ``scipy.ndimage.interpolation`` (removed in SciPy 2; only the reference's non-differentiable
    ``augment`` uses ``rotate``) and ``torchvision`` (only dataset loading and image saving use
    it). Neither is on a timed code path; each is stubbed only when it cannot be imported.
    """
    try:
        importlib.import_module("scipy.ndimage.interpolation")
    except ImportError:
        try:
            from scipy.ndimage import rotate
        except ImportError:  # pragma: no cover
            def rotate(*a: Any, **k: Any) -> Any:
                raise NotImplementedError("scipy is not installed")
        stub_module("scipy.ndimage.interpolation", rotate=rotate)
    stub_if_missing("torchvision", datasets=types.SimpleNamespace(), transforms=types.SimpleNamespace())


def checkout(path: str, flag: str, files: tuple[str, ...], what: str) -> Path:
    """The resolved checkout ``path``; a one-line exit when it lacks one of ``files``."""
    root = Path(path).expanduser().resolve()
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise SystemExit(f"{flag} {path}: no {', '.join(missing)} there (a {what} checkout?)")
    return root


@contextlib.contextmanager
def isolated_imports(root: Path):
    """Import from the checkout ``root`` without clashing with other checkouts' module names.

    The reference repositories reuse top-level names (``utils``, ``networks``, ``train``,
    ``data``, ...). While the block runs, modules of those names are taken out of
    ``sys.modules`` and ``root`` is first on ``sys.path``; afterwards the checkout's modules are
    dropped from ``sys.modules`` again and the previous ones restored. The imported functions
    keep working: they reach their own module's globals, not ``sys.modules``. Warnings raised at
    import time (deprecations in old code) are silenced; the warning filters are restored.
    """
    names = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir()}
    clash = lambda n: n.split(".")[0] in names  # noqa: E731
    saved = {n: m for n, m in sys.modules.items() if clash(n)}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.path.remove(str(root))
        for n in [n for n in sys.modules if clash(n)]:
            del sys.modules[n]
        sys.modules.update(saved)


def checkout_commit(path: str) -> str:
    """``@<short commit> `` of a reference checkout when it is a git work tree, else ``""``."""
    if not (Path(path).expanduser() / ".git").exists():  # e.g. a `git archive` extract
        return ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(path).expanduser(), capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"@{rev} " if rev else ""
