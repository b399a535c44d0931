"""What the HTTP/2 server needs to know about the frames a client sends before h2 parses them.

h2 keeps an incomplete frame or header block to itself and says nothing of it, so a client
that trickles one byte at a time (slowloris), or a header block in slow CONTINUATION frames,
looks to the server like a quiet connection. :class:`FrameScanner` reads only the 9-byte frame
headers of the same bytes (no payload is copied) and tells whether something has begun that
has not ended (:attr:`~FrameScanner.partial`), and how many ``HEADERS`` and ``RST_STREAM``
frames came (rapid reset, CVE-2023-44487). Pure: no trio, no h2; fed bytes in tests.
"""

from __future__ import annotations

__all__ = ("PREFACE", "FrameScanner", "ResetWindow")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEADERS = 0x1
_RST_STREAM = 0x3
_CONTINUATION = 0x9
_END_HEADERS = 0x4


class FrameScanner:
    """Follows frame boundaries of a client's byte stream, the connection preface first."""

    __slots__ = ("_head", "_in_block", "_skip", "headers", "resets")

    def __init__(self) -> None:
        self._skip = len(PREFACE)  # bytes of the preface or of a frame's payload still to come
        self._head = bytearray()  # a frame header begun
        self._in_block = False  # a header block without END_HEADERS yet
        self.headers = 0
        """``HEADERS`` frames seen (a request each, or trailers)."""
        self.resets = 0
        """``RST_STREAM`` frames seen."""

    @property
    def partial(self) -> bool:
        """Whether a preface, frame or header block has begun and not ended."""
        return self._skip > 0 or bool(self._head) or self._in_block

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes the client sent."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                taken = min(self._skip, end - pos)
                self._skip -= taken
                pos += taken
                continue
            need = 9 - len(self._head)
            self._head += view[pos : pos + need]
            pos += need
            if len(self._head) < 9:
                return
            head = self._head
            self._skip = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            head.clear()
            if kind == _HEADERS:
                self.headers += 1
                self._in_block = not flags & _END_HEADERS
            elif kind == _CONTINUATION:
                self._in_block = not flags & _END_HEADERS
            elif kind == _RST_STREAM:
                self.resets += 1


class ResetWindow:
    """Rapid-reset limit: at most ``limit`` streams reset by the client in any ``window``
    seconds (counted per fixed window). A client cancels a request now and then; hundreds a
    second is an attack that costs the server work for each stream opened and reset."""

    __slots__ = ("_count", "_start", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._start = -window
        self._count = 0

    def add(self, resets: int, now: float) -> bool:
        """Count ``resets`` at time ``now``; True once the limit is passed."""
        if now - self._start >= self.window:
            self._start = now
            self._count = 0
        self._count += resets
        return self._count > self.limit
