"""Where messages go that the destination refused for good: the dead-letter sink.

A poison batch (a record the destination answers 400 or 413 to however it is sent) must not
stall the pump forever, nor vanish. The pump hands such messages here, with the reason; they
are written to another sink (a file by default: ``dead_letter = "PATH"``) in the same JSON
Lines records as the file sink, so the tools that read one read the other, and a fixed
destination can be fed them again (``send`` them, or point a gateway's file source at them).
"""

from __future__ import annotations

import logging

import trio

from .._errors import ConfigurationError, SinkError
from .._log import RateLimitedLogger, logger
from .._message import Batch
from ._base import Sink
from ._simple import FileSink

__all__ = ("DeadLetter",)

_log = RateLimitedLogger(logger.getChild("sinks.dead_letter"))

ATTEMPTS = 3
"""Tries per refused batch before it counts as ``refused`` (lost): the dead-letter sink is a
last resort, and waiting on it would stall the delivery of everything else."""


class DeadLetter:
    """A sink for refused messages, with a short, bounded retry."""

    def __init__(self, sink: Sink | str) -> None:
        if isinstance(sink, str):
            if not sink:
                raise ConfigurationError("sink.dead_letter", "needs a path or a sink")
            sink = FileSink(sink.removeprefix("file:"))
        self.sink = sink
        self.name = sink.name
        self.written = 0
        """Messages written to the dead-letter sink."""

    async def open(self) -> None:
        await self.sink.open()

    async def aclose(self) -> None:
        await self.sink.aclose()

    async def put(self, batch: Batch, reason: str) -> bool:
        """Write ``batch`` (refused for ``reason``); False if even this failed."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self.sink.send(batch)
            except (SinkError, OSError) as exc:
                if attempt == ATTEMPTS:
                    _log.log(
                        logging.ERROR,
                        "dead letter %s: %d messages refused (%s) and not written: %r",
                        self.name,
                        len(batch),
                        reason,
                        exc,
                    )
                    return False
                await trio.sleep(0.1 * 2**attempt)
            else:
                self.written += len(batch)
                _log.warning(
                    "%d messages refused for good (%s): written to the dead letter %s",
                    len(batch),
                    reason,
                    self.name,
                )
                return True
        return False  # pragma: no cover - the loop returns
