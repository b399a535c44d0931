"""The server side of one HTTP/2 connection carrying gRPC calls, sans-IO (h11's shape).

:class:`GrpcProtocol` is fed the bytes a client sent (:meth:`~GrpcProtocol.receive_data`) and
returns what happened, as events; what the server must write is taken with
:attr:`~GrpcProtocol.data_to_send`. It validates each request (method, content type, path,
bearer token, ``grpc-encoding``, ``grpc-timeout``) and answers a bad one itself, keeps each
call's state (:class:`~._calls.Call`: gRPC message framing, flow control, compression) and
frames the answers (response headers, DATA, trailers) with HPACK blocks encoded once per
process. It counts what the bytes say is wrong through ``reject(reason)``; what the clock says
(idle, too slow) is the I/O layer's business (``_connection``), as are tasks and waiting.

HTTP/2 itself is ``h2``'s state machine, through :mod:`._h2shim`. Everything the client sends
goes in through :meth:`~GrpcProtocol.receive_data`, so a faster parser of DATA frames can take
over there without the I/O layer or the handlers noticing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import h2.config
import h2.events
import h2.exceptions
import h2.settings
import hpack
from grpclib.const import Handler, Status
from grpclib.metadata import decode_timeout, encode_grpc_message, encode_metadata
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from ..._errors import ProtocolError
from ..._wire import GRPC_CONTENT_TYPE
from ._calls import Call, CallChanged, CompressedCall, StreamReset
from ._h2shim import ShimmedH2Connection
from ._limits import ServerLimits

__all__ = (
    "DRAIN_PING",
    "MAX_STREAM_ID",
    "CallStarted",
    "ConnectionBroken",
    "Event",
    "GrpcProtocol",
    "PeerGoingAway",
    "PingAcked",
    "WindowOpened",
    "answer_unavailable",
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
RESPONSE_HEADERS = (
    (":status", "200"),
    ("content-type", GRPC_CONTENT_TYPE),
    ("grpc-accept-encoding", ACCEPT_ENCODING),
)

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


class ConnectionBroken(ProtocolError):
    """The client broke HTTP/2 or a connection limit; a GOAWAY is queued and the refusal
    counted under ``reason``. Nothing more is read from it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CallStarted:
    """Event: a valid request's headers came; ``call`` is its state."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def __repr__(self) -> str:
        return f"CallStarted(stream_id={self.call.stream_id}, path={self.call.path!r})"


class WindowOpened:
    """Event: the client opened a flow-control window (or reset a stream): blocked sends
    may go on."""

    __slots__ = ()


class PingAcked:
    """Event: the client answered the drain PING (:data:`DRAIN_PING`)."""

    __slots__ = ()


class PeerGoingAway:
    """Event: the client sent GOAWAY: finish the calls in progress, then close."""

    __slots__ = ()


Event = CallStarted | CallChanged | WindowOpened | PingAcked | PeerGoingAway
_WINDOW_OPENED = WindowOpened()
_PING_ACKED = PingAcked()
_PEER_GOING_AWAY = PeerGoingAway()


class GrpcProtocol:
    """One connection's HTTP/2 and gRPC state, fed bytes, producing events and bytes.

    ``routes`` maps a method path to its handler; ``authorized(path, authorization)`` checks
    a request's bearer token; ``reject(reason)`` counts a refusal. The connection preface
    (our SETTINGS and connection window) is queued at once.

    Bounds: bytes that complete no frame (a trickled preface or header block) at most
    ``limits.stall_limit`` (:class:`ConnectionBroken`, ``oversize``, past it); at most
    ``2 * max_concurrent_streams`` calls in progress (more are refused); per call, one
    partial message of ``max_message_size`` plus the complete messages the stream window let
    in.
    """

    def __init__(
        self,
        limits: ServerLimits,
        *,
        routes: Mapping[str, Handler],
        authorized: Callable[[str, str | None], bool] = lambda path, authorization: True,
        reject: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.limits = limits
        self.routes = routes
        self.authorized = authorized
        self.reject = reject
        self.release_threshold = limits.stream_window // 4
        self.calls: dict[int, Call] = {}
        """Calls whose handler is not done (:meth:`end_call`), by stream id."""
        self.last_stream_id: int | None = None
        """Set once a final GOAWAY is sent or received: later streams are refused."""
        self._stalled_bytes = 0
        # outbound headers are ours (metadata is validated by grpclib.metadata): skip the
        # re-validation, which costs as much as the rest of a unary call's header handling
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2conn = ShimmedH2Connection(config=config)
        h2conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            },
        )
        h2conn.max_inbound_frame_size = limits.max_frame_size
        h2conn.initiate_connection()
        if limits.connection_window > 65535:
            h2conn.increment_flow_control_window(limits.connection_window - 65535)
        # h2's own methods, bound once: called after every step of every call
        self.data_to_send: Callable[[], bytes] = h2conn.data_to_send
        """Everything queued for the client, in order (``b""`` when nothing is)."""
        self.pending_output: Callable[[], int] = h2conn.pending_output
        """How many bytes :attr:`data_to_send` would return now."""

    # -- input ------------------------------------------------------------------------------

    @property
    def stalled_bytes(self) -> int:
        """Bytes received since the last that completed a frame (a partial frame, preface or
        header block): never more than ``limits.stall_limit``."""
        return self._stalled_bytes

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the client; return what they did, in order.

        Raises :class:`ConnectionBroken` (a GOAWAY queued, the refusal counted) when the
        bytes are not HTTP/2 or break its rules or :attr:`~ServerLimits.stall_limit`.
        """
        h2conn = self._h2
        before = h2conn.pending_output()
        try:
            h2_events = h2conn.receive_data(data)
        except (h2.exceptions.ProtocolError, hpack.HPACKError, UnicodeDecodeError) as exc:
            self.reject("malformed")
            if h2conn.pending_output() == before:  # no GOAWAY from h2 (a bad preface)
                self.goaway(h2conn.highest_inbound_stream_id, ErrorCodes.PROTOCOL_ERROR)
            raise ConnectionBroken(f"HTTP/2 error: {exc}", "malformed") from exc
        if h2_events or h2conn.pending_output() > before:
            self._stalled_bytes = 0
        else:
            self._stalled_bytes += len(data)
            if self._stalled_bytes > self.limits.stall_limit:
                self.refuse_connection(ErrorCodes.FRAME_SIZE_ERROR)
                self.reject("oversize")
                raise ConnectionBroken(
                    f"{self._stalled_bytes} bytes complete no HTTP/2 frame", "oversize"
                )
        events: list[Event] = []
        calls = self.calls
        for event in h2_events:
            if isinstance(event, h2.events.DataReceived):
                call = calls.get(event.stream_id)
                if call is None:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                elif call.feed(event.data, event.flow_controlled_length) and (
                    not events or events[-1] is not call.changed
                ):
                    events.append(call.changed)
            elif isinstance(event, h2.events.RequestReceived):
                call = self._on_request(event)
                if call is not None:
                    events.append(CallStarted(call))
            elif isinstance(event, h2.events.StreamEnded):
                call = calls.get(event.stream_id)
                if call is not None:
                    call.end()
                    if not events or events[-1] is not call.changed:
                        events.append(call.changed)
            elif isinstance(event, h2.events.StreamReset):
                call = calls.get(event.stream_id)
                if call is not None:
                    call.on_reset()
                    events.append(call.changed)
                events.append(_WINDOW_OPENED)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                if not events or events[-1] is not _WINDOW_OPENED:
                    events.append(_WINDOW_OPENED)
            elif isinstance(event, h2.events.PingAckReceived):
                if event.ping_data == DRAIN_PING:
                    events.append(_PING_ACKED)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.last_stream_id = h2conn.highest_inbound_stream_id
                events.append(_PEER_GOING_AWAY)
        return events

    def _on_request(self, event: h2.events.RequestReceived) -> Call | None:
        """Validate a request's headers: its call, or None when it was answered here."""
        stream_id = event.stream_id
        if (self.last_stream_id is not None and stream_id > self.last_stream_id) or len(
            self.calls
        ) >= 2 * self.limits.max_concurrent_streams:
            self._send_final(stream_id, None)
            return None
        # header_encoding="utf-8" (see __init__) makes h2 hand us str pairs
        headers = cast("list[tuple[str, str]]", event.headers or [])
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

    def _send_final(self, stream_id: int, headers: list[tuple[str, str]] | None) -> None:
        """Answer a request with ``headers`` that end its stream, or refuse it (None:
        RST_STREAM REFUSED_STREAM). Nothing if h2 cannot send any more: a GOAWAY from the
        client in the same read as the request closes h2's side of the connection."""
        try:
            if headers is None:
                self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            else:
                self._h2.send_headers(stream_id, headers, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Give ``size`` received bytes back to the client's windows (if it still listens)."""
        try:
            self._h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:  # the connection is closed (the client's GOAWAY)
            pass

    def end_call(self, call: Call) -> None:
        """The handler is done: release the call's flow control and forget it."""
        call.release_all()
        del self.calls[call.stream_id]

    # -- output -----------------------------------------------------------------------------

    def send_headers(self, call: Call, metadata: Any = None) -> None:
        """The response headers (with ``metadata``, custom initial metadata)."""
        h2conn = self._h2
        try:
            if metadata or not h2conn.send_encoded_headers(
                call.stream_id, RESPONSE_HEADERS_BLOCK, end_stream=False
            ):
                headers = list(RESPONSE_HEADERS)
                if metadata:
                    headers.extend(encode_metadata(metadata))
                h2conn.send_headers(call.stream_id, headers)
        except h2.exceptions.ProtocolError as exc:  # the stream or the connection is closed
            raise StreamReset(f"stream {call.stream_id} is closed: {exc}") from exc
        call.headers_sent = True

    def send_window(self, call: Call) -> int:
        """How many bytes of DATA may go to the call now (both windows, one frame)."""
        try:
            window = self._h2.local_flow_control_window(call.stream_id)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {call.stream_id} is closed") from exc
        return min(window, self._h2.max_outbound_frame_size)

    def send_data(self, call: Call, data: bytes | memoryview) -> None:
        """One DATA frame that :meth:`send_window` allows."""
        try:
            self._h2.send_data_frame(call.stream_id, data)
        except h2.exceptions.ProtocolError as exc:  # the connection is closed (GOAWAY)
            raise StreamReset(f"stream {call.stream_id} is closed: {exc}") from exc

    def finish(
        self, call: Call, status: Status, message: str | None = None, metadata: Any = None
    ) -> None:
        """Send the trailers (or a trailers-only response); the call is over for the client.
        Nothing if it was already finished or reset."""
        if call.trailers_sent or call.reset:
            return
        call.trailers_sent = True
        h2conn = self._h2
        try:
            simple = status is Status.OK and not message and not metadata
            block = OK_TRAILERS_BLOCK if call.headers_sent else OK_TRAILERS_ONLY_BLOCK
            if not simple or not h2conn.send_encoded_headers(
                call.stream_id, block, end_stream=True
            ):
                headers = [] if call.headers_sent else list(RESPONSE_HEADERS)
                headers.append(("grpc-status", str(status.value)))
                if message:
                    headers.append(("grpc-message", encode_grpc_message(message)))
                if metadata:
                    headers.extend(encode_metadata(metadata))
                h2conn.send_headers(call.stream_id, headers, end_stream=True)
            if not call.ended:
                # The client is still sending: tell it to stop (RFC 9113 section 8.1).
                h2conn.reset_stream(call.stream_id, ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            # the stream is closed, or the whole connection (h2 closes it at the client's
            # GOAWAY): nobody is left to tell
            return

    def goaway(self, last_stream_id: int, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Queue a GOAWAY frame without closing h2's state machine (streams keep running)."""
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code)
        self._h2.append_output(frame.serialize())

    def refuse_connection(self, error_code: int) -> None:
        """Final GOAWAY with ``error_code``: no stream past the highest one opened is served."""
        self.last_stream_id = self._h2.highest_inbound_stream_id
        self.goaway(self.last_stream_id, error_code)

    def start_drain(self) -> None:
        """Graceful shutdown, first half: GOAWAY(max stream id) and a PING whose answer
        (:class:`PingAcked`) says the client has seen it; then :meth:`refuse_connection`."""
        self.goaway(MAX_STREAM_ID)
        try:
            self._h2.ping(DRAIN_PING)
        except h2.exceptions.ProtocolError:  # the client already sent GOAWAY: no answer
            pass

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
