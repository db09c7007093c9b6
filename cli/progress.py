"""Progress display: rich bars on a terminal, plain log lines otherwise (queued runs, CI, pipes).

Everything goes to stderr so stdout stays free for machine-readable output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, log_path=False)


class Bars:
    """A group of named progress bars with a free-text status field each.

    On a terminal this is a live rich Progress; otherwise each update of a bar prints one log
    line, at most every ``min_interval`` seconds per bar (and always at the end).
    """

    def __init__(self, live: bool, min_interval: float = 5.0) -> None:
        self.live = live
        self.min_interval = min_interval
        self._progress = (
            Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console,
            )
            if live
            else None
        )
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def add(self, name: str, total: int, completed: int = 0) -> None:
        """Register a bar."""
        self._totals[name] = total
        self._last[name] = 0.0
        if self._progress is not None:
            self._tasks[name] = self._progress.add_task(name, total=total, completed=completed, status="")

    def update(self, name: str, completed: int, status: str = "") -> None:
        """Move bar ``name`` to ``completed`` with a status text (e.g. the current loss)."""
        if self._progress is not None:
            self._progress.update(self._tasks[name], completed=completed, status=status)
            return
        now, total = time.monotonic(), self._totals[name]
        if completed >= total or now - self._last[name] >= self.min_interval:
            self._last[name] = now
            console.log(f"{name}: {completed}/{total} {status}".rstrip())

    @contextmanager
    def running(self) -> Iterator["Bars"]:
        """Show the bars while the block runs."""
        if self._progress is None:
            yield self
            return
        with self._progress:
            yield self


@contextmanager
def bars(min_interval: float = 5.0) -> Iterator[Bars]:
    """Progress bars that degrade to log lines when stderr is not a terminal."""
    with Bars(console.is_terminal, min_interval).running() as b:
        yield b
