"""The server side of one HTTP/2 connection carrying gRPC calls, sans-IO (h11's shape).

:class:`GrpcProtocol` is fed the bytes a client sent (:meth:`~GrpcProtocol.receive_data`) and
returns what happened, as events (:mod:`._events`); what the server must write is taken with
:attr:`~GrpcProtocol.data_to_send`. It validates each request (method, content type, path,
bearer token, ``grpc-encoding``, ``grpc-timeout``) and answers a bad one itself, keeps each
call's state (:class:`~._calls.Call`: gRPC message framing, flow control, compression) and
frames the answers (response headers, DATA, trailers) with HPACK blocks encoded once per
process. It counts what the bytes say is wrong through ``reject(reason)``; what the clock says
(idle, too slow) is the I/O layer's business (``_connection``), as are tasks and waiting.

HTTP/2 itself is :mod:`.._http2` (our own, sans-IO, shared with the HTTP source's HTTP/2
path): it parses a read's frames in one pass and calls this class back (the
:class:`~.._http2.Listener` methods ``on_*``); a DATA frame's payload
goes straight into its call. This class also keeps the bounds on partial work: bytes held per
connection (:attr:`ServerLimits.connection_budget`), and when each call's partial message
began, so the I/O layer can cut one that takes too long (PINGs reset nothing here).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_timeout, encode_grpc_message, encode_metadata

from ..._wire import GRPC_CONTENT_TYPE
from .._http2 import ErrorCode, Http2Error, Http2Server, StreamClosed, encode_headers
from ._calls import Call, CompressedCall, StreamReset
from ._events import (
    CallStarted,
    ConnectionBroken,
    Event,
    PeerGoingAway,
    PingAcked,
    WindowOpened,
)
from ._limits import ServerLimits

if TYPE_CHECKING:
    import h2.connection

__all__ = (
    "DRAIN_PING",
    "MAX_STREAM_ID",
    "GrpcProtocol",
    "answer_unavailable",
    "header_value",
)

MAX_STREAM_ID = 2**31 - 1
DRAIN_PING = b"tgdrain!"
ACCEPT_ENCODING = "identity,deflate,gzip"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""zlib's window bits per ``grpc-encoding``: gzip's wrapper, and zlib's (RFC 1950) for
"deflate", as grpc-core and grpc-java write it."""


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK "literal header field without indexing, new name" (RFC 7541 6.2.2), no Huffman:
    it leaves both sides' dynamic tables alone, so it can be sent beside h2's encoder."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# The constant header blocks of a successful call, encoded once: ":status: 200" is static
# entry 8 (0x88); "content-type" is static entry 31, sent as a literal without indexing;
# "grpc-accept-encoding" says which compressed requests we take (doc/compression.md).
_CONTENT_TYPE_BLOCK = b"\x0f\x10" + bytes((len(GRPC_CONTENT_TYPE),)) + GRPC_CONTENT_TYPE.encode()
RESPONSE_HEADERS_BLOCK = (
    b"\x88" + _CONTENT_TYPE_BLOCK + _literal(b"grpc-accept-encoding", ACCEPT_ENCODING.encode())
)
OK_TRAILERS_BLOCK = _literal(b"grpc-status", b"0")
OK_TRAILERS_ONLY_BLOCK = RESPONSE_HEADERS_BLOCK + OK_TRAILERS_BLOCK

_UNAVAILABLE_HEADERS = (
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-status", b"%d" % Status.UNAVAILABLE.value),
    (b"grpc-message", encode_grpc_message("too many connections").encode("ascii")),
)


def answer_unavailable(h2conn: h2.connection.H2Connection, stream_id: int) -> None:
    """A trailers-only response: ``UNAVAILABLE``, "too many connections" (for a connection
    the server has no room for, ``sources._base.refuse_http2``)."""
    h2conn.send_headers(stream_id, _UNAVAILABLE_HEADERS, end_stream=True)


_WINDOW_OPENED = WindowOpened()
_PING_ACKED = PingAcked()
_PEER_GOING_AWAY = PeerGoingAway()


