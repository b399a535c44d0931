"""Logging helpers: one logger tree, and a rate limit so a flood of bad peers cannot flood logs."""

from __future__ import annotations

import logging
import time

__all__ = ("RateLimitedLogger", "logger")

logger = logging.getLogger("trio_gateway")


class RateLimitedLogger:
    """Logs at most ``burst`` lines per ``per`` seconds (a token bucket); counts the rest.

    When lines were suppressed, the next line that gets through says how many.
    """

    def __init__(self, log: logging.Logger, *, burst: int = 10, per: float = 10.0) -> None:
        self._log = log
        self._burst = burst
        self._rate = burst / per
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return
        self._tokens -= 1.0
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} similar lines suppressed)"
            self.suppressed = 0
        self._log.log(level, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)
