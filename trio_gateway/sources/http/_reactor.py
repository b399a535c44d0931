"""Idle HTTP/1.1 keep-alive connections waited for together, in an epoll of our own (Linux).

Why we own this wait: a keep-alive client sends its next request once it has read the answer
to the last, so on a quiet machine every request finds its connection idle, and each
connection's task then pays a Trio wait per request: trio's epoll backend re-arms the socket
(a one-shot ``epoll_ctl``), then a scheduler pass and the task's switch in and out, 15 to
25 us of CPU, where uvloop keeps its sockets registered and runs a C callback. With 16
connections, one request in flight each, that wait was most of the gap to uvicorn +
httptools on uvloop (88 against 58 us a request, 0.65x; docs/benchmarks.md).

Here a connection that is between requests with nothing received *parks*: its socket is
registered once, level-triggered, in the listener's epoll, and its task sleeps. One task
waits for that epoll's fd (one Trio wait for every connection that became ready together)
and serves each ready connection's complete requests inline: the read, llhttp's parse, the
rules, :meth:`IngestRules.ingest_nowait` and the prebuilt answer written without waiting. A
request whose head or ``Content-Length`` body comes in several writes (curl, Go and browsers
write the head and the body apart) is awaited here too, its body held in the memory budget
first, by the same deadline. Whatever cannot be finished so (``100 Continue``, a chunked or
NDJSON body, a refusal, a queue that does not take the message at once, an answer the socket
does not take whole, bad HTTP, a closed peer, a connection whose turn ends with a pipelined
request buffered) is handed back to the connection's task at the point reached (a
:class:`Handback`), which goes on as if it had read the bytes itself: every read deadline,
limit and refusal stays where it was (``_h11.py``, ``_h11server.py``).

The deadline of a parked connection (``idle_timeout`` from the end of its last answer, for
the next request and for one begun here) is kept by a sweep: at the earliest deadline (not
more often than :data:`_SWEEP` of the timeout, so at most that late), the connections past
theirs are handed back, and their task's read, already past the deadline, ends them as before
(closed if idle, ``408`` if a request had begun).

Measured (``python -m bench.profile http-wire --size 18 --inflight 16``, under cProfile):
197 -> 162 us of server CPU a request, trio's scheduler and I/O 22 -> 9 us, ``unrolled_run``
(a scheduler pass) 0.07 a request instead of a wait for a third of them. Interleaved runs
against the previous code and uvicorn + httptools with the same client (16 connections,
18 B, medians of 7 or 9): at load 1.4 to 1.8, 47 and 55 us a request against 82 and 90
before and 49 and 51 for uvicorn (server CPU 46-54 against 80-86 and 48); at load 4 to 6,
111 against 124 and 127. One connection gains nothing from a shared wait (one wait a request
either way) and loses nothing measurable (159 us a request before and after).
"""

from __future__ import annotations

import math
import select
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import outcome
import trio

from ..._budget import ConnectionShare
from ..._h11server import H11Server, Request
from ._rules import BodyKind, IngestRules, Reply

__all__ = ("AVAILABLE", "Handback", "Reactor", "open_reactor")

AVAILABLE = sys.platform == "linux" and hasattr(select, "epoll")
_BURST = 16
"""Requests one connection may have served inline in a row (a pipelining client) before the
others' turn: what is left stays buffered and its socket readable (level-triggered)."""
_SWEEP = 1 / 16
"""The idle deadline sweep's granularity, as a share of ``idle_timeout`` (at most 1 s)."""
_EVENTS = 64


class Handback:
    """Where the reactor stopped with a connection: its task goes on from there.

    ``deadline``: the current request's (``idle_timeout`` after the last answer). Then one
    of: ``error`` to raise; ``closed`` (the answer said close: end the connection); ``unsent``
    (the rest of an answer to write, then the next cycle); ``request`` with ``judged`` (the
    head and the rules' verdict) and maybe ``body`` (read, held, not queued); or nothing (read
    the next request as usual: what came so far is in the parser)."""

    __slots__ = ("body", "closed", "deadline", "error", "judged", "request", "unsent")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.error: Exception | None = None
        self.closed = False
        self.unsent = b""
        self.request: Request | None = None
        self.judged: tuple[Reply | None, BodyKind] | None = None
        self.body: bytes | None = None


class _Parked:
    """A parked connection, and the request it is receiving (head judged, body held)."""

    __slots__ = ("deadline", "http", "kind", "peer", "request", "share", "task")

    def __init__(self, http: H11Server, share: ConnectionShare, peer: str, deadline: float) -> None:
        self.http = http
        self.share = share
        self.peer = peer
        self.deadline = deadline
        self.task = trio.lowlevel.current_task()
        self.request: Request | None = None
        self.kind: BodyKind | None = None

    def handback(self) -> Handback:
        """Hand back as things stand: the request's head and verdict, if judged."""
        back = Handback(self.deadline)
        back.request = self.request
        if self.kind is not None:
            back.judged = (None, self.kind)
        return back


