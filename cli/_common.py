"""What every command shares: the --params / -S / --checkpoint-dir options, loading and
validating the params, one-line user errors, and small output helpers."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.markup import escape

from moedd._atomic import write_text
from moedd.config import ConfigError
from moedd.params import Params, load_params
from moedd.registry import UnknownNameError

from .progress import console

DEFAULT_PARAMS = Path("params.yaml")
ParamsOpt = Annotated[
    Path | None,
    typer.Option(
        "--params",
        help="Params file to read (default: params.yaml; a missing params.yaml means the built-in defaults, "
             "said on the first log line). A --params file that does not exist is an error.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override any param, e.g. -S experts.dm.iterations=50 (repeatable)."),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="MOEDD_CHECKPOINT_DIR",
        help="Where resumable state lives, keyed by the run's fingerprint (default: <repository root>/.moedd/checkpoints, "
             "the root being $DVC_ROOT under DVC, so a queued experiment's state outlives its temporary copy).",
    ),
]
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn expected user errors into one red line on stderr and exit code 1.

    The line is printed unwrapped (``soft_wrap``) and any newline inside the message is joined, so
    an error is exactly one line whatever the terminal width: scripts and tests can rely on it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moedd.data import DataSourceError
        from moedd.synthetic import SyntheticSetError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, UnknownNameError, DataSourceError, SyntheticSetError, FileNotFoundError, ValueError) as err:
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _overrides(sets: list[str] | None, **named: Any) -> dict[str, Any]:
    """The ``-S key=value`` overrides (values parsed as YAML, as ``dvc exp run -S``) and the named
    options that were given, as dotted keys for :func:`load_params`."""
    out: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-S expects key=value, got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            what = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ConfigError(f"-S {item}: the value is not valid YAML ({what})") from None
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def _params(path: Path | None, sets: list[str] | None, **named: Any) -> Params:
    """Load and validate the params: an explicit ``--params`` file must exist; without one,
    params.yaml is read, or, if there is none, the built-in defaults are used and the log says so
    (a run on defaults by mistake would otherwise look like any other)."""
    overrides = _overrides(sets, **named)
    if path is None:
        if not DEFAULT_PARAMS.exists():
            console.log(f"{DEFAULT_PARAMS} not found: using the built-in defaults")
            return load_params(None, overrides)
        path = DEFAULT_PARAMS
    return load_params(path, overrides)


def _checkpoints(option: Path | None) -> Path:
    """--checkpoint-dir / $MOEDD_CHECKPOINT_DIR, else the repository root's .moedd/checkpoints."""
    from moedd.tracking import checkpoint_root

    return option if option is not None else checkpoint_root()


def _csv_list(value: str | None, cast: Callable[[str], Any] = str) -> list[Any] | None:
    return None if value is None else [cast(v.strip()) for v in value.split(",") if v.strip()]


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        write_text(path, json.dumps(data, indent=2) + "\n")  # a kill leaves the old file or the new one

