"""The results of DVC experiments, read from git: what one ``moedd report --experiments`` needs to
put every queued experiment's cells in one table.

``dvc exp run --queue`` runs each experiment in a temporary copy and keeps its result as a git
commit under ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``; the metrics files of the
pipeline are ``cache: false`` outputs, so they are in that commit. This module lists those refs
(newest first) and extracts the files under some directories of each into a temporary folder,
without touching the workspace (no ``dvc exp apply``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(?P<name>[^/]+)$")
"""An experiment's result (queue bookkeeping lives elsewhere under refs/exps: celery/, exec/)."""


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout


def list_experiments(root: Path) -> list[tuple[str, str]]:
    """(name, commit) of every DVC experiment of the repository at ``root``, newest first; [] when
    ``root`` is not a git repository or has none."""
    try:
        out = _git(root, "for-each-ref", "--sort=-committerdate", "--format=%(refname) %(objectname)", "refs/exps")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return []
    found = []
    for line in out.decode().splitlines():
        ref, _, sha = line.partition(" ")
        m = _EXP_REF.match(ref)
        if m:
            found.append((m["name"], sha))
    return found


@contextmanager
def experiment_trees(root: Path, dirs: list[Path]) -> Iterator[list[tuple[str, Path]]]:
    """(name, folder) per experiment (newest first): the folder holds the files the experiment's
    commit has under ``dirs`` (paths relative to ``root``), at the same relative paths. The folders
    are removed on exit."""
    with tempfile.TemporaryDirectory(prefix="moedd-exps-") as tmp:
        trees = []
        for name, sha in list_experiments(root):
            dest = Path(tmp) / sha
            listed = _git(root, "ls-tree", "-r", "--name-only", sha, "--", *(d.as_posix() for d in dirs))
            for rel in listed.decode().splitlines():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_git(root, "show", f"{sha}:{rel}"))
            trees.append((name, dest))
        yield trees
