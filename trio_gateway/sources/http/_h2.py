"""The HTTP source's HTTP/2 path: :class:`IngestRules` over h2's state machine, on the Trio
stream (cleartext with prior knowledge, or TLS with ALPN ``h2``).

Served here rather than through hypercorn, which cannot be told what a hostile peer needs
(docs/http.md has the figures): it acknowledges request bodies as they come, so a connection
holds up to 100 bodies of ``max_message_size`` each; it has no deadline on a body or a header
block that PINGs do not reset; it counts no rapid reset; and its ``keep_alive_max_requests``
closes h2's state machine while a request is in flight, which then is never answered. Here:

* a request (head and body) must be complete within ``idle_timeout`` of its first frame, and
  a frame or header block within ``idle_timeout`` of its first byte (:class:`FrameScanner`);
  PINGs, SETTINGS and WINDOW_UPDATE extend neither, nor the idle deadline of a connection with
  no request. Past it: the slow requests get ``408``, ``GOAWAY(ENHANCE_YOUR_CALM)``,
  ``too_slow``; a quiet connection gets ``GOAWAY(NO_ERROR)`` (counted ``idle_timeout`` if it
  never sent a request, as on HTTP/1.1);
* the body bytes a connection holds (being received or waiting for the queue) are bounded by
  ``max_held`` plus one request and one flow-control window: past ``max_held`` only the
  oldest request's DATA is acknowledged, so it can finish while the others wait;
* more than :data:`MAX_RESETS` streams reset by the client within :data:`RESET_WINDOW`
  seconds ends the connection with ``GOAWAY(ENHANCE_YOUR_CALM)``, counted ``rapid_reset``;
* a connection is never recycled by request count; where one ends (shutdown, a deadline, an
  attack) the ``GOAWAY`` is written by hand, so h2's state machine stays open for the requests
  in flight, and names the last stream that was or will be processed; streams after it get
  ``REFUSED_STREAM`` (never processed: safe to retry).
"""

from __future__ import annotations

import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .._base import connection_errors, linger
from ._h2scan import FrameScanner, ResetWindow
from ._rules import BodyKind, Headers, IngestRules, Reply

__all__ = ("MAX_RESETS", "MAX_STREAMS", "RESET_WINDOW", "serve_http2")

_log = logging.getLogger("trio_gateway.sources.http")

MAX_STREAMS = 100
"""Requests open at once on one connection (``SETTINGS_MAX_CONCURRENT_STREAMS``)."""
MAX_RESETS = 200
"""Streams a client may reset within :data:`RESET_WINDOW` seconds (rapid reset)."""
RESET_WINDOW = 1.0
MAX_RECV = 64 * 1024
LINGER_SECONDS = 2.0
"""At most this long (and ``idle_timeout``) the last answers and GOAWAY get to be read."""
_MAX_STREAM_ID = 2**31 - 1


class _Request:
    """A request whose head has come: its body so far, and when it began."""

    __slots__ = ("chunks", "cors", "kind", "size", "started", "unacked")

    def __init__(self, started: float, kind: BodyKind, cors: Headers) -> None:
        self.started = started
        self.kind = kind
        self.cors = cors
        self.chunks: list[bytes] = []
        self.size = 0
        self.unacked = 0  # flow-controlled bytes received and not yet acknowledged


