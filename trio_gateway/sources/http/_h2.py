"""The HTTP source's HTTP/2 path: :class:`IngestRules` over the sans-IO :class:`Http2Server`
(``sources/_http2.py``, the gRPC source's HTTP/2 layer too), on the Trio stream (cleartext
with prior knowledge, or TLS with ALPN ``h2``).

Served here rather than through hypercorn, which cannot be told what a hostile peer needs
(docs/http.md has the figures), and no longer on ``h2``'s state machine, which took a quarter
of the CPU of a request. Here:

* a request (head and body) must be complete within ``idle_timeout`` of its first frame, and
  a frame or header block within ``idle_timeout`` of its first byte; PINGs, SETTINGS and
  WINDOW_UPDATE extend neither, nor the idle deadline of a connection with no request. Past
  it: the slow requests get ``408``, ``GOAWAY(ENHANCE_YOUR_CALM)``, ``too_slow``; a quiet
  connection gets ``GOAWAY(NO_ERROR)`` (counted ``idle_timeout`` if it never sent a request,
  as on HTTP/1.1);
* the body bytes a connection holds (being received or waiting for the queue) are bounded by
  ``max_held``, plus one request, plus one stream window (:data:`STREAM_WINDOW`) for each
  other request: past ``max_held`` only the oldest request's stream window is reopened, so
  it can finish while the others wait (the connection's window is always given back, so
  that the others' bytes can never starve the oldest of it), and a large body gets a larger
  window (:data:`OLDEST_WINDOW`) while it is the oldest. They are
  charged to the gateway's memory budget (the connection's share): a request that the budget
  has no room for (by its ``Content-Length`` at its head, or as its DATA comes) gets ``503`` +
  ``Retry-After``, counted ``over_budget``, and the connection goes on;
* more than :data:`MAX_RESETS` streams reset within :data:`RESET_WINDOW` seconds ends the
  connection with ``GOAWAY(ENHANCE_YOUR_CALM)``, counted ``rapid_reset`` (the limit is
  :class:`Http2Server`'s);
* a connection is never recycled by request count; where one ends (shutdown, a deadline, an
  attack) the ``GOAWAY`` names the last stream that was or will be processed, and the
  requests in flight up to it are still answered; streams after it get ``REFUSED_STREAM``
  (never processed: safe to retry).

One connection's state machine (its requests, their flow control and charge, the deadlines,
the GOAWAY) is here; its writing half (the answers, and the writer of the output) is
``_h2answers``.

Speed: a read is parsed in one pass, and a request whose body the queue takes at once (one
message, complete in the read) is answered from the reader, without a task: the answers to
every request of a read go out in one write. A request that may wait (a full queue under
``block``, an NDJSON batch, a disk queue, ``ack = delivered``) gets a task of its own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from .._base import connection_errors, linger, say_goodbye_when_cut
from .._http2 import OVER_BUDGET, ErrorCode, Http2Error, Http2Server
from .._streamio import StreamIO
from ._h2answers import Http2Answers
from ._rules import BodyKind, Headers, IngestRules

if TYPE_CHECKING:
    from ..._budget import ConnectionShare

__all__ = ("MAX_RESETS", "MAX_STREAMS", "RESET_WINDOW", "serve_http2")

MAX_STREAMS = 100
"""Requests open at once on one connection (``SETTINGS_MAX_CONCURRENT_STREAMS``)."""
MAX_RESETS = 200
"""Streams a client may reset within :data:`RESET_WINDOW` seconds (rapid reset)."""
RESET_WINDOW = 1.0
MAX_RECV = 64 * 1024
MAX_FRAME_SIZE = 16384
"""Our ``SETTINGS_MAX_FRAME_SIZE`` (RFC 9113's smallest): bounds a partial frame."""
STREAM_WINDOW = 16384
"""Our ``SETTINGS_INITIAL_WINDOW_SIZE``: what a request past ``max_held`` may send before it
waits for its turn (100 of them: 1.6 MB at most)."""
OLDEST_WINDOW = 256 * 1024
"""The stream window of the oldest request once its body passes half of
:data:`STREAM_WINDOW`, and the connection's window: a large upload is not held to 16 KiB a
round trip."""
LINGER_SECONDS = 2.0
"""At most this long (and ``idle_timeout``) the last answers and GOAWAY get to be read."""


class _Request:
    """A request whose head has come: its body so far, and when it began."""

    __slots__ = ("chunks", "cors", "expected", "grown", "kind", "size", "started", "unacked")

    def __init__(self, started: float, kind: BodyKind, cors: Headers, expected: int | None):
        self.started = started
        self.kind = kind
        self.cors = cors
        self.expected = expected  # its Content-Length, if it gave one
        self.chunks: list[bytes] = []
        self.size = 0
        self.unacked = 0  # flow-controlled bytes whose stream window is not reopened yet
        self.grown = False  # its stream window made OLDEST_WINDOW


class _Http2Connection:
    """One connection: the :class:`Http2Server`'s listener (its ``on_*`` methods run while a
    read is parsed), a reader, a clock for the deadlines, and a task per request that waits."""

    def __init__(
        self,
        rules: IngestRules,
        stream: trio.abc.Stream,
        peer: str,
        share: ConnectionShare,
        *,
        idle_timeout: float,
        max_header_size: int,
        max_held: int,
    ) -> None:
        self.rules = rules
        self.ingress = rules.ingress
        self.io = StreamIO(stream, MAX_RECV)
        self.stream = stream
        self.peer = peer
        self.share = share
        self.idle_timeout = idle_timeout
        self.max_held = max_held
        self.h2 = Http2Server(
            self,
            max_concurrent_streams=MAX_STREAMS,
            stream_window=STREAM_WINDOW,
            connection_window=OLDEST_WINDOW,
            max_frame_size=MAX_FRAME_SIZE,
            max_header_list_size=max_header_size,
            max_resets=MAX_RESETS,
            reset_window=RESET_WINDOW,
            clock=trio.current_time,
        )
        self.answers = Http2Answers(self.h2, self.io, idle_timeout)
        self.requests: dict[int, _Request] = {}  # receiving, oldest first
        self.answering: dict[int, _Request] = {}  # complete, waiting for the queue
        self.held = 0  # body bytes in requests and answering
        self.unacked = 0  # of which the stream windows were not reopened (past max_held)
        self.last_stream = 0  # the highest stream processed or to be processed
        self.goaway_sent: int | None = None  # the last stream a GOAWAY (ours or theirs) allows
        self.now = trio.current_time()  # of the read being parsed
        self.quiet_since = self.now  # when a request last came, or an answer went
        self.stalled_at: float | None = None  # when a partial frame or header block began
        # the last header list seen (the HPACK cache gives the same object for the same
        # block) and what the rules made of it: a client repeating its headers is judged once
        self.head_of: object = None
        self.head: tuple[Headers, BodyKind, int | None] = ((), BodyKind(False), None)
        self.reading = trio.CancelScope()
        self.reader: trio.lowlevel.Task | None = None
        self.done = trio.Event()  # nothing in flight after a GOAWAY
        self.nursery: trio.Nursery | None = None

    # -- the connection's life ------------------------------------------------------------

    async def run(self, received: bytes) -> None:
        say_goodbye_when_cut(self.leave_over_budget)
        try:
            await self._serve(received)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the connection broke: nothing left to say

    async def _serve(self, received: bytes) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._stop_when_stopping)
            nursery.start_soon(self._clock)
            with self.reading:
                await self._flush()  # our SETTINGS
                await self._read(received)
            if self.goaway_sent is not None:
                await self.done.wait()  # the answers in flight (bounded by queue_wait)
            nursery.cancel_scope.cancel()
        await self._flush()
        # so that the GOAWAY is read, not lost to the reset of a close with unread bytes
        with trio.move_on_after(min(self.idle_timeout, LINGER_SECONDS)):
            await linger(self.stream)

    async def _read(self, data: bytes | bytearray) -> None:
        h2 = self.h2
        share = self.share
        self.reader = trio.lowlevel.current_task()
        while True:
            if data:
                self.now = trio.current_time()
                try:
                    h2.receive_data(data)
                except Http2Error as exc:
                    self._broken(exc)
                    return
                if not h2.stalled_bytes:
                    self.stalled_at = None
                elif self.stalled_at is None:
                    self.stalled_at = self.now
                if share.held != self.held:
                    share.hold_nowait(self.held)  # back to what is held (a head's check gone)
                await self._flush()
                if self.done.is_set():
                    return
            data = await self.io.receive()
            if not data:
                return  # the client closed its side
            if self.done.is_set():  # finished meanwhile (GOAWAY sent, nothing in flight):
                return  # a PING's ACK after the GOAWAY makes h2 clients drop the GOAWAY

    def _broken(self, exc: Http2Error) -> None:
        """The client broke HTTP/2 or a limit (rapid reset): :class:`Http2Server` queued its
        GOAWAY; what is still being received is dropped, what waits for the queue is
        answered."""
        self.ingress.reject(exc.reason)
        connection_errors.info(
            "%s: HTTP/2 from %s: %s, closed", self.ingress.listener, self.peer, exc
        )
        self.last_stream = max(self.last_stream, self.h2.highest_stream_id)
        self.goaway_sent = self.last_stream
        for stream_id, request in list(self.requests.items()):
            self._forget(stream_id, request)
        self._check_done()

    def _deadline(self) -> tuple[float, str]:
        """When the connection is next due, and what it is then: ``too_slow`` (a request or a
        frame begun) or ``idle_timeout`` (no request at all)."""
        start = math.inf
        if self.requests:
            start = next(iter(self.requests.values())).started
        if self.stalled_at is not None:
            start = min(start, self.stalled_at)
        if start < math.inf:
            return start + self.idle_timeout, "too_slow"
        if self.answering or self.goaway_sent is not None:
            return math.inf, ""  # the gateway's turn (or shutdown's grace period)
        return self.quiet_since + self.idle_timeout, "idle_timeout"

    async def _clock(self) -> None:
        """Act on the deadlines. Each is ``idle_timeout`` after something began, and what
        begins later is due later, so sleeping until the earliest one known misses none; with
        none known (answers at work), look again within ``idle_timeout``."""
        while True:
            deadline, reason = self._deadline()
            if deadline == math.inf:
                deadline = trio.current_time() + self.idle_timeout
            await trio.sleep_until(deadline)
            deadline, reason = self._deadline()
            if deadline <= trio.current_time():
                break
        if reason == "idle_timeout":
            if not self.last_stream:  # as on HTTP/1.1: counted if it never sent a request
                self.ingress.reject("idle_timeout")
            self._goaway(ErrorCode.NO_ERROR)
        else:
            self._too_slow()
        self.reading.cancel()
        await self._flush()

    def _too_slow(self) -> None:
        ingress = self.ingress
        ingress.reject("too_slow")
        connection_errors.info(
            "%s: %s: request not complete within %.0f s",
            ingress.listener,
            self.peer,
            self.idle_timeout,
        )
        for stream_id, request in list(self.requests.items()):
            self._forget(stream_id, request)
            self.answers.respond(stream_id, self.rules.too_slow, request.cors)
        self._goaway(ErrorCode.ENHANCE_YOUR_CALM)

    async def _stop_when_stopping(self) -> None:
        """Shutdown: ``GOAWAY(NO_ERROR)`` naming the streams received so far, which are
        finished within the grace period (``serve_connections`` cancels the rest)."""
        await self.ingress.wait_stopping()
        self.last_stream = max(self.last_stream, self.h2.highest_stream_id)
        self._goaway(ErrorCode.NO_ERROR)
        await self._flush()

    def leave_over_budget(self) -> None:
        """The memory budget cut this connection (``say_goodbye_when_cut``): GOAWAY saying
        so, what is being received refused, then closed once that is written."""
        self.last_stream = max(self.last_stream, self.h2.highest_stream_id)
        self._goaway(ErrorCode.ENHANCE_YOUR_CALM, OVER_BUDGET)
        self.reading.cancel()

    def _goaway(self, code: int, debug: bytes = b"") -> None:
        """A ``GOAWAY`` naming :attr:`last_stream`; the requests up to it go on (those still
        being received are refused if ``code`` is an error)."""
        if self.goaway_sent is not None and code == ErrorCode.NO_ERROR:
            return
        self.goaway_sent = self.last_stream
        if code != ErrorCode.NO_ERROR:
            for stream_id, request in list(self.requests.items()):
                self._forget(stream_id, request)
                self.h2.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
        self.h2.goaway(self.last_stream, code, debug)  # last: some clients read nothing after
        self._check_done()

    def _check_done(self) -> None:
        """After a GOAWAY, once nothing is in flight: stop reading (the reader itself returns
        by its own loop, so that what it has queued is written first)."""
        if self.goaway_sent is not None and not self.requests and not self.answering:
            self.done.set()
            if trio.lowlevel.current_task() is not self.reader:
                self.reading.cancel()

    # -- the Listener methods: called by Http2Server while it parses a read ---------------

    def on_request(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        if self.goaway_sent is not None and stream_id > self.goaway_sent:
            self.h2.refuse_stream(stream_id)  # after our GOAWAY: not processed
            return
        self.last_stream = stream_id
        self.quiet_since = now = self.now
        if headers is self.head_of:
            cors, kind, expected = self.head
        else:
            pairs = [(name.encode(), value.encode()) for name, value in headers]
            method = path = b""
            expected = None
            for name, value in pairs:
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b"content-length" and value.isdigit():
                    expected = int(value)
            rules = self.rules
            cors = rules.cors_headers(pairs)
            refusal, kind = rules.head(method, path, pairs)
            if refusal is not None:  # counted by the rules: never cached
                self.answers.respond(stream_id, refusal, cors)
                return
            self.head_of = headers
            self.head = (cors, kind, expected)
        request = _Request(now, kind, cors, expected)
        if expected and not self.share.hold_nowait(self.held + expected):
            self._over_budget(stream_id, request)  # before the body is sent
        elif end:
            self._complete(stream_id, request)
        else:
            self.requests[stream_id] = request

    def on_data(self, stream_id: int, data: bytes, flow_len: int, end: bool) -> None:
        request = self.requests.get(stream_id)
        if request is None:  # answered already (a refusal): read and discarded
            self.h2.acknowledge(stream_id, flow_len)
            return
        self.quiet_since = self.now
        size = request.size + len(data)
        request.size = size
        self.held += len(data)
        if size > self.rules.max_body_size:
            self._forget(stream_id, request)
            self.h2.acknowledge(stream_id, flow_len)
            self.answers.respond(stream_id, self.rules.body_too_large(), request.cors)
            return
        if self.held > self.share.held and not self.share.hold_nowait(self.held):
            self.h2.acknowledge(stream_id, flow_len)
            self._over_budget(stream_id, request)
            return
        request.chunks.append(data)
        if end:
            self.h2.acknowledge(0, flow_len)  # the stream is over: the connection's window
            self._complete(stream_id, request)
            return
        oldest = next(iter(self.requests.values())) is request
        if self.held <= self.max_held or oldest:
            self.h2.acknowledge(stream_id, flow_len)
        else:  # the stream waits for its turn (bounded memory); the connection goes on
            self.h2.acknowledge(0, flow_len)
            request.unacked += flow_len
            self.unacked += flow_len
        if oldest and not request.grown and size > STREAM_WINDOW // 2:
            request.grown = True
            self.h2.open_window(stream_id, OLDEST_WINDOW - STREAM_WINDOW)

    def on_end(self, stream_id: int) -> None:
        request = self.requests.get(stream_id)
        if request is not None:
            self._complete(stream_id, request)

    def on_reset(self, stream_id: int) -> None:
        request = self.requests.get(stream_id)
        if request is not None:  # still coming: dropped (an answer in flight goes on)
            self._forget(stream_id, request)
        self.answers.drop(stream_id)
        self._check_done()

    def on_refused(self, stream_id: int, reason: str) -> None:
        self.ingress.reject(reason)

    def on_window(self) -> None:
        self.answers.on_window()

    def on_ping_ack(self, data: bytes) -> None:
        """We send no PING."""

    def on_goaway(self, last_stream_id: int) -> None:
        self.last_stream = max(self.last_stream, self.h2.highest_stream_id)
        self.goaway_sent = self.last_stream  # the client's GOAWAY: no new streams come
        self._check_done()

    # -- requests -------------------------------------------------------------------------

    def _complete(self, stream_id: int, request: _Request) -> None:
        """The request has ended: answered now if the queue takes it at once, else by a task
        that may wait for room."""
        self.requests.pop(stream_id, None)
        if request.expected is not None and request.size != request.expected:
            # RFC 9113 8.1.1: a malformed request, a stream error
            self.ingress.reject("malformed")
            self._forget(stream_id, request)
            self.h2.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        chunks = request.chunks
        if len(chunks) == 1:
            body = chunks[0]
        elif not chunks:
            body = b""
        elif self.share.hold_nowait(self.held + request.size):  # the join, for a moment
            body = b"".join(chunks)
            request.chunks = [body]
        else:
            self._over_budget(stream_id, request)
            return
        reply = self.rules.ingest_nowait(body, request.kind, self.peer)
        if reply is not None:
            self._forget(stream_id, request)
            self.answers.respond(stream_id, reply, request.cors)
            return
        assert self.nursery is not None
        self._reopen()  # the next request is the oldest now
        self.answering[stream_id] = request
        self.nursery.start_soon(self._answer, stream_id, request, body)

    def _over_budget(self, stream_id: int, request: _Request) -> None:
        """The memory budget has no room for the request: ``503`` + ``Retry-After``."""
        self.ingress.reject("over_budget")
        self._forget(stream_id, request)
        self.answers.respond(stream_id, self.rules.over_budget, request.cors)

    def _forget(self, stream_id: int, request: _Request) -> None:
        """A request leaves (answered, refused or dropped): its bytes are no longer held, and
        the requests whose DATA waited for room are acknowledged, oldest first."""
        self.requests.pop(stream_id, None)
        self.held -= request.size
        request.size = 0
        request.chunks = []
        self.unacked -= request.unacked  # its stream is over: nothing to reopen
        request.unacked = 0
        self._reopen()

    def _reopen(self) -> None:
        """Reopen the stream windows of the requests whose DATA waited for room: the oldest
        one's always, the others' while the connection holds at most ``max_held``."""
        if not self.unacked:
            return
        for index, (waiting_id, waiting) in enumerate(self.requests.items()):
            if not waiting.unacked:
                continue
            if index and self.held > self.max_held:
                break
            self.h2.acknowledge(waiting_id, waiting.unacked, connection=False)
            self.unacked -= waiting.unacked
            waiting.unacked = 0

    async def _answer(self, stream_id: int, request: _Request, body: bytes) -> None:
        try:
            try:
                reply = await self.rules.ingest(body, request.kind, self.peer)
            finally:
                self._forget(stream_id, request)
                self.share.hold_nowait(self.held)
            self.quiet_since = trio.current_time()
            self.answers.respond(stream_id, reply, request.cors)
            await self._flush()
        finally:
            self.answering.pop(stream_id, None)  # in flight until written
            self._check_done()

    # -- answers --------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write what is queued (:meth:`Http2Answers.flush`); a client that reads nothing for
        ``idle_timeout`` is cut, counted ``too_slow``."""
        if not await self.answers.flush():
            self.ingress.reject("too_slow")
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()
            self.reading.cancel()


async def serve_http2(
    rules: IngestRules,
    stream: trio.abc.Stream,
    received: bytes,
    peer: str,
    *,
    idle_timeout: float,
    max_header_size: int,
    max_held: int,
) -> None:
    """Serve ``POST`` requests over HTTP/2 until the peer closes, goes quiet, is too slow or
    abusive, or the gateway stops (see the module docstring). ``received``: the bytes already
    read to route the connection (the preface, on cleartext)."""
    with rules.ingress.budget.connection() as share:
        connection = _Http2Connection(
            rules,
            stream,
            peer,
            share,
            idle_timeout=idle_timeout,
            max_header_size=max_header_size,
            max_held=max_held,
        )
        await connection.run(received)
