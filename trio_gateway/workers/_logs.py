"""A worker's stderr: JSON lines, written by the worker and read back by the supervisor.

Each line is one object: ``{"log": {...}}`` for a log record (level, logger, message and a
formatted exception), or ``{"event": ...}`` for what the supervisor acts on (``ready``,
``ledger``). Anything else on that pipe (a traceback printed before logging was set up, a
warning from a library) is passed on as text. Both ends are here so the format has one home.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

from .._log import RateLimitedLogger

__all__ = ("JsonLinesHandler", "read_line", "write_line")

_stderr_lock = threading.Lock()


def write_line(entry: Mapping[str, object]) -> None:
    """Worker side: one JSON line on stderr (whole, even with a logging thread writing too)."""
    line = json.dumps(entry, default=str) + "\n"
    with _stderr_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


class JsonLinesHandler(logging.Handler):
    """Worker side: each log record as one ``{"log": ...}`` line, for the parent to log again."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry: dict[str, object] = {
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                entry["exc"] = logging.Formatter().formatException(record.exc_info)
            write_line({"log": entry})
        except Exception:
            self.handleError(record)


def read_line(raw: bytes, log: RateLimitedLogger) -> dict[str, Any] | None:
    """Supervisor side: one line of a worker's stderr.

    Returns an ``{"event": ...}`` object for the caller to act on; a log record or any other
    text is logged again through ``log`` (the worker's rate-limited logger) and gives None.
    """
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            if "event" in entry:
                return entry
            record = entry.get("log")
            if isinstance(record, dict):
                level = logging.getLevelName(str(record.get("level", "INFO")))
                name = str(record.get("logger", "")).removeprefix("trio_gateway.")
                message = str(record.get("message", ""))
                if record.get("exc"):
                    message = f"{message}\n{record['exc']}"
                log.log(level if isinstance(level, int) else logging.INFO, "%s: %s", name, message)
                return None
    if text:  # anything else a worker writes (a traceback, a warning)
        log.warning("%s", text)
    return None