class _Http2Connection:
    def __init__(
        self,
        rules: IngestRules,
        stream: trio.abc.Stream,
        peer: str,
        *,
        idle_timeout: float,
        max_header_size: int,
        max_held: int,
    ) -> None:
        self.rules = rules
        self.stream = stream
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.max_held = max_held
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_size,
            },
        )
        self.scanner = FrameScanner()
        self.resets = ResetWindow(MAX_RESETS, RESET_WINDOW)
        self.requests: dict[int, _Request] = {}  # receiving, oldest first
        self.answering: dict[int, _Request] = {}  # complete, waiting for the queue
        self.unsent: dict[int, bytes] = {}  # answers' bodies waiting for the client's window
        self.held = 0  # body bytes in requests and answering
        self.last_stream = 0  # the highest stream processed or to be processed
        self.goaway_sent: int | None = None  # last stream named by our GOAWAY
        self.extra = b""  # frames written by hand, after h2's
        self.partial_since: float | None = None
        self.quiet_since = trio.current_time()
        self.send_lock = trio.Lock()
        self.reading = trio.CancelScope()
        self.reader: trio.lowlevel.Task | None = None
        self.done = trio.Event()  # nothing in flight after a GOAWAY

    # -- the connection's life ------------------------------------------------------------

    async def run(self, received: bytes) -> None:
        self.h2.initiate_connection()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._stop_when_stopping)
                with self.reading:
                    await self._read(received)
                if self.goaway_sent is not None:
                    await self.done.wait()  # the answers in flight (bounded by queue_wait)
                nursery.cancel_scope.cancel()
            await self._flush()
            # so that the GOAWAY is read, not lost to the reset of a close with unread bytes
            with trio.move_on_after(min(self.idle_timeout, LINGER_SECONDS)):
                await linger(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _read(self, data: bytes) -> None:
        ingress = self.rules.ingress
        self.reader = trio.lowlevel.current_task()
        while True:
            if data:
                if not self._receive(data):
                    return
                await self._flush()
                if self.done.is_set():
                    return
            deadline, reason = self._deadline()
            with trio.move_on_at(deadline):
                data = bytes(await self.stream.receive_some(MAX_RECV))
                if not data:
                    return  # the client closed its side
                continue
            if reason == "idle_timeout":
                if not self.last_stream:  # as on HTTP/1.1: counted if it never sent a request
                    ingress.reject("idle_timeout")
                self._goaway(ErrorCodes.NO_ERROR)
            else:
                self._too_slow()
            return

    def _receive(self, data: bytes) -> bool:
        """Feed what the client sent; False once the connection is to end."""
        scanner = self.scanner
        before = scanner.resets
        scanner.feed(data)
        now = trio.current_time()
        if scanner.resets > before and self.resets.add(scanner.resets - before, now):
            self.rules.ingress.reject("rapid_reset")
            connection_errors.info(
                "%s: %s: more than %d streams reset within %.0f s: closed",
                self.rules.ingress.listener,
                self.peer,
                MAX_RESETS,
                RESET_WINDOW,
            )
            self._drop_partial()
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            return False
        if not scanner.partial:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = now
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.rules.ingress.reject("malformed")
            connection_errors.info(
                "%s: bad HTTP/2 from %s: %r", self.rules.ingress.listener, self.peer, exc
            )
            return False  # h2 wrote its GOAWAY
        for event in events:
            self._on_event(event, now)
        return True

    def _deadline(self) -> tuple[float, str]:
        """When the connection is next due, and what it is then: ``too_slow`` (a request or a
        frame begun) or ``idle_timeout`` (no request at all)."""
        starts = []
        if self.requests:
            starts.append(next(iter(self.requests.values())).started)
        if self.partial_since is not None:
            starts.append(self.partial_since)
        if starts:
            return min(starts) + self.idle_timeout, "too_slow"
        if self.answering or self.goaway_sent is not None:
            return float("inf"), ""  # the gateway's turn (or shutdown's grace period)
        return self.quiet_since + self.idle_timeout, "idle_timeout"

    def _too_slow(self) -> None:
        ingress = self.rules.ingress
        ingress.reject("too_slow")
        connection_errors.info(
            "%s: %s: request not complete within %.0f s",
            ingress.listener,
            self.peer,
            self.idle_timeout,
        )
        for stream_id, request in list(self.requests.items()):
            self._release(stream_id, request)
            self._respond(stream_id, self.rules.too_slow, request.cors, reset=True)
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)

    async def _stop_when_stopping(self) -> None:
        """Shutdown: ``GOAWAY(NO_ERROR)`` naming the streams received so far, which are
        finished within the grace period (``serve_connections`` cancels the rest)."""
        await self.rules.ingress.wait_stopping()
        self.last_stream = max(self.last_stream, self.h2.highest_inbound_stream_id)
        self._goaway(ErrorCodes.NO_ERROR)
        await self._flush()

    def _goaway(self, code: ErrorCodes) -> None:
        """A ``GOAWAY`` written by hand, so that h2's state machine stays open for the
        requests in flight (h2's own would refuse their answers)."""
        if self.goaway_sent is not None and code == ErrorCodes.NO_ERROR:
            return
        self.goaway_sent = self.last_stream
        frame = GoAwayFrame(0, last_stream_id=self.last_stream, error_code=code)
        self.extra += frame.serialize()
        if code != ErrorCodes.NO_ERROR:
            self._drop_partial()
        self._check_done()

    def _drop_partial(self) -> None:
        """Requests still being received will not be processed: ``REFUSED_STREAM``."""
        for stream_id, request in list(self.requests.items()):
            self._release(stream_id, request)
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)

    def _check_done(self) -> None:
        """After a GOAWAY, once nothing is in flight: stop reading (the reader itself returns
        by its own loop, so that what it has queued is written first)."""
        if self.goaway_sent is not None and not self.requests and not self.answering:
            self.done.set()
            if trio.lowlevel.current_task() is not self.reader:
                self.reading.cancel()

    # -- h2's events ----------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event, now)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            request = self.requests.pop(event.stream_id, None)
            if request is not None:
                self.answering[event.stream_id] = request
                self.quiet_since = now
                self.nursery.start_soon(self._answer, event.stream_id, request)
        elif isinstance(event, h2.events.StreamReset):
            request = self.requests.get(event.stream_id)
            if request is not None:  # still coming: dropped (an answer in flight goes on)
                self._release(event.stream_id, request)
            self.unsent.pop(event.stream_id, None)
            self._check_done()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream_id in list(self.unsent):
                self._send_body(stream_id, self.unsent.pop(stream_id))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.last_stream = max(self.last_stream, self.h2.highest_inbound_stream_id)
            self.goaway_sent = self.last_stream  # the client's GOAWAY: no new streams come
            self._check_done()

    def _on_request(self, event: h2.events.RequestReceived, now: float) -> None:
        stream_id = event.stream_id
        if self.goaway_sent is not None and stream_id > self.goaway_sent:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: not processed
            return
        self.last_stream = max(self.last_stream, stream_id)
        self.quiet_since = now
        method = path = b""
        headers = event.headers or []
        for name, value in headers:
            if name == b":method":
                method = bytes(value)
            elif name == b":path":
                path = bytes(value)
        pairs = [(bytes(name), bytes(value)) for name, value in headers]
        rules = self.rules
        cors = rules.cors_headers(pairs)
        refusal, kind = rules.head(method, path, pairs)
        if refusal is not None:
            self._respond(stream_id, refusal, cors, reset=not event.stream_ended)
            return
        self.requests[stream_id] = _Request(now, kind, cors)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        length = event.flow_controlled_length
        request = self.requests.get(stream_id)
        if request is None:  # answered already (a refusal): read and discarded
            self._acknowledge(stream_id, length)
            return
        data = event.data
        request.size += len(data)
        self.held += len(data)
        if request.size > self.rules.max_body_size:
            self._release(stream_id, request)
            self._acknowledge(stream_id, length)
            self._respond(stream_id, self.rules.body_too_large(), request.cors, reset=True)
            return
        request.chunks.append(data)
        if self.held <= self.max_held or request is next(iter(self.requests.values())):
            self._acknowledge(stream_id, length)
        else:
            request.unacked += length  # the client waits for its window (bounded memory)

    def _acknowledge(self, stream_id: int, length: int) -> None:
        try:
            self.h2.acknowledge_received_data(length, stream_id)
        except h2.exceptions.StreamClosedError:
            pass  # closed meanwhile: nothing to open the window of

    def _release(self, stream_id: int, request: _Request) -> None:
        """A request leaves (answered, refused or dropped): its bytes are no longer held, and
        the requests whose DATA waited for room are acknowledged, oldest first."""
        self.requests.pop(stream_id, None)
        self.held -= request.size
        request.chunks = []
        for index, (waiting_id, waiting) in enumerate(self.requests.items()):
            if not waiting.unacked:
                continue
            if index and self.held > self.max_held:
                break
            self._acknowledge(waiting_id, waiting.unacked)
            waiting.unacked = 0

    # -- answers --------------------------------------------------------------------------

    async def _answer(self, stream_id: int, request: _Request) -> None:
        body = b"".join(request.chunks)
        request.chunks = [body]
        try:
            try:
                reply = await self.rules.ingest(body, request.kind, self.peer)
            finally:
                self._release(stream_id, request)
            self.quiet_since = trio.current_time()
            self._respond(stream_id, reply, request.cors, reset=False)
            await self._flush()
        finally:
            self.answering.pop(stream_id, None)  # in flight until written
            self._check_done()

    def _respond(self, stream_id: int, reply: Reply, cors: Headers, *, reset: bool) -> None:
        """Send ``reply`` on ``stream_id``; with ``reset``, the request is still coming and is
        then reset with ``NO_ERROR`` ("stop sending, the answer is final", RFC 9113 8.1)."""
        headers = [(b":status", b"%d" % reply.status), *reply.headers, *cors]
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not reply.body)
        except h2.exceptions.H2Error:
            return  # the client reset it meanwhile
        if reply.body:
            self._send_body(stream_id, reply.body)
        if reset:
            self._reset(stream_id, ErrorCodes.NO_ERROR)

    def _send_body(self, stream_id: int, body: bytes) -> None:
        """As much of ``body`` as the client's windows let through; the rest waits for its
        WINDOW_UPDATE (an answer is small: at most :data:`MAX_STREAMS` of them wait)."""
        h2conn = self.h2
        try:
            room = min(h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size)
            if room >= len(body):
                h2conn.send_data(stream_id, body, end_stream=True)
                return
            if room > 0:
                h2conn.send_data(stream_id, body[:room])
            self.unsent[stream_id] = body[room:]
        except h2.exceptions.H2Error:
            self.unsent.pop(stream_id, None)  # reset or closed meanwhile

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.H2Error:
            pass  # closed already

    async def _flush(self) -> None:
        """Write what h2 and :meth:`_goaway` have queued, in order. Shielded: bytes taken from
        h2 are written whole or the connection is dead, so a cancellation (the connection
        ending) waits for a write in progress, at most ``idle_timeout``. A client that does
        not read stops this connection's reading too (bounded output); one that reads
        nothing for ``idle_timeout`` is cut (``too_slow``)."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.idle_timeout) as stalled:
                async with self.send_lock:
                    data = self.h2.data_to_send() + self.extra
                    self.extra = b""
                    if data:
                        await self.stream.send_all(data)
        if stalled.cancelled_caught:
            self.rules.ingress.reject("too_slow")
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
    connection = _Http2Connection(
        rules,
        stream,
        peer,
        idle_timeout=idle_timeout,
        max_header_size=max_header_size,
        max_held=max_held,
    )
    await connection.run(received)