class Reactor:
    """The parked connections of one HTTP listener (see the module docstring)."""

    def __init__(self, rules: IngestRules, idle_timeout: float) -> None:
        self._rules = rules
        self._idle_timeout = idle_timeout
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        self._now = trio.current_time

    def close(self) -> None:
        self._epoll.close()

    async def park(
        self, http: H11Server, share: ConnectionShare, peer: str, deadline: float
    ) -> Handback:
        """Sleep while the reactor serves this idle connection; where it stopped."""
        fd = http.fd
        self._parked[fd] = _Parked(http, share, peer, deadline)
        self._epoll.register(fd, select.EPOLLIN)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        back: Handback = await trio.lowlevel.wait_task_rescheduled(abort)
        return back

    def _unpark(self, fd: int) -> _Parked:
        self._epoll.unregister(fd)
        return self._parked.pop(fd)

    def _hand_back(self, fd: int, back: Handback) -> None:
        trio.lowlevel.reschedule(self._unpark(fd).task, outcome.Value(back))

    async def serve(self) -> None:
        """Serve the parked connections as their sockets turn readable (forever)."""
        self._now = trio.lowlevel.current_clock().current_time
        epoll = self._epoll
        parked = self._parked
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0, _EVENTS):
                conn = parked.get(fd)
                if conn is not None:
                    back = self._step(conn)
                    # (unless its task was cancelled meanwhile: the budget may cut a
                    # connection to make room for another's body)
                    if back is not None and parked.get(fd) is conn:
                        self._hand_back(fd, back)

    def _step(self, conn: _Parked) -> Handback | None:
        """Read what a ready connection sent and serve its complete requests."""
        http = conn.http
        try:
            if not http.receive_nowait():
                return None  # (nothing after all)
            if http.parser.eof:
                return conn.handback()  # (the task tells a close from a cut request)
            for _ in range(_BURST):
                served = self._serve_one(conn)
                if served is not True:
                    return served or None
                if not http.parser.buffered and not http.receive_next_nowait():
                    return None
                if http.parser.eof:
                    return conn.handback()
        except Exception as exc:  # (bad HTTP, a broken socket: the task ends it as usual)
            back = Handback(conn.deadline)
            back.error = exc
            return back
        return conn.handback()  # (its turn is over: the task serves what is buffered)

    def _serve_one(self, conn: _Parked) -> Handback | bool:
        """Serve the connection's next request if all of it is in (True); False to wait for
        the rest of it here, or where to hand it back."""
        http = conn.http
        parser = http.parser
        rules = self._rules
        kind = conn.kind
        if kind is None:
            request = parser.head()
            if request is None:
                return False  # not all of the head yet (its size is bounded by the parser)
            reply, kind = rules.head(
                request.method, request.target, request.headers, request.fields
            )
            conn.request = request
            length = parser.content_length
            if (
                reply is not None
                or kind.ndjson
                or not length
                or (parser.expects_continue and parser.buffered < length)
            ):
                back = conn.handback()  # (a refusal, a batch, no body or chunked, 100)
                back.judged = (reply, kind)
                return back
            if not conn.share.hold_nowait(2 * length):
                rules.ingress.reject("over_budget")
                back = conn.handback()
                back.judged = (rules.over_budget, kind)
                return back
            conn.kind = kind  # (the body is held: its bytes are awaited here)
        length = parser.content_length
        assert length is not None
        if parser.buffered < length:
            return False  # the body's rest is awaited here, by the request's deadline
        parser.body(rules.max_body_size)  # (all of it is buffered, within the limit)
        body = parser.take_body()
        reply = rules.ingest_nowait(body, kind, conn.peer)
        if reply is None:
            back = conn.handback()  # the queue may take it later: the task waits for it
            back.body = body
            return back
        conn.share.close()
        conn.request = conn.kind = None
        unsent = http.respond_nowait(reply.status, reply.headers, reply.body)
        if unsent:
            back = Handback(conn.deadline)
            back.unsent = unsent
            return back
        if not http.next_cycle():
            back = Handback(conn.deadline)
            back.closed = True
            return back
        conn.deadline = self._now() + self._idle_timeout
        return True

    async def sweep(self) -> None:
        """Hand back the parked connections past their idle deadline (forever)."""
        granularity = min(1.0, self._idle_timeout * _SWEEP)
        while True:
            now = trio.current_time()
            earliest = math.inf
            for fd, conn in list(self._parked.items()):
                if conn.deadline <= now:
                    self._hand_back(fd, conn.handback())
                else:
                    earliest = min(earliest, conn.deadline)
            if earliest == math.inf:
                earliest = now + self._idle_timeout  # (a connection parked later ends later)
            await trio.sleep_until(max(earliest, now + granularity))


@asynccontextmanager
async def open_reactor(rules: IngestRules, idle_timeout: float) -> AsyncIterator[Reactor | None]:
    """A running :class:`Reactor` for the block (None where there is no epoll)."""
    if not AVAILABLE:
        yield None
        return
    reactor = Reactor(rules, idle_timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.serve)
            nursery.start_soon(reactor.sweep)
            yield reactor
            nursery.cancel_scope.cancel()
    finally:
        reactor.close()
