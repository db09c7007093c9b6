"""The architecture contract and the pipeline's dependencies, checked on the real code.

* ``lint-imports`` (import-linter, configured in pyproject.toml) keeps its contracts: the CLI above
  the library, the experts above their building blocks, no expert importing another, the
  benchmark script above its table of sections above one module per reference repository, and
  the library never importing the CLI or the benchmarks.
* import-linter really sees the CLI: the folder ``cli/`` is installed as ``moedd.cli`` but read by
  the linter as the root package ``cli``, so every module of it must be in the graph, and no
  module may import ``moedd.cli`` by its absolute name (such an import is invisible to the graph).
* No module (library, CLI, benchmarks) imports one that imports it back (type-checking imports
  included).
* Each DVC stage lists as deps every file its command's result depends on: every module that the
  command's CLI module imports, directly or not, is under one of the stage's deps, or on
  :data:`NOT_RESULTS` (modules that change only speed or bookkeeping, so that editing them does
  not rerun a paper-scale stage).
* Size: no Python file above a tenth of the project's code lines, no function in cli/ above 50.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

NOT_RESULTS = {
    "moedd/device.py": "device choice, memory layout (channels-last) and allocator settings: speed only",
    "moedd/_graphs.py": "CUDA-graph capture and replay plumbing (the captured bodies live with their experts)",
    "moedd/_atomic.py": "how files are written (atomically), not what is in them",
    "moedd/distributed.py": "which torchrun rank does which unit of work, not what a unit computes",
    "moedd/tracking.py": "MLflow logging and where checkpoints live",
    "moedd/visualize.py": "image grids for MLflow and `moedd show`",
    "cli/progress.py": "progress bars and log lines",
}
"""Modules a stage imports that are deliberately NOT among its DVC deps, with the reason."""

VALIDATION_ONLY = [("moedd.params", "moedd.experts"), ("moedd.params", "moedd.experts.mixture"),
                   ("moedd.scale", "moedd.experts"),
                   ("cli.trajectories", "moedd.experts"), ("cli.trajectories", "moedd.experts.mixture")]
"""Imports that only validate or size params: loading params.yaml validates every expert's section
and reads every expert's rows of the run scale, so every command imports the expert registry, but
a stage's result depends on an expert's module only when the command itself runs that expert (its
own import of it is kept). ``grid.mixtures`` entries are checked with the mixture's name parser
likewise, and ``moedd trajectories --expert idm,mtt`` reads the registry only to pick the shards
of a mixture's MTT experts, an option its stage never passes."""


def _build_graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(REPO))  # the top-level cli/ folder, read as the package `cli` (as import-linter does)
    try:
        return grimp.build_graph("moedd", "cli", "benchmarks", cache_dir=None)
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return _build_graph()


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "4 kept" in out.stdout


def test_the_linter_sees_every_cli_and_benchmark_module_and_no_absolute_cli_import(graph: grimp.ImportGraph) -> None:
    import moedd.cli.main

    assert Path(moedd.cli.main.__file__).resolve() == REPO / "cli" / "main.py"  # the installed moedd.cli is cli/
    files = {f"{d}.{p.stem}" if p.stem != "__init__" else d for d in ("cli", "benchmarks")
             for p in (REPO / d).glob("*.py")}
    assert files <= graph.modules
    hidden = []
    for path in [*(REPO / "moedd").rglob("*.py"), *(REPO / "cli").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            hidden += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "moedd.cli" or n.startswith("moedd.cli.")]
    assert not hidden, "imports the linter cannot see (use relative imports inside cli/): " + "; ".join(hidden)


def test_no_module_imports_one_that_imports_it_back(graph: grimp.ImportGraph) -> None:
    circles = sorted(
        f"{m} -> {i}" for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
        if graph.chain_exists(importer=i, imported=m)
    )
    assert not circles


def _module_file(module: str) -> str:
    parts = module.split(".")
    base = REPO.joinpath(*(["cli", *parts[1:]] if parts[0] == "cli" else parts))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return path.relative_to(REPO).as_posix()


def _stage_modules() -> dict[str, str]:
    """The CLI module of every command: ``{"distill": "cli.distill", ...}`` (graph names)."""
    from typer.main import get_command_name

    from moedd.cli.main import app

    return {(c.name or get_command_name(c.callback.__name__)): "cli" + c.callback.__module__.removeprefix("moedd.cli")
            for c in app.registered_commands}


def test_every_stage_depends_on_what_its_command_imports() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = _stage_modules()
    graph = _build_graph()
    for importer, imported in VALIDATION_ONLY:
        graph.remove_import(importer=importer, imported=imported)
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = " ".join(body["cmd"].split()).split()
        assert words[0] == "moedd", name
        module = commands[words[1]]
        deps = [d.rstrip("/") for d in body.get("deps", [])]
        used = {_module_file(m) for m in graph.find_upstream_modules(module) | {module}
                if m.split(".")[0] in ("moedd", "cli")}
        for path in sorted(used):
            covered = any(path == d or path.startswith(d + "/") for d in deps)
            if not covered and path not in NOT_RESULTS:
                missing.append(f"{name}: {path}")
    assert not missing, "dvc.yaml deps miss: " + ", ".join(missing)


def test_not_results_modules_exist() -> None:
    assert all((REPO / p).is_file() for p in NOT_RESULTS)


def _code_files() -> list[Path]:
    """The library, the CLI and the benchmarks (tests not counted)."""
    return [*(REPO / "moedd").rglob("*.py"), *(REPO / "cli").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]


def test_no_file_holds_more_than_a_tenth_of_the_code() -> None:
    lines = {p: sum(1 for line in p.read_text().splitlines() if line.strip()) for p in _code_files()}
    total = sum(lines.values())
    big = {str(p.relative_to(REPO)): n for p, n in lines.items() if n > total / 10}
    assert not big, f"of {total} code lines: {big}"


def test_cli_functions_are_short() -> None:
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in (REPO / "cli").glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert not long
