"""One gRPC connection's Trio I/O around the sans-IO :class:`~._protocol.GrpcProtocol`.

* one reader task feeds the protocol what the socket gives and acts on its events;
* one writer task sends whatever the protocol has queued, coalescing the output of every call
  that ran since it last woke (one write for many responses);
* one task per call runs the handler inside its stream's cancel scope (deadline from
  ``grpc-timeout``, cancelled by the client's RST_STREAM), except a unary call whose whole
  request came in one read and whose method has an inline handler: the reader answers it;
* one clock task: every deadline is ``idle_timeout`` after something began, and PINGs,
  SETTINGS and WINDOW_UPDATEs move none of them. A connection on which no HEADERS or DATA
  came for that long idles out (``idle_timeout``), calls waiting for their client or not,
  unless a call's handler is at work on a complete request; a partial frame or header
  block must complete in time, else the connection is cut (``too_slow``); so must a partial
  gRPC message, else its call is cut (``too_slow``, DEADLINE_EXCEEDED). A draining
  server's GOAWAYs wait for the client's PING reply.

What the calls hold (``GrpcProtocol.held``) is charged to the connection's share of the
gateway's memory budget too, per read and per batch a handler takes (:meth:`Connection.settle`),
with what bidi streams hold for the acks they owe while their reads await delivery
(:meth:`Connection.hold_answers`):
before the protocol may grow it, its bound (``GrpcProtocol.budget``) is set to what the share
has room for, so the call that would take it past is refused there (RESOURCE_EXHAUSTED,
``over_budget``), as for the connection's own budget. Refusing beats holding the window
shut: a partial message cannot complete without more bytes, and a closed connection window
would stall the connection's other calls, the ones whose messages free memory once queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ..._log import RateLimitedLogger, logger
from .._base import say_goodbye_when_cut
from .._http2 import OVER_BUDGET, ErrorCode
from .._streamio import StreamIO
from ._calls import CallChanged, CompressedCall, StreamReset
from ._events import CallStarted, ConnectionBroken, PeerGoingAway, PingAcked, WindowOpened
from ._protocol import GrpcProtocol
from ._stream import GrpcStream

if TYPE_CHECKING:
    from ..._budget import ConnectionShare
    from ._server import GrpcServer, InlineHandler

__all__ = ("Connection",)

_WRITE_HIGH_WATER = 512 * 1024
"""Outgoing bytes buffered before a producer (reader or handler) waits for the writer."""
_READ_SIZE = 256 * 1024

_log = logger.getChild("sources.grpc")
_errors = RateLimitedLogger(_log)


class Connection:
    """One HTTP/2 connection: a reader, a writer and a task per call, in one nursery."""

    def __init__(
        self, server: GrpcServer, stream: trio.abc.Stream, peer: str, share: ConnectionShare
    ) -> None:
        self.server = server
        self.peer = peer
        self._share = share
        # plain TCP on its file descriptor: a unary call costs one scheduler pass less each way
        self._io = StreamIO(stream, _READ_SIZE)
        self.proto = GrpcProtocol(
            server.limits,
            routes=server.mapping,
            authorized=server.authorized,
            reject=server.reject,
            clock=trio.current_time,
        )
        self._take_output = self.proto.data_to_send
        self._streams: dict[int, GrpcStream] = {}
        self._starting: list[tuple[GrpcStream, InlineHandler | None]] = []
        """Calls whose request headers have come and that have no task yet (see
        :meth:`_start_calls`)."""
        self._out: list[bytes] = []
        self._out_size = 0
        self._sending = 0
        self._wake_writer = trio.Event()
        self._flushed = trio.Event()
        self._window_opened = trio.Event()
        self._ping_acked = trio.Event()
        self._closing = False
        self._nursery: trio.Nursery | None = None
        self._stalled_at: float | None = None
        """When bytes began to arrive that completed no frame (None: not stalled)."""
        self._last_active = 0.0
        """When HEADERS or DATA last came, or a call ended."""
        self._answers_held = 0
        """Bytes the calls hold for answers in flight (:meth:`hold_answers`)."""

    # -- the memory budget ------------------------------------------------------------------

    def settle(self) -> None:
        """Charge the share with what the calls hold now, and bound what they may hold until
        the next settle by what the share has room for (and ``limits.connection_budget``).

        Called before and after the protocol may grow its charge (a read, a compressed batch
        inflated), in the same step, so the charge always fits: the protocol refused whatever
        would have passed the bound. Shrinking always fits."""
        share = self._share
        proto = self.proto
        share.hold_nowait(proto.held + self._answers_held)
        budget = share.budget
        proto.budget = (
            min(
                self.server.limits.connection_budget,
                budget.connection_share,
                budget.pool - budget.held + share.held,
            )
            - self._answers_held
        )

    def hold_answers(self, n: int) -> bool:
        """Charge ``n`` more bytes that a call holds for the answers it owes (a bidi stream's
        acks for reads awaiting delivery: :class:`~.._flight.Flight`); False, with nothing
        charged, if the share, the budget or ``limits.connection_budget`` has no room, or if
        the answers would pass half of the smaller of the two: the rest is for the calls'
        own messages, which the answers could otherwise leave no room."""
        limit = self.server.limits.connection_budget
        if 2 * (self._answers_held + n) > min(limit, self._share.budget.connection_share):
            return False
        held = self.proto.held + self._answers_held + n
        if held > limit or not self._share.hold_nowait(held):
            return False
        self._answers_held += n
        self.settle()
        return True

    def release_answers(self, n: int) -> None:
        """Give back ``n`` bytes charged by :meth:`hold_answers`."""
        self._answers_held -= n
        self.settle()

    # -- output -----------------------------------------------------------------------------

    def emit(self) -> None:
        """Move what the protocol has produced into the output buffer and wake the writer."""
        data = self._take_output()
        if data:
            self._out.append(data)
            self._out_size += len(data)
            self._wake_writer.set()

    def _write_now(self) -> None:
        """Write the queued output from the calling task, as much as the kernel takes; the
        writer (already woken) sends the rest, or reports the error."""
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        sent = self._io.write_nowait(data)
        if sent == len(data):
            self._out = []
            self._out_size = 0
        elif sent:
            self._out = [data[sent:]]
            self._out_size = len(data) - sent

    async def _wait_writable(self) -> None:
        while self._out_size + self._sending > _WRITE_HIGH_WATER:
            await self._flushed.wait()

    async def _writer(self) -> None:
        send_all = self._io.send_all
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                while self._out:
                    out = self._out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    self._out = []
                    self._out_size = 0
                    self._sending = len(data)
                    await send_all(data)
                    self._sending = 0
                flushed, self._flushed = self._flushed, trio.Event()
                flushed.set()
                if self._closing:
                    self._cancel()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            _errors.info(
                "%s: grpc connection from %s: send failed: %r", self.server.label, self.peer, exc
            )
            self._cancel()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _close_when_flushed(self) -> None:
        self._closing = True
        self._wake_writer.set()

    async def send_data(self, stream: GrpcStream, data: bytes) -> None:
        """Send ``data`` on the call's stream as the client's flow-control windows allow."""
        proto = self.proto
        call = stream._call
        total = len(data)
        sent = 0
        while sent < total:
            stream._check_open()
            size = min(proto.send_window(call), total - sent)
            if size <= 0:
                if self._window_opened.is_set():
                    self._window_opened = trio.Event()
                await self._window_opened.wait()
                continue
            proto.send_data(call, data if size == total else memoryview(data)[sent : sent + size])
            sent += size
            self.emit()
            if self._out_size > _WRITE_HIGH_WATER:
                await self._wait_writable()

    # -- the connection's life --------------------------------------------------------------

    async def run(self) -> None:
        say_goodbye_when_cut(self.leave_over_budget)
        self.emit()  # our preface
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._drain_on_stop)
            nursery.start_soon(self._clock)
            await self._reader()
            # The peer closed its side or broke the protocol: flush what is queued and stop.
            self._close_when_flushed()

    async def _reader(self) -> None:
        receive = self._io.receive
        proto = self.proto
        dispatch = self._dispatch
        activity = proto.activity
        try:
            while True:
                data = await receive()
                if not data:
                    return
                self.settle()
                try:
                    events = proto.receive_data(data)
                except ConnectionBroken as exc:
                    _errors.info(
                        "%s: grpc connection from %s: %s, closed",
                        self.server.label,
                        self.peer,
                        exc,
                    )
                    self.emit()
                    return
                if proto.activity != activity:
                    activity = proto.activity
                    self._last_active = trio.current_time()
                if not proto.stalled_bytes:
                    self._stalled_at = None
                elif self._stalled_at is None:
                    self._stalled_at = trio.current_time()
                for event in events:
                    dispatch(event)
                spawned = self._start_calls() if self._starting else False
                self.settle()
                self.emit()
                if self._out and not spawned and not self._sending:
                    # Everything this read asked for is answered (unary calls inline): write
                    # it now rather than waking the writer (no task started will add to it).
                    self._write_now()
                if self._out_size + self._sending > _WRITE_HIGH_WATER:
                    await self._wait_writable()  # a peer that does not read is not read
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            _errors.info(
                "%s: grpc connection from %s: receive failed: %r", self.server.label, self.peer, exc
            )
            for call in proto.fail_all():
                self._streams[call.stream_id]._changed()

    def leave_over_budget(self) -> None:
        """The memory budget cut this connection (counted ``over_budget_evicted`` there):
        GOAWAY(ENHANCE_YOUR_CALM) saying so, its calls reset (what they held let go), and
        closed once that is written (``serve_connections`` cancels it if not soon)."""
        if self._closing:
            return
        _errors.info(
            "%s: grpc connection from %s: over the memory budget, closed",
            self.server.label,
            self.peer,
        )
        proto = self.proto
        proto.refuse_connection(ErrorCode.ENHANCE_YOUR_CALM, OVER_BUDGET)
        for call in proto.fail_all():
            self._streams[call.stream_id]._changed()
        self.emit()
        self._close_when_flushed()

    def _refuse_connection(self, reason: str, error_code: int) -> None:
        """Count a connection-level refusal and queue a GOAWAY with ``error_code``; the
        reader then returns, so the connection closes once the GOAWAY is flushed."""
        if self._closing:
            return
        self.server.reject(reason)
        _errors.info(
            "%s: grpc connection from %s: %s, closed", self.server.label, self.peer, reason
        )
        self.proto.refuse_connection(error_code)
        self.emit()

    async def _drain_on_stop(self) -> None:
        """Graceful shutdown: GOAWAY(max) + PING, then GOAWAY(last) when the PING returns."""
        await self.server.wait_stopping()
        proto = self.proto
        proto.start_drain()
        self.emit()
        with trio.move_on_after(self.server.limits.drain_notice):
            await self._ping_acked.wait()
        proto.refuse_connection(ErrorCode.NO_ERROR)
        self.emit()
        if not proto.calls:
            self._close_when_flushed()

    async def _clock(self) -> None:
        """The connection's deadlines (see the module docstring), checked when the earliest
        one may have come: each is ``idle_timeout`` after its start, and starts only move
        later, so sleeping until the earliest one known never misses one."""
        timeout = self.server.limits.idle_timeout
        proto = self.proto
        self._last_active = trio.current_time()
        deadline = self._last_active + timeout
        while True:
            await trio.sleep_until(deadline)
            now = trio.current_time()
            if self._closing:
                return
            if self._stalled_at is not None and now >= self._stalled_at + timeout:
                # trickling a frame, a header block or the preface
                self._refuse_connection("too_slow", ErrorCode.ENHANCE_YOUR_CALM)
                self._close_when_flushed()
                return
            for call in proto.overdue(now - timeout):
                _errors.info(
                    "%s: grpc connection from %s: a message on stream %d took over %s s, cut",
                    self.server.label,
                    self.peer,
                    call.stream_id,
                    timeout,
                )
                self._streams[call.stream_id]._changed()
            self.emit()
            if now >= self._last_active + timeout:
                if any(call.ended and not call.cancelled for call in proto.calls.values()):
                    self._last_active = now  # a handler at work on a whole request
                else:
                    if self._stalled_at is not None:  # trickling a frame: not idle, too slow
                        self._refuse_connection("too_slow", ErrorCode.ENHANCE_YOUR_CALM)
                    else:
                        self._refuse_connection("idle_timeout", ErrorCode.NO_ERROR)
                    for call in proto.fail_all():
                        self._streams[call.stream_id]._changed()
                    self._close_when_flushed()
                    return
            deadline = self._last_active + timeout
            if self._stalled_at is not None:
                deadline = min(deadline, self._stalled_at + timeout)
            oldest = proto.oldest_partial()
            if oldest is not None:
                deadline = min(deadline, oldest + timeout)

    # -- the protocol's events --------------------------------------------------------------

    def _dispatch(self, event: Any) -> None:
        if type(event) is CallChanged:
            stream = self._streams.get(event.call.stream_id)
            if stream is not None:
                stream._changed()
        elif type(event) is CallStarted:
            call = event.call
            stream = GrpcStream(self, call)
            self._streams[call.stream_id] = stream
            inline = self.server.inline.get(call.path) if type(call) is not CompressedCall else None
            self._starting.append((stream, inline))
        elif type(event) is WindowOpened:
            self._window_opened.set()
        elif type(event) is PingAcked:
            self._ping_acked.set()
        elif type(event) is PeerGoingAway and not self.proto.calls:
            self._close_when_flushed()

    def _start_calls(self) -> bool:
        """Start the calls whose headers have come, once all the frames of the read are in.

        A call to a method with an inline handler (a unary method) is answered now if its
        whole request is here (:meth:`_answer_inline`). While none of its request has come
        (clients often write the HEADERS and the DATA frame separately), it waits for the
        next read without a task, unless it has a deadline to keep. Every other call gets a
        task. True if a task was started.
        """
        starting, self._starting = self._starting, []
        spawned = False
        assert self._nursery is not None
        for stream, inline in starting:
            if stream._call.reset:  # reset in the read that started it (rapid reset)
                self._end_call(stream)
                continue
            if inline is not None:
                if not stream._call.ready and stream.deadline is None:
                    self._starting.append((stream, inline))
                    continue
                if self._answer_inline(stream, inline):
                    continue
            self._nursery.start_soon(self._run_call, stream)
            spawned = True
        return spawned

    def _answer_inline(self, stream: GrpcStream, inline: InlineHandler) -> bool:
        """Answer a unary call without a task: the request is complete and valid, the inline
        handler returned a reply, and the client's window takes it. False, with nothing
        done, when any of that is not so: the call then runs its handler in a task, which
        answers whatever the case (an invalid message, a full queue that may yet drain...)."""
        call = stream._call
        if not call.ended or call.error is not None or call.reset or len(call.messages) != 1:
            return False
        proto = self.proto
        try:
            window = proto.send_window(call)
        except StreamReset:
            return False
        try:
            request = call.handler.request_type.FromString(call.messages[0])
        except DecodeError:
            return False
        reply = inline(stream, request)
        if reply is None:
            return False
        call.pop()
        body = reply.SerializeToString()
        data = len(body).to_bytes(5, "big") + body  # compressed flag 0, length
        if len(data) > window:
            # The client's window is nearly closed: send the reply from a task, which waits.
            assert self._nursery is not None
            self._nursery.start_soon(self._run_call, stream, reply)
            return True
        proto.send_headers(call)
        proto.send_data(call, data)
        call.message_sent = True
        self._end_call(stream)
        proto.finish(call, Status.OK)
        return True

    async def _run_call(self, stream: GrpcStream, reply: Any = None) -> None:
        """Run the call's handler (or, given ``reply``, just send it) and finish the call."""
        call = stream._call
        status, message = Status.OK, None
        scope = stream.cancel_scope
        try:
            with scope:
                if reply is None:
                    await call.handler.func(stream)
                else:
                    await stream.send_message(reply)
            if scope.cancelled_caught:
                if call.error is not None:
                    status, message = call.error.status, call.error.message
                else:
                    status, message = Status.DEADLINE_EXCEEDED, "deadline exceeded"
            elif not call.message_sent and not stream.cardinality.server_streaming:
                status, message = Status.UNKNOWN, "the handler sent no reply"
        except GRPCError as exc:
            status, message = exc.status, exc.message
        except StreamReset:
            pass
        except Exception as exc:
            _errors.warning("%s: grpc handler for %s failed: %r", self.server.label, call.path, exc)
            status, message = Status.UNKNOWN, "internal error"
        finally:
            self._end_call(stream)
        stream.finish(status, message)

    def _end_call(self, stream: GrpcStream) -> None:
        """The handler is done: release the call's flow control and forget it."""
        proto = self.proto
        proto.end_call(stream._call)
        self.settle()
        del self._streams[stream.stream_id]
        self._last_active = trio.current_time()
        if not proto.calls and proto.last_stream_id is not None:
            self._close_when_flushed()
