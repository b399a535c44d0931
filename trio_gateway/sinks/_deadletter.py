"""Where messages go that the destination refused for good: the dead-letter sink.

A poison batch (a record the destination answers 400 or 413 to however it is sent) must not
stall the pump forever, nor vanish. The pump hands such messages here, with the reason; they
are written to another sink (a file by default: ``dead_letter = "PATH"``) in the same JSON
Lines records as the file sink, so the tools that read one read the other, and a fixed
destination can be fed them again (``send`` them, or point a gateway's file source at them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from .._errors import ConfigurationError, SinkError
from .._log import RateLimitedLogger, logger
from .._message import Batch
from ._base import Sink
from ._simple import FileSink

__all__ = ("DeadLetter", "set_aside")

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


async def set_aside(
    dead_letter: DeadLetter | None, batch: Batch, indices: Sequence[int], reason: str, *, sink: str
) -> bool:
    """Hand the messages of ``batch`` at ``indices`` (refused for good by ``sink``, or out of
    retries) to ``dead_letter``: True once written there; False when they are lost (no dead
    letter, or it failed too). The caller counts them: ``dead_letter`` or ``refused``.

    The gateway's pump and each fan-out branch set refused messages aside through this one
    path, so a refusal is never retried and never vanishes uncounted."""
    if dead_letter is None:
        _log.warning(
            "sink %s: %d messages refused for good (%s); no dead letter: dropped",
            sink,
            len(indices),
            reason,
        )
        return False
    refused = batch if len(indices) == len(batch) else Batch.of([batch[i] for i in indices])
    return await dead_letter.put(refused, reason)
