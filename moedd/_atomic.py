"""Atomic publication of outputs: a kill at any instant leaves the old output or the new one.

A stage can be killed at any moment (SIGKILL, OOM killer, a cancelled queued experiment). Files
written in place would then be left half-written, and a directory of several files (a synthetic
set: ``expert-k.pt`` + ``.json``) a mixture of the old set and the new one. So every output is
written beside its target first and moved into place in one step:

* :func:`atomic_file`: written to ``<target>.tmp-<pid>``, then ``os.replace``d over the target.
* :func:`atomic_dir`: written into the directory ``<target>.tmp-<pid>``, then swapped in. On
  Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` (the target never disappears); where the
  filesystem lacks it, the old directory is renamed to ``<target>.old-<pid>``, the new one in,
  and the old one deleted. A kill between those two renames leaves no target but a complete
  ``.tmp-<pid>`` beside ``.old-<pid>``: the next write of the same target finishes that swap.

Leftovers of a killed writer (``.tmp-<pid>`` / ``.old-<pid>`` of a process that no longer runs)
are removed by the next write of the same target; those of a live process are left alone (another
writer at work). Readers never look at them: they open the target only. The guarantee is against
process kills, not power loss (nothing is fsynced: that would cost every checkpoint a disk flush).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP, _OLD = "tmp", "old"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (on this machine); our own pid counts as not running: a
    leftover of ours is from an earlier write that was interrupted, not one in progress."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path) -> Iterator[tuple[Path, str, int]]:
    """(path, 'tmp' | 'old', pid) of every temporary sibling of ``target`` whose writer is gone."""
    prefix = target.name + "."
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        kind, sep, pid = p.name[len(prefix):].partition("-")
        if sep and kind in (_TMP, _OLD) and pid.isdigit() and not _alive(int(pid)):
            yield p, kind, int(pid)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_leftovers(target: str | Path) -> None:
    """Finish or undo what killed writers of ``target`` left beside it (see the module docstring)."""
    target = Path(target)
    by_pid: dict[int, dict[str, Path]] = {}
    for p, kind, pid in _leftovers(target):
        by_pid.setdefault(pid, {})[kind] = p
    for parts in by_pid.values():
        new, old = parts.get(_TMP), parts.get(_OLD)
        if old is not None and not os.path.lexists(target):
            # killed between moving the old output away and the new one in: the new one is complete
            # (the old one only moves once the new one is written), so it becomes the output
            os.rename(new if new is not None else old, target)
        for p in parts.values():
            if os.path.lexists(p):
                _remove(p)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on a clean exit it replaces ``target`` in one step.

    On an exception the temporary file is removed and ``target`` is untouched::

        with atomic_file(path) as tmp:
            torch.save(obj, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = target.with_name(f"{target.name}.{_TMP}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj: Any, target: str | Path) -> None:
    """``torch.save(obj, target)`` through :func:`atomic_file` (checkpoints, teachers, unit states)."""
    import torch  # lazily: the CLI imports this module before it knows whether it needs torch

    with atomic_file(target) as tmp:
        torch.save(obj, tmp)


def write_text(target: str | Path, text: str) -> None:
    """``Path(target).write_text(text)`` through :func:`atomic_file`."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to write the new output into; on a clean exit it
    takes the place of ``target`` (created if absent) in one step, and the old content is deleted.

    On an exception the new directory is removed and ``target`` is untouched. Leftovers of killed
    writers of ``target`` are cleaned first (:func:`clean_leftovers`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = target.with_name(f"{target.name}.{_TMP}-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        _remove(tmp)  # now the old output
    else:
        old = target.with_name(f"{target.name}.{_OLD}-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)
