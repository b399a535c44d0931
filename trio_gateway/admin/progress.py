"""Progress display for long client runs (``python -m trio_gateway send``).

A context manager yields ``advance(n)``; the client calls it after each write. On a terminal it
draws a rich progress bar on stderr (redrawn at most ten times a second, from the caller's own
task: no refresh thread) that disappears at the end, leaving the client's summary line. When
stderr is not a terminal, or the run is short, ``advance`` does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ("MIN_TOTAL", "send_progress")

MIN_TOTAL = 100_000
"""Runs of fewer messages finish too fast for a bar to help."""
_REDRAW_EVERY = 0.1


def _noop(n: int) -> None:
    return None


class _RateColumn(ProgressColumn):
    """Messages per second, from rich's own speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- msg/s" if speed is None else f"{speed:,.0f} msg/s")


@contextmanager
def send_progress(
    total: int,
    *,
    description: str = "sending",
    console: Console | None = None,
    enabled: bool | None = None,
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(messages)``: draws a bar of ``total`` messages when ``enabled``.

    By default it is enabled when stderr is a terminal and ``total >= MIN_TOTAL``.
    """
    console = console or Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal and total >= MIN_TOTAL
    if not enabled or total <= 0:
        yield _noop
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, auto_refresh=False, transient=True) as progress:
        task = progress.add_task(description, total=total)
        last = 0.0

        def advance(n: int) -> None:
            nonlocal last
            progress.advance(task, n)
            now = time.monotonic()
            if now - last >= _REDRAW_EVERY:
                last = now
                progress.refresh()

        yield advance
        progress.refresh()