class GrpcProtocol:
    """One connection's HTTP/2 and gRPC state, fed bytes, producing events and bytes.

    ``routes`` maps a method path to its handler; ``authorized(path, authorization)`` checks
    a request's bearer token; ``reject(reason)`` counts a refusal; ``clock`` is the time in
    seconds (the I/O layer's clock). The connection preface (our SETTINGS and connection
    window) is queued at once.

    Bounds: a frame at most ``limits.max_frame_size`` and a header block at most
    ``max_header_list_size`` (plus a little) are buffered; at most ``max_concurrent_streams``
    streams open and ``2 * max_concurrent_streams`` calls in progress (more are refused with
    REFUSED_STREAM); at most ``limits.connection_budget`` bytes held in the calls of the connection
    (messages not taken, partial messages, inflated batches).
    """

    def __init__(
        self,
        limits: ServerLimits,
        *,
        routes: Mapping[str, Handler],
        authorized: Callable[[str, str | None], bool] = lambda path, authorization: True,
        reject: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.routes = routes
        self.authorized = authorized
        self.reject = reject
        self.clock = clock
        self.release_threshold = limits.stream_window // 4
        self.budget = limits.connection_budget
        """The most :attr:`held` may grow to: ``limits.connection_budget``, or less when the
        I/O layer sets it to what the gateway's memory budget has room for."""
        self.held = 0
        """Bytes held in this connection's calls (see :attr:`ServerLimits.connection_budget`)."""
        self.inflate_refused_at: int | None = None
        """The room (:attr:`budget` - :attr:`held`) in which a compressed message last failed
        to inflate for want of room: a message is not inflated again in as little room
        (inflating up to the room and failing costs the CPU of the whole room, and a
        connection of bomblets would pay it per message: ``CompressedCall._inflate``)."""
        self.calls: dict[int, Call] = {}
        """Calls whose handler is not done (:meth:`end_call`), by stream id."""
        self.partial: dict[Call, float] = {}
        """Calls holding part of a message, with when that message began (oldest first)."""
        self.activity = 0
        """Counts HEADERS and DATA received: what PINGs and SETTINGS do not move."""
        self.last_stream_id: int | None = None
        """Set once a final GOAWAY is sent or received: later streams are refused."""
        self._events: list[Event] = []
        self._h2 = Http2Server(
            self,
            max_concurrent_streams=limits.max_concurrent_streams,
            stream_window=limits.stream_window,
            connection_window=limits.connection_window,
            max_frame_size=limits.max_frame_size,
            max_header_list_size=limits.max_header_list_size,
            max_resets=limits.max_resets,
            reset_window=limits.reset_window,
            clock=clock,
        )
        self._output = self._h2.output

    # -- input ------------------------------------------------------------------------------

    @property
    def stalled_bytes(self) -> int:
        """Bytes received since the last read that completed a frame (and left no header
        block open): never more than ``limits.stall_limit``."""
        return self._h2.stalled_bytes

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the client; return what they did, in order.

        Raises :class:`ConnectionBroken` (a GOAWAY queued, the refusal counted) when the
        bytes are not HTTP/2 or break its rules or a connection limit.
        """
        events: list[Event] = []
        self._events = events
        try:
            self._h2.receive_data(data)
        except Http2Error as exc:
            self.last_stream_id = self._h2.highest_stream_id
            self.reject(exc.reason)
            raise ConnectionBroken(f"HTTP/2 error: {exc}", exc.reason) from exc
        return events

    # the Listener methods: called by Http2Server while it parses a read

    def on_data(self, stream_id: int, data: bytes, flow_len: int, end: bool) -> None:
        self.activity += 1
        call = self.calls.get(stream_id)
        if call is None:
            self._h2.acknowledge(stream_id, flow_len)
            return
        events = self._events
        if call.feed(data, flow_len) or end:
            if end:
                call.end()
            if not events or events[-1] is not call.changed:
                events.append(call.changed)

    def on_request(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        self.activity += 1
        call = self._on_request(stream_id, headers)
        if call is not None:
            self._events.append(CallStarted(call))
            if end:
                call.end()

    def on_end(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.end()
            events = self._events
            if not events or events[-1] is not call.changed:
                events.append(call.changed)

    def on_reset(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is not None:
            call.on_reset()
            self._events.append(call.changed)

    def on_refused(self, stream_id: int, reason: str) -> None:
        self.reject(reason)

    def on_window(self) -> None:
        events = self._events
        if not events or events[-1] is not _WINDOW_OPENED:
            events.append(_WINDOW_OPENED)

    def on_ping_ack(self, data: bytes) -> None:
        if data == DRAIN_PING:
            self._events.append(_PING_ACKED)

    def on_goaway(self, last_stream_id: int) -> None:
        if self.last_stream_id is None:
            self.last_stream_id = self._h2.highest_stream_id
        self._events.append(_PEER_GOING_AWAY)

    def _on_request(self, stream_id: int, headers: list[tuple[str, str]]) -> Call | None:
        """Validate a request's headers: its call, or None when it was answered here."""
        if (self.last_stream_id is not None and stream_id > self.last_stream_id) or len(
            self.calls
        ) >= 2 * self.limits.max_concurrent_streams:
            self._h2.refuse_stream(stream_id)
            return None
        method = path = content_type = timeout_value = encoding = authorization = None
        for key, value in headers:
            if key == ":path":
                path = value
            elif key == ":method":
                method = value
            elif key == "content-type":
                content_type = value
            elif key == "grpc-timeout":
                timeout_value = value
            elif key == "grpc-encoding":
                encoding = value
            elif key == "authorization":
                authorization = value
        if method != "POST":
            self._send_final(stream_id, [(":status", "405")])
            return None
        if content_type is None or not content_type.startswith("application/grpc"):
            self._refuse(stream_id, Status.UNKNOWN, "content-type must be application/grpc", "415")
            return None
        path = path or ""
        handler = self.routes.get(path)
        if handler is None:
            self._refuse(stream_id, Status.UNIMPLEMENTED, f"method not found: {path or None}")
            return None
        if not self.authorized(path, authorization):
            self.reject("unauthorized")
            self._refuse(stream_id, Status.UNAUTHENTICATED, "missing or invalid bearer token")
            return None
        wbits = 0
        if encoding is not None and encoding != "identity":
            wbits = _WBITS.get(encoding, 0)
            if not wbits:
                self._refuse(
                    stream_id,
                    Status.UNIMPLEMENTED,
                    f"grpc-encoding {encoding} is not supported (supported: {ACCEPT_ENCODING})",
                    accept_encoding=True,
                )
                return None
        timeout = None
        if timeout_value is not None:
            try:
                timeout = decode_timeout(timeout_value)
            except ValueError:
                self._refuse(stream_id, Status.INTERNAL, "malformed grpc-timeout")
                return None
        call = (
            Call(self, stream_id, path, headers, handler, timeout)
            if not wbits
            else CompressedCall(self, stream_id, path, headers, handler, timeout, wbits)
        )
        self.calls[stream_id] = call
        return call

    def _refuse(
        self,
        stream_id: int,
        status: Status,
        message: str,
        http: str = "200",
        *,
        accept_encoding: bool = False,
    ) -> None:
        headers = [(":status", http), ("content-type", GRPC_CONTENT_TYPE)]
        if accept_encoding:
            headers.append(("grpc-accept-encoding", ACCEPT_ENCODING))
        headers.append(("grpc-status", str(status.value)))
        headers.append(("grpc-message", encode_grpc_message(message)))
        self._send_final(stream_id, headers)

    def _send_final(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        """Answer a request with ``headers`` that end its stream; if the client is still
        sending, tell it to stop (RFC 9113 section 8.1)."""
        h2 = self._h2
        h2.send_headers(stream_id, encode_headers(headers), end_stream=True)
        h2.reset_stream(stream_id, ErrorCode.NO_ERROR)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Give ``size`` received bytes back to the client's windows (in bulk)."""
        self._h2.acknowledge(stream_id, size)

    def end_call(self, call: Call) -> None:
        """The handler is done: release the call's flow control and bytes, and forget it."""
        call.release_all()
        call.discharge()
        self.partial.pop(call, None)
        del self.calls[call.stream_id]

    # -- the bounds on partial work ---------------------------------------------------------

    def over_budget(self, call: Call) -> None:
        """The connection holds more than its budget: ``call``, which asked for more, ends
        RESOURCE_EXHAUSTED (``over_budget``) and lets go of what it held."""
        self.reject("over_budget")
        call.fail(self.budget_error())
        self._events.append(call.changed)

    def budget_error(self) -> GRPCError:
        """The error of a call refused for want of room: the connection's own budget, or
        less when the I/O layer lowered :attr:`budget` to what the gateway's has room for."""
        if self.budget < self.limits.connection_budget:
            message = "the gateway's memory budget has no room for this connection's partial work"
        else:
            message = f"the connection holds more than its {self.budget} bytes of partial work"
        return GRPCError(Status.RESOURCE_EXHAUSTED, message)

    def overdue(self, started_before: float) -> list[Call]:
        """Cut the calls whose partial message began before ``started_before`` (counted
        ``too_slow``; they end DEADLINE_EXCEEDED and their streams are reset); return them."""
        cut = []
        for call, since in self.partial.items():
            if since >= started_before:
                break  # oldest first
            cut.append(call)
        for call in cut:
            self.reject("too_slow")
            call.fail(GRPCError(Status.DEADLINE_EXCEEDED, "a message took too long to arrive"))
        return cut

    def oldest_partial(self) -> float | None:
        """When the oldest partial message began, or None."""
        for since in self.partial.values():
            return since
        return None

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the client, in order (``b""`` when nothing is)."""
        out = self._output
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def pending_output(self) -> int:
        """How many bytes :meth:`data_to_send` would return now."""
        return len(self._output)

    def send_headers(self, call: Call, metadata: Any = None) -> None:
        """The response headers (with ``metadata``, custom initial metadata)."""
        block = RESPONSE_HEADERS_BLOCK
        if metadata:
            block += encode_headers(encode_metadata(metadata))
        try:
            self._h2.send_headers(call.stream_id, block)
        except StreamClosed as exc:
            raise StreamReset(str(exc)) from exc
        call.headers_sent = True

    def send_window(self, call: Call) -> int:
        """How many bytes of DATA may go to the call now (both windows, one frame)."""
        try:
            return self._h2.send_window(call.stream_id)
        except StreamClosed as exc:
            raise StreamReset(str(exc)) from exc

    def send_data(self, call: Call, data: bytes | memoryview) -> None:
        """One DATA frame that :meth:`send_window` allows."""
        try:
            self._h2.send_data(call.stream_id, data)
        except StreamClosed as exc:
            raise StreamReset(str(exc)) from exc

    def finish(
        self, call: Call, status: Status, message: str | None = None, metadata: Any = None
    ) -> None:
        """Send the trailers (or a trailers-only response); the call is over for the client.
        Nothing if it was already finished or reset."""
        if call.trailers_sent or call.reset:
            return
        call.trailers_sent = True
        if status is Status.OK and not message and not metadata:
            block = OK_TRAILERS_BLOCK if call.headers_sent else OK_TRAILERS_ONLY_BLOCK
        else:
            block = b"" if call.headers_sent else RESPONSE_HEADERS_BLOCK
            headers = [("grpc-status", str(status.value))]
            if message:
                headers.append(("grpc-message", encode_grpc_message(message)))
            if metadata:
                headers.extend(encode_metadata(metadata))
            block += encode_headers(headers)
        h2 = self._h2
        try:
            h2.send_headers(call.stream_id, block, end_stream=True)
        except StreamClosed:
            return  # reset meanwhile: nobody is left to tell
        if not call.ended:
            # The client is still sending: tell it to stop (RFC 9113 section 8.1).
            h2.reset_stream(call.stream_id, ErrorCode.NO_ERROR)

    def goaway(self, last_stream_id: int, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue a GOAWAY frame (streams up to ``last_stream_id`` keep running)."""
        self._h2.goaway(last_stream_id, error_code)

    def refuse_connection(self, error_code: int, debug: bytes = b"") -> None:
        """Final GOAWAY with ``error_code`` (and ``debug`` data): no stream past the highest
        one opened is served."""
        self.last_stream_id = self._h2.highest_stream_id
        self._h2.goaway(self.last_stream_id, error_code, debug)

    def start_drain(self) -> None:
        """Graceful shutdown, first half: GOAWAY(max stream id) and a PING whose answer
        (:class:`PingAcked`) says the client has seen it; then :meth:`refuse_connection`."""
        self.goaway(MAX_STREAM_ID)
        self._h2.ping(DRAIN_PING)

    def fail_all(self) -> list[Call]:
        """The connection is gone: every call in progress is reset."""
        calls = list(self.calls.values())
        for call in calls:
            call.on_reset()
        return calls


def header_value(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name``, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
