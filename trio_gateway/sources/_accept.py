"""Taking a flood of connections from the kernel's accept queue: all that wait, at once, the
ones whose peers have spoken first; at ``max_connections``, those that have not wait in a
lobby (a socket each, no task) for their first bytes (``serve_connections``).

Why: a good client that connects during a flood waits in the kernel's queue behind every
attack connection, each costing a task, a slot and an eviction if taken one at a time. Every
client of these protocols speaks first (a request, a preface, a TLS hello), so by the time a
flood's connections are accepted a good client's bytes are there and an idle attacker's are
not: the good one goes first, the idle ones cost an ``accept`` and a ``close``.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Any, Generic, TypeVar

import trio

from ._sockets import socket_of, unread_bytes

__all__ = ("Lobby", "accept_waiting", "duplicate_listening")

StreamT = TypeVar("StreamT", bound=trio.abc.Stream)


def duplicate_listening(listener: trio.abc.Listener[Any]) -> socket.socket | None:
    """A non-blocking duplicate of a plain TCP listener's socket, for :func:`accept_waiting`
    (the caller closes it); ``None`` for other listeners (TLS: they accept their own way)."""
    if not isinstance(listener, trio.SocketListener):
        return None
    duplicate = socket.socket(fileno=os.dup(listener.socket.fileno()))
    duplicate.setblocking(False)
    return duplicate


def accept_waiting(duplicate: socket.socket, limit: int) -> list[trio.SocketStream]:
    """Up to ``limit`` connections that wait in the kernel's accept queue, taken at once
    (no await): a flood is seen whole, not one scheduler round per connection. An error
    ends the sweep; the listener's own ``accept`` then meets it (and deals with it)."""
    streams: list[trio.SocketStream] = []
    while len(streams) < limit:
        try:
            connection, _ = duplicate.accept()
        except OSError:  # BlockingIOError: none left
            break
        streams.append(trio.SocketStream(trio.socket.from_stdlib_socket(connection)))
    return streams


def spoke(stream: trio.abc.Stream) -> bool:
    """Whether the peer's first bytes are there to read."""
    return bool(unread_bytes(socket_of(stream)))


class Lobby(Generic[StreamT]):
    """Newcomers of a flood that have sent nothing yet, held while the listener is full: each
    for up to ``wait`` seconds, looked at every ``every`` seconds, at most ``size`` of them."""

    def __init__(self, *, wait: float, every: float, size: int) -> None:
        self.wait = wait
        self.every = every
        self.size = size
        self._waiting: deque[tuple[float, StreamT]] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def next_look(self) -> float:
        """When to look again (``inf``: nobody waits)."""
        return trio.current_time() + self.every if self._waiting else float("inf")

    def hold(self, stream: StreamT) -> list[StreamT]:
        """Let ``stream`` wait; returns those pushed out (the oldest, past ``size``)."""
        self._waiting.append((trio.current_time() + self.wait, stream))
        pushed = []
        while len(self._waiting) > self.size:
            pushed.append(self._waiting.popleft()[1])
        return pushed

    def sort_out(self) -> tuple[list[StreamT], list[StreamT]]:
        """Take out those whose peers have spoken since, and those whose wait is over."""
        now = trio.current_time()
        spoken, expired, still = [], [], deque[tuple[float, StreamT]]()
        for deadline, stream in self._waiting:
            if spoke(stream):
                spoken.append(stream)
            elif now >= deadline:
                expired.append(stream)
            else:
                still.append((deadline, stream))
        self._waiting = still
        return spoken, expired

    def close(self) -> None:
        """Close everyone still waiting (the listener stops)."""
        for _, stream in self._waiting:
            socket_of(stream).close()
        self._waiting.clear()
