"""Logging helpers: one logger tree, a rate limit so a flood of bad peers cannot flood logs, and
the command line's set-up (text or JSON lines on stderr, chatty libraries kept quiet)."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = (
    "CHATTY_LOGGERS",
    "JsonFormatter",
    "RateLimitedLogger",
    "configure_logging",
    "logger",
)

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message`` (and ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


CHATTY_LOGGERS = ("trio_gateway.sources.websocket.protocol", "websockets")
"""Libraries that log routine events at INFO (``websockets``: "connection open" for every
connection): kept at WARNING unless the level asked for is DEBUG."""


def configure_logging(level: str, fmt: str) -> None:
    """The command line's logging: ``trio_gateway``'s records on stderr, as text or JSON.

    Normal operation is quiet at INFO: a WARNING means someone should act.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    for name in CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        chatty.setLevel(logging.NOTSET if logger.level <= logging.DEBUG else logging.WARNING)
