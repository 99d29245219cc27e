"""Progress reporting: a rich progress bar on a terminal, silent otherwise.

Passes call ``with progress.task("quantize weights", total=n) as step: ... step()``; the CLI decides
whether anything is drawn (rich on stderr, only for work that lasts more than about a second).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["NullProgress", "Progress", "RichProgress"]


class Progress:
    """Interface: ``task`` yields a callable that advances the task by ``n`` steps."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None


class NullProgress(Progress):
    """Draws nothing (library use, ``--json``, non-terminal output)."""


class RichProgress(Progress):
    """A rich progress bar on stderr; bars appear only after ~1 s so quick steps stay quiet."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _RichProgress

        self._progress = _RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        import time

        started = time.perf_counter()
        shown = False
        task_id = None
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal shown, task_id, done
            done += n
            if not shown and time.perf_counter() - started > 1.0:
                if not self._progress.live.is_started:
                    self._progress.start()
                task_id = self._progress.add_task(description, total=total, completed=done)
                shown = True
            elif shown and task_id is not None:
                self._progress.update(task_id, completed=done)

        try:
            yield advance
        finally:
            if shown and task_id is not None:
                self._progress.remove_task(task_id)
                if not self._progress.tasks:
                    self._progress.stop()


def default_progress(enabled: bool = True) -> Progress:
    """Rich bars when stderr is a terminal and ``enabled``; otherwise silent."""
    if enabled and sys.stderr.isatty():
        return RichProgress()
    return NullProgress()
