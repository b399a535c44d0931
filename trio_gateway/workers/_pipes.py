"""Reading a worker's output pipes: one loop, two ways of cutting what it reads.

A worker has two pipes to the supervisor. Its stderr is read line by line (:class:`Lines`:
each line bounded, a longer one cut and marked) and each line is acted on; its stdout (the
stdout sink) is relayed in whole lines (:class:`WholeLines`: everything up to the last
newline read, so lines from two workers never interleave). :func:`pump` is the one read loop
for both. The framers are pure (bytes in, pieces out) and tested that way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

__all__ = ("MAX_STDERR_LINE", "MAX_STDOUT_PENDING", "Framer", "Lines", "WholeLines", "pump")

MAX_STDERR_LINE = 256 * 1024
"""A longer line on a worker's stderr is cut (and marked) rather than buffered."""
MAX_STDOUT_PENDING = 16 << 20
"""Bound on a partial stdout line held by the relay; past it the piece is passed on as is."""
READ_SIZE = 256 * 1024


class Framer(Protocol):
    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """The complete pieces ``data`` finishes (in order); the rest is held."""

    def close(self) -> list[bytes]:
        """The stream ended: what is still held, as pieces."""


class Lines:
    """Splits a byte stream into lines, each bounded (a longer one is cut and marked)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.discarding = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self.pending += data
        lines: list[bytes] = []
        while True:
            end = self.pending.find(b"\n")
            if end < 0:
                break
            line = bytes(self.pending[:end])
            del self.pending[: end + 1]
            if self.discarding:
                self.discarding = False
                continue
            lines.append(line)
        if len(self.pending) > self.limit:
            if not self.discarding:
                lines.append(bytes(self.pending[: self.limit]) + b" [line cut]")
            self.discarding = True
            self.pending.clear()
        return lines

    def close(self) -> list[bytes]:
        rest, self.pending = bytes(self.pending), bytearray()
        return [rest] if rest and not self.discarding else []


class WholeLines:
    """Cuts a byte stream after its last newline: one piece of whole lines per read.

    A partial line is held until its end arrives, up to ``limit`` bytes; past that, what is
    held is passed on as it is (so one endless line cannot make the relay hold everything).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        pending = self.pending
        pending += data
        cut = pending.rfind(b"\n") + 1
        if not cut:
            if len(pending) < self.limit:
                return []
            cut = len(pending)
        piece = bytes(pending[:cut])
        del pending[:cut]
        return [piece]

    def close(self) -> list[bytes]:
        rest, self.pending = bytes(self.pending), bytearray()
        return [rest] if rest else []


async def pump(
    stream: trio.abc.ReceiveStream,
    framer: Framer,
    deliver: Callable[[bytes], Awaitable[None]],
) -> None:
    """Read ``stream`` until it ends (or breaks), handing each piece ``framer`` cuts to
    ``deliver``, then what the framer still holds."""
    while True:
        try:
            data = await stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            break
        for piece in framer.feed(data):
            await deliver(piece)
    for piece in framer.close():
        await deliver(piece)
