"""The live connections of one listener: counted so shutdown can wait for them, and ranked by
how long their peers have been silent so that, at ``max_connections``, a silent one makes room
for a newcomer (``serve_connections``)."""

from __future__ import annotations

import trio

from ._sockets import socket_of, tcp_quiet, unread_bytes

__all__ = ("LiveConnection", "LiveConnections")

_RANKING_TTL = 0.5
"""Seconds one ranking of the live connections by silence serves evictions (see
``LiveConnections.evict``)."""
_RESCAN_AFTER = 0.05
"""Seconds after a ranking before another, when a flood of newcomers has used it up."""


class LiveConnection:
    """One served connection, as the accept loop sees it: what cancels it, and its socket
    (through TLS), which the kernel can tell about (:func:`tcp_quiet`)."""

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
        """The connections that could be evicted at the last scan, the first to go last."""
        self._ranked_at = self._ranked_until = -float("inf")

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

    def evict(self, silent_for: float, *, mute_for: float) -> bool:
        """Cancel one connection whose slot a newcomer may take; its slot is free at once.
        Returns whether one was.

        First the connection whose peer has sent nothing at all since it connected, for
        longest, once that is ``mute_for`` seconds: every client of these protocols speaks
        first (a request, a preface, a TLS hello), so a mute one is idle or hostile and loses
        nothing. Else the connection whose peer has sent nothing for longest, if that is at
        least ``silent_for`` seconds. Either way only one whose bytes the gateway has read
        (one held back by the gateway, a queue full under ``block``, keeps its slot).

        Silence is the kernel's figure (``TCP_INFO``), whatever the handler reads with. One
        scan ranks every connection; a flood of newcomers then takes from that ranking (each
        checked again) for :data:`_RANKING_TTL` seconds, or until it is used up (then another
        scan, at most every :data:`_RESCAN_AFTER` seconds), so eviction costs two system calls
        per newcomer, not two per live connection.
        """
        now = trio.current_time()
        if now >= self._ranked_until or (
            not self._ranked and now >= self._ranked_at + _RESCAN_AFTER
        ):
            ranked = []
            for live in self.live:
                if not live.evicted and (key := _rank(live, silent_for, mute_for)) is not None:
                    ranked.append((key, live))
            ranked.sort(key=lambda pair: pair[0])
            self._ranked = [live for _, live in ranked]
            self._ranked_at = now
            self._ranked_until = now + _RANKING_TTL
        while self._ranked:
            live = self._ranked.pop()
            if live.evicted or live not in self.live:
                continue
            if _rank(live, silent_for, mute_for) is None or unread_bytes(live.socket):
                continue
            live.evicted = True
            live.scope.cancel()
            self.active -= 1
            return True
        return False

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _rank(live: LiveConnection, silent_for: float, mute_for: float) -> tuple[bool, float] | None:
    """Where ``live`` stands for eviction (the greater, the sooner: mute ones first, then by
    silence); ``None`` if it may not be evicted now."""
    quiet = tcp_quiet(live.socket)
    if quiet is None:
        return None
    seconds, spoke = quiet
    if seconds < (silent_for if spoke else mute_for):
        return None
    return (not spoke, seconds)
