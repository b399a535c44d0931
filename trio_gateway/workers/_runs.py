"""What the supervisor knows about each worker: its slot, and the current run in it.

A slot is worker number ``index`` for the supervisor's whole life; a run is one process in
that slot, from start to exit. A restart is a new run in the same slot, which keeps what the
past runs left (their ledgers, failures, restarts) and the worker's rate-limited logger.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import trio

from .._ledger import Ledger
from .._log import RateLimitedLogger
from ._metrics import Samples
from ._pipes import MAX_STDERR_LINE, Lines

__all__ = ("Run", "Slot")


class Run:
    """One run of one worker: a process from start to exit."""

    def __init__(self, worker: int, process: trio.Process) -> None:
        self.worker = worker
        self.process = process
        self.ready = False
        self.admin: tuple[str, int] | None = None
        self.bound: list[list[tuple[str, int]]] = []
        self.ledger: Ledger | None = None
        self.samples: Samples | None = None
        self.ended = False
        self.signalled = False
        """Whether a stop signal was forwarded to it (else its stdin is closed to stop it)."""
        self.stderr = Lines(MAX_STDERR_LINE)
        self.stderr_done = trio.Event()
        self.stdout_done = trio.Event()

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "running"
        if code < 0:
            with suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


class Slot:
    """Worker number ``index``: its current run and what its past runs left."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.run: Run | None = None
        self.runs = 0
        self.ever_ready = False
        self.failures: deque[float] = deque()
        self.ledgers: list[Ledger] = []
        self.reports: list[Mapping[str, Any]] = []
        """With named pipelines: each run's ``{pipeline: report}`` (runs that left a ledger)."""
        self.crashed = 0
        self.log = RateLimitedLogger(logging.getLogger(f"trio_gateway.worker.{index}"), burst=100)

    @property
    def restarts(self) -> int:
        return max(self.runs - 1, 0)
