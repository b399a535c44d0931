"""The live connections of one listener: counted so shutdown can wait for them, and ranked by
how long their peers have been silent so that, at ``max_connections``, the longest-silent one
makes room for a newcomer (``serve_connections``)."""

from __future__ import annotations

import trio

from ._sockets import silence, socket_of, unread_bytes

__all__ = ("LiveConnection", "LiveConnections")

_RANKING_TTL = 0.5
"""Seconds one ranking of the live connections by silence serves evictions (see
``LiveConnections.evict``)."""


class LiveConnection:
    """One served connection, as the accept loop sees it: what cancels it, and its socket
    (through TLS), which the kernel can tell about (:func:`silence`)."""

    __slots__ = ("evicted", "scope", "socket")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.scope = trio.CancelScope()
        self.socket = socket_of(stream)
        self.evicted = False


class LiveConnections:
    """The live connections: counted so shutdown can wait for them, and ranked by silence so
    that the longest-silent one can make room for a newcomer at ``max_connections``."""

    def __init__(self) -> None:
        self.active = 0
        self.live: set[LiveConnection] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._ranked: list[LiveConnection] = []
        """The connections silent long enough at the last scan, longest-silent last."""
        self._ranked_until = -float("inf")

    def opened(self, stream: trio.abc.Stream) -> LiveConnection:
        self.active += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        live = LiveConnection(stream)
        self.live.add(live)
        return live

    def closed(self, live: LiveConnection) -> None:
        self.live.discard(live)
        if not live.evicted:  # an evicted one gave its slot up already
            self.active -= 1
        if not self.live:
            self._idle.set()

    def evict(self, silent_for: float) -> bool:
        """Cancel the connection whose peer has sent nothing for longest, if that is at least
        ``silent_for`` seconds and the gateway has read all it sent (one held back by the
        gateway, a queue full under ``block``, keeps its slot); its slot is free at once.
        Returns whether one was.

        Silence is the kernel's figure (``TCP_INFO``), whatever the handler reads with. One
        scan ranks every connection; a flood of newcomers then takes from that ranking (each
        checked again) for :data:`_RANKING_TTL` seconds, so eviction costs two system calls
        per newcomer, not two per live connection.
        """
        now = trio.current_time()
        if now >= self._ranked_until:
            timed = [(silence(live.socket), live) for live in self.live if not live.evicted]
            known = [(quiet, live) for quiet, live in timed if quiet is not None]
            known.sort(key=lambda pair: pair[0])
            self._ranked = [live for quiet, live in known if quiet >= silent_for]
            self._ranked_until = now + _RANKING_TTL
        while self._ranked:
            live = self._ranked.pop()
            if live.evicted or live not in self.live:
                continue
            quiet = silence(live.socket)
            if quiet is None or quiet < silent_for or unread_bytes(live.socket):
                continue
            live.evicted = True
            live.scope.cancel()
            self.active -= 1
            return True
        return False

    async def wait_idle(self) -> None:
        await self._idle.wait()
