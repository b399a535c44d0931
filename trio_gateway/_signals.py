"""SIGINT and SIGTERM: the first asks for a graceful shutdown, the next one stops at once.

A :class:`~trio_gateway.Gateway` run alone and :class:`~trio_gateway.Pipelines` (several
gateways, one handler for all) watch the signals the same way; only what they say and what
"stopped" means differ, so they share this loop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

__all__ = ("watch_signals",)


def _never() -> bool:
    return False


async def watch_signals(
    stopping: trio.Event,
    shutdown: Callable[[], None],
    abort: Callable[[], None],
    *,
    log: logging.Logger,
    what: str = "shutting down",
    stopped: Callable[[], bool] = _never,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Until cancelled: a signal before ``stopping`` is set calls ``shutdown``; one after it
    calls ``abort`` (unless ``stopped()``: nothing is left to cut short).

    Start it before any source, and keep it until the run ends: a signal never falls through
    to the default handlers (which would skip the flush and the ledger).
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stopping.is_set():
                # Asked for (a deploy, Ctrl-C): normal operation, not a warning.
                log.info("%s: %s (again to stop at once)", name, what)
                shutdown()
            elif not stopped():
                log.warning("%s: stopping at once", name)
                abort()
