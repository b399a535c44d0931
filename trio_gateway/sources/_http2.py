"""The server side of HTTP/2 (RFC 9113), sans-IO: frames, streams, flow control, HPACK blocks.

One cohesive state machine (connection and stream states, flow control, header blocks, the
reset limit share the same frame loop), hence its length: split, each part would need the
others' state.

:class:`Http2Server` is fed the client's bytes (:meth:`~Http2Server.receive_data`) and calls
its :class:`Listener` for what they mean; what the server writes accumulates in
:attr:`~Http2Server.output`. Two servers stand on it: the gRPC source (``sources.grpc``) and
the HTTP source's HTTP/2 path (``sources.http._h2``, ``POST /ingest``). It is the part of
HTTP/2 they need, and no more: no server push, no priorities (PRIORITY frames are read and
ignored), no outbound HPACK dynamic table (every header block we send is literals without
indexing, so a block can be encoded once and reused; the first block starts with a
table-size update to 0, so no later SETTINGS change of the client's table size needs
signalling).

Why our own: ``h2`` builds an event object, a frame object and a flags set per frame, runs two
state machines and formats the frame for its trace log, about 20 us of CPU for a DATA frame
carrying one 18-byte gRPC message, which is how grpcio, grpc-go and grpc-java send a stream,
and about a quarter of the CPU of a unary h2c request. Here one pass over a read parses every
frame header with ``struct``, accounts flow control, and hands each DATA payload straight to
the listener; the WINDOW_UPDATEs a read earns go out once, at its end. HPACK decoding is the
``hpack`` package's (public API), with a cache for repeated blocks that leave the dynamic
table alone (a unary client sends the same indexed block for every call).

Limits: a frame longer than our ``SETTINGS_MAX_FRAME_SIZE`` is refused from its header, before
its body is buffered; a header block (HEADERS + CONTINUATION) is at most ``max_header_block``
bytes and 64 frames; a stream past ``max_concurrent_streams`` is refused (REFUSED_STREAM) and
the connection lives; more than ``max_resets`` streams reset within ``reset_window`` seconds
(the client's RST_STREAM on a stream still open here, or our refusals: CVE-2023-44487, "rapid
reset") end the connection with GOAWAY(ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Protocol

import hpack
from hpack import HPACKError, OversizedHeaderListError

__all__ = (
    "OVER_BUDGET",
    "PREFACE",
    "ErrorCode",
    "Http2Error",
    "Http2Server",
    "Listener",
    "StreamClosed",
    "encode_headers",
    "frame",
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

OVER_BUDGET = (
    b"over_budget_evicted: the gateway's memory budget is full"
    b" and this connection held bytes longest"
)
"""The debug data of the GOAWAY(ENHANCE_YOUR_CALM) that closes a connection the memory budget
cut (``over_budget_evicted``): a client's log then says why."""

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MAX_CONTINUATIONS = 64

_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


class ErrorCode:
    """HTTP/2 error codes (RFC 9113 section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Http2Error(Exception):
    """The client broke HTTP/2 or a connection limit: a GOAWAY with ``code`` is queued and
    nothing more is read. ``reason`` is the rejection reason to count."""

    def __init__(self, message: str, code: int, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class StreamClosed(Exception):
    """Nothing more can be sent on this stream (it was reset, or we ended it)."""


class Listener(Protocol):
    """What :class:`Http2Server` reports, synchronously, while it parses a read."""

    def on_request(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        """A new stream's request headers (``end``: END_STREAM came with them)."""

    def on_data(self, stream_id: int, data: bytes, flow_len: int, end: bool) -> None:
        """A DATA frame's payload (padding removed; ``flow_len`` counts it, and the listener
        must :meth:`~Http2Server.acknowledge` that many bytes some day)."""

    def on_end(self, stream_id: int) -> None:
        """END_STREAM without data (on trailers)."""

    def on_reset(self, stream_id: int) -> None:
        """The stream is over before its end: the client's RST_STREAM, or a stream error."""

    def on_refused(self, stream_id: int, reason: str) -> None:
        """A new stream was refused (REFUSED_STREAM sent) and why."""

    def on_window(self) -> None:
        """Send windows grew (WINDOW_UPDATE or SETTINGS)."""

    def on_ping_ack(self, data: bytes) -> None:
        """The client answered a PING of ours."""

    def on_goaway(self, last_stream_id: int) -> None:
        """The client sent GOAWAY."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialized frame."""
    size = len(payload)
    return _HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer (RFC 7541 5.1) with ``first``'s high bits in the first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """An HPACK block of "literal header field without indexing, new name" (RFC 7541 6.2.2),
    no Huffman: it changes neither side's dynamic table, so it can be cached and reused.
    Names and values are bytes, or text encoded as UTF-8; names must be lowercase."""
    parts: list[bytes] = []
    for name, value in headers:
        raw_name = name if isinstance(name, bytes) else name.encode("utf-8")
        raw_value = value if isinstance(value, bytes) else value.encode("utf-8")
        parts += (
            b"\x00",
            _integer(len(raw_name), 7, 0),
            raw_name,
            _integer(len(raw_value), 7, 0),
            raw_value,
        )
    return b"".join(parts)


class _Stream:
    __slots__ = ("in_pending", "in_window", "local_closed", "out_window", "remote_closed")

    def __init__(self, in_window: int, out_window: int, remote_closed: bool) -> None:
        self.in_window = in_window
        self.in_pending = 0  # acknowledged bytes not yet given back in a WINDOW_UPDATE
        self.out_window = out_window
        self.remote_closed = remote_closed
        self.local_closed = False


class Http2Server:
    """One server connection's HTTP/2 state, fed bytes, reporting to a :class:`Listener`."""

    def __init__(
        self,
        listener: Listener,
        *,
        max_concurrent_streams: int,
        stream_window: int,
        connection_window: int,
        max_frame_size: int,
        max_header_list_size: int,
        max_resets: int,
        reset_window: float,
        clock: Callable[[], float],
    ) -> None:
        self._listener = listener
        self._on_data = listener.on_data
        self.max_concurrent_streams = max_concurrent_streams
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_list_size + 1024  # as ServerLimits.stall_limit
        self._stream_window = stream_window
        # until the client acknowledges our SETTINGS it may assume RFC 9113's default window
        self._initial_in_window = DEFAULT_WINDOW
        self._settings_acked = False
        self._conn_window = connection_window
        self._in_window = connection_window
        self._in_pending = 0
        self._out_window = DEFAULT_WINDOW
        self.remote_max_frame_size = 16384
        self._remote_initial_window = DEFAULT_WINDOW
        self.streams: dict[int, _Stream] = {}
        """Streams not yet closed both ways, by id."""
        self.highest_stream_id = 0
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._decoded: dict[bytes, list[tuple[str, str]]] = {}
        self._table_mark: tuple[int, int, object] = (0, 0, None)
        self._max_resets = max_resets
        self._reset_window = reset_window
        self._clock = clock
        self._resets = 0
        self._resets_since = clock()
        self._preface = True
        self._first_frame = True
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = len(PREFACE)
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_stream = 0
        self._block_end = False
        self._in_receive = False
        self._progressed = False
        self._first_block = True
        self._dirty: set[int] = set()
        self.output = bytearray()
        """What the server must write, in order; the caller takes and clears it."""
        settings = b"".join(
            _SETTING.pack(code, value)
            for code, value in (
                (SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, stream_window),
                (SETTINGS_MAX_FRAME_SIZE, max_frame_size),
                (SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size),
                (SETTINGS_ENABLE_PUSH, 0),
            )
        )
        self.output += frame(SETTINGS, 0, 0, settings)
        if connection_window > DEFAULT_WINDOW:
            self.output += frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window - DEFAULT_WINDOW))
        else:
            self._in_window = DEFAULT_WINDOW

    @property
    def partial_bytes(self) -> int:
        """Bytes received that complete no frame yet (plus an unfinished header block)."""
        return self._pending_size + self._block_size

    @property
    def stalled_bytes(self) -> int:
        """:attr:`partial_bytes` if the last read completed no frame, or left a header
        block open; else 0 (a busy connection's reads often end inside a frame)."""
        return 0 if self._progressed else self._pending_size + self._block_size

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Parse what the client sent; the listener hears of each complete frame, in order.

        Raises :class:`Http2Error` (with a GOAWAY queued) when it breaks the protocol.
        """
        if type(data) is not bytes:
            data = bytes(data)  # (a TLS stream's bytearray): payloads are handed on as bytes
        self._progressed = False
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return
            data = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        self._in_receive = True
        try:
            pos = self._parse(data)
        except Http2Error as exc:
            self.goaway(self.highest_stream_id, exc.code)
            raise
        finally:
            self._in_receive = False
        self._progressed = pos > 0 and not self._block_stream
        rest = len(data) - pos
        if rest:
            self._pending = [data[pos:] if pos else data]
            self._pending_size = rest
        self._send_window_updates()

    def _parse(self, data: bytes) -> int:
        pos = 0
        end = len(data)
        if self._preface:
            if end < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise Http2Error("not an HTTP/2 preface", ErrorCode.PROTOCOL_ERROR, "malformed")
                self._need = len(PREFACE)
                return 0
            if not data.startswith(PREFACE):
                raise Http2Error("not an HTTP/2 preface", ErrorCode.PROTOCOL_ERROR, "malformed")
            self._preface = False
            pos = len(PREFACE)
        unpack = _HEADER.unpack_from
        max_size = self.max_frame_size
        streams = self.streams
        on_data = self._on_data
        while end - pos >= 9:
            high, low, kind, flags, stream_id = unpack(data, pos)
            length = (high << 16) | low
            if length > max_size:
                raise Http2Error(
                    f"a frame of {length} bytes (SETTINGS_MAX_FRAME_SIZE {max_size})",
                    ErrorCode.FRAME_SIZE_ERROR,
                    "oversize",
                )
            stop = pos + 9 + length
            if stop > end:
                self._need = 9 + length
                return pos
            stream_id &= 0x7FFFFFFF
            if kind == DATA and not self._block_stream:
                # the fast path: most frames of a busy connection
                stream = streams.get(stream_id)
                if (
                    stream is not None
                    and not flags & (PADDED | END_STREAM)
                    and not stream.remote_closed
                    and length <= stream.in_window
                    and length <= self._in_window
                ):
                    self._in_window -= length
                    stream.in_window -= length
                    on_data(stream_id, data[pos + 9 : stop], length, False)
                else:
                    self._data(stream_id, flags, data[pos + 9 : stop])
            else:
                self._frame(kind, flags, stream_id, data[pos + 9 : stop])
            pos = stop
        self._need = 9
        return pos

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._first_frame:
            if kind != SETTINGS or flags & ACK:
                raise Http2Error(
                    "the client's preface must start with SETTINGS",
                    ErrorCode.PROTOCOL_ERROR,
                    "malformed",
                )
            self._first_frame = False
        if self._block_stream and kind != CONTINUATION:
            raise Http2Error("a header block interrupted", ErrorCode.PROTOCOL_ERROR, "malformed")
        if kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if stream_id != self._block_stream or not stream_id:
                raise Http2Error(
                    "CONTINUATION without its HEADERS", ErrorCode.PROTOCOL_ERROR, "malformed"
                )
            self._add_fragment(payload)
            if flags & END_HEADERS:
                self._end_block()
        elif kind == DATA:
            self._data(stream_id, flags, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise Http2Error("bad PING", ErrorCode.PROTOCOL_ERROR, "malformed")
            if flags & ACK:
                self._listener.on_ping_ack(payload)
            else:
                self.output += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if stream_id or len(payload) < 8:
                raise Http2Error("bad GOAWAY", ErrorCode.PROTOCOL_ERROR, "malformed")
            self._listener.on_goaway(_U32.unpack_from(payload)[0] & 0x7FFFFFFF)
        elif kind == PRIORITY:
            if not stream_id or len(payload) != 5:
                raise Http2Error("bad PRIORITY", ErrorCode.PROTOCOL_ERROR, "malformed")
        elif kind == PUSH_PROMISE:
            raise Http2Error("a client cannot push", ErrorCode.PROTOCOL_ERROR, "malformed")
        # any other type is an extension we do not know: ignored (RFC 9113 section 5.5)

    def _strip_padding(self, flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise Http2Error("bad padding", ErrorCode.PROTOCOL_ERROR, "malformed")
            payload = payload[1 : len(payload) - payload[0]]
        return payload

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        length = len(payload)
        if not stream_id:
            raise Http2Error("DATA on stream 0", ErrorCode.PROTOCOL_ERROR, "malformed")
        if length > self._in_window:
            raise Http2Error(
                "DATA past the connection window", ErrorCode.FLOW_CONTROL_ERROR, "malformed"
            )
        self._in_window -= length
        data = self._strip_padding(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream_id:
                raise Http2Error("DATA on an idle stream", ErrorCode.PROTOCOL_ERROR, "malformed")
            self.acknowledge(0, length)  # a stream we closed: give the connection window back
            return
        if stream.remote_closed or length > stream.in_window:
            self.acknowledge(0, length)
            code = ErrorCode.STREAM_CLOSED if stream.remote_closed else ErrorCode.FLOW_CONTROL_ERROR
            self._stream_error(stream_id, code)
            return
        stream.in_window -= length
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
            if stream.local_closed:
                del self.streams[stream_id]
        self._on_data(stream_id, data, length, end)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise Http2Error("HEADERS on stream 0", ErrorCode.PROTOCOL_ERROR, "malformed")
        payload = self._strip_padding(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise Http2Error("bad HEADERS priority", ErrorCode.PROTOCOL_ERROR, "malformed")
            payload = payload[5:]
        self._block_stream = stream_id
        self._block_end = bool(flags & END_STREAM)
        self._block_size = 0
        self._block = []
        self._add_fragment(payload)
        if flags & END_HEADERS:
            self._end_block()

    def _add_fragment(self, fragment: bytes) -> None:
        self._block.append(fragment)
        self._block_size += len(fragment)
        if self._block_size > self.max_header_block or len(self._block) > MAX_CONTINUATIONS:
            raise Http2Error(
                f"a header block over {self.max_header_block} bytes or {MAX_CONTINUATIONS} frames",
                ErrorCode.ENHANCE_YOUR_CALM,
                "oversize",
            )

    def _end_block(self) -> None:
        stream_id, end = self._block_stream, self._block_end
        block = self._block[0] if len(self._block) == 1 else b"".join(self._block)
        self._block_stream = 0
        self._block = []
        self._block_size = 0
        headers = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: gRPC clients send none, but they end the stream
            if not end or stream.remote_closed:
                self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR)
                return
            stream.remote_closed = True
            if stream.local_closed:
                del self.streams[stream_id]
            self._listener.on_end(stream_id)
            return
        if stream_id <= self.highest_stream_id:
            return  # a stream closed here (reset): its late headers are decoded and dropped
        if not stream_id & 1:
            raise Http2Error(
                "an even stream id from a client", ErrorCode.PROTOCOL_ERROR, "malformed"
            )
        self.highest_stream_id = stream_id
        if len(self.streams) >= self.max_concurrent_streams:
            self.output += frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM))
            self._listener.on_refused(stream_id, "too_many_streams")
            self._count_reset()
            return
        self.streams[stream_id] = _Stream(self._initial_in_window, self._remote_initial_window, end)
        self._listener.on_request(stream_id, headers, end)

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        """HPACK-decode a block; a block seen before that left the table alone (indexed
        fields and literals without indexing only) is answered from a cache."""
        table = self._decoder.header_table
        entries = table.dynamic_entries
        mark = (len(entries), table.maxsize, entries[0] if entries else None)
        if mark == self._table_mark:
            cached = self._decoded.get(block)
            if cached is not None:
                return cached
        else:
            self._decoded.clear()
        try:
            headers = [(str(k), str(v)) for k, v in self._decoder.decode(block)]
        except OversizedHeaderListError as exc:  # an HPACK bomb: small block, huge list
            raise Http2Error(
                f"a header list over {self._decoder.max_header_list_size} bytes",
                ErrorCode.ENHANCE_YOUR_CALM,
                "oversize",
            ) from exc
        except (HPACKError, UnicodeDecodeError, IndexError, ValueError) as exc:
            raise Http2Error(
                f"bad header block: {exc!r}", ErrorCode.COMPRESSION_ERROR, "malformed"
            ) from exc
        after = (len(entries), table.maxsize, entries[0] if entries else None)
        self._table_mark = after
        if after == mark and len(self._decoded) < 64:
            self._decoded[block] = headers
        return headers

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if not stream_id or len(payload) != 4:
            raise Http2Error("bad RST_STREAM", ErrorCode.PROTOCOL_ERROR, "malformed")
        if stream_id > self.highest_stream_id:
            raise Http2Error("RST_STREAM on an idle stream", ErrorCode.PROTOCOL_ERROR, "malformed")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self._dirty.discard(stream_id)
        if not stream.local_closed:
            self._count_reset()
        self._listener.on_reset(stream_id)
        self._listener.on_window()

    def _count_reset(self) -> None:
        """Rapid reset: at most ``max_resets`` streams reset per ``reset_window`` seconds."""
        self._resets += 1
        if self._resets > self._max_resets:
            now = self._clock()
            if now - self._resets_since >= self._reset_window:
                self._resets = 1
                self._resets_since = now
            else:
                raise Http2Error(
                    f"more than {self._max_resets} streams reset within {self._reset_window} s",
                    ErrorCode.ENHANCE_YOUR_CALM,
                    "rapid_reset",
                )

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise Http2Error("bad WINDOW_UPDATE", ErrorCode.FRAME_SIZE_ERROR, "malformed")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise Http2Error("WINDOW_UPDATE of 0", ErrorCode.PROTOCOL_ERROR, "malformed")
            self._out_window += increment
            if self._out_window > MAX_WINDOW:
                raise Http2Error(
                    "connection window overflow", ErrorCode.FLOW_CONTROL_ERROR, "malformed"
                )
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.highest_stream_id:
                    raise Http2Error(
                        "WINDOW_UPDATE on an idle stream", ErrorCode.PROTOCOL_ERROR, "malformed"
                    )
                return
            stream.out_window += increment
            if not increment or stream.out_window > MAX_WINDOW:
                code = ErrorCode.PROTOCOL_ERROR if not increment else ErrorCode.FLOW_CONTROL_ERROR
                self._stream_error(stream_id, code)
                return
        self._listener.on_window()

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id or len(payload) % 6 or (flags & ACK and payload):
            raise Http2Error("bad SETTINGS", ErrorCode.PROTOCOL_ERROR, "malformed")
        if flags & ACK:
            if not self._settings_acked:
                self._settings_acked = True
                delta = self._stream_window - self._initial_in_window
                self._initial_in_window = self._stream_window
                for stream in self.streams.values():
                    stream.in_window += delta
            return
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise Http2Error(
                        "SETTINGS_INITIAL_WINDOW_SIZE too large",
                        ErrorCode.FLOW_CONTROL_ERROR,
                        "malformed",
                    )
                delta = value - self._remote_initial_window
                self._remote_initial_window = value
                for stream in self.streams.values():
                    stream.out_window += delta
                    if stream.out_window > MAX_WINDOW:
                        raise Http2Error(
                            "stream window overflow", ErrorCode.FLOW_CONTROL_ERROR, "malformed"
                        )
            elif code == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise Http2Error(
                        "bad SETTINGS_MAX_FRAME_SIZE", ErrorCode.PROTOCOL_ERROR, "malformed"
                    )
                self.remote_max_frame_size = value
            elif code == SETTINGS_ENABLE_PUSH and value > 1:
                raise Http2Error("bad SETTINGS_ENABLE_PUSH", ErrorCode.PROTOCOL_ERROR, "malformed")
        self.output += frame(SETTINGS, ACK, 0)
        self._listener.on_window()

    def _stream_error(self, stream_id: int, code: int) -> None:
        """Reset one stream (RFC 9113 section 5.4.2); the connection lives."""
        self.reset_stream(stream_id, code)
        self._listener.on_reset(stream_id)

    # -- flow control of what we receive ------------------------------------------------------

    def acknowledge(self, stream_id: int, size: int, *, connection: bool = True) -> None:
        """``size`` received bytes are consumed: give them back to the client's windows (the
        stream's too unless ``stream_id`` is 0 or closed; the connection's unless
        ``connection`` is false, for bytes whose connection window was given back earlier).
        WINDOW_UPDATEs go out in bulk: at the end of the read being parsed, once a quarter
        window has piled up, or when the client's window runs low."""
        if size <= 0:
            return
        if connection:
            self._in_pending += size
        stream = self.streams.get(stream_id) if stream_id else None
        if stream is not None and not stream.remote_closed:
            stream.in_pending += size
            self._dirty.add(stream_id)
        if not self._in_receive:
            self._send_window_updates()

    def open_window(self, stream_id: int, increment: int) -> None:
        """Let the client send ``increment`` bytes more on an open stream than its window
        allows now (a WINDOW_UPDATE at once): a larger window for one stream than the
        initial one every stream gets."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed or increment <= 0:
            return
        increment = min(increment, MAX_WINDOW - stream.in_window)
        stream.in_window += increment
        self.output += frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))

    def _send_window_updates(self) -> None:
        threshold = self._conn_window >> 2
        pending = self._in_pending
        if pending and (pending >= threshold or self._in_window < threshold):
            self.output += frame(WINDOW_UPDATE, 0, 0, _U32.pack(pending))
            self._in_window += pending
            self._in_pending = 0
        if self._dirty:
            threshold = self._stream_window >> 2
            for stream_id in self._dirty:
                stream = self.streams.get(stream_id)
                if stream is None or stream.remote_closed:
                    continue
                pending = stream.in_pending
                if pending >= threshold or stream.in_window < threshold:
                    self.output += frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(pending))
                    stream.in_window += pending
                    stream.in_pending = 0
            self._dirty = {
                s for s in self._dirty if s in self.streams and self.streams[s].in_pending
            }

    # -- output -----------------------------------------------------------------------------

    def _open_stream(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosed(f"stream {stream_id} is closed")
        return stream

    def send_headers(self, stream_id: int, block: bytes, *, end_stream: bool = False) -> None:
        """A HEADERS frame (and CONTINUATIONs past the client's frame size) with an HPACK
        ``block`` from :func:`encode_headers` or cached; raises :class:`StreamClosed`."""
        stream = self._open_stream(stream_id)
        if self._first_block:
            self._first_block = False
            block = b"\x20" + block  # dynamic table size update: 0
        flags = END_STREAM if end_stream else 0
        size = self.remote_max_frame_size
        if len(block) <= size:
            self.output += frame(HEADERS, flags | END_HEADERS, stream_id, block)
        else:
            chunks = [block[i : i + size] for i in range(0, len(block), size)]
            self.output += frame(HEADERS, flags, stream_id, chunks[0])
            for chunk in chunks[1:-1]:
                self.output += frame(CONTINUATION, 0, stream_id, chunk)
            self.output += frame(CONTINUATION, END_HEADERS, stream_id, chunks[-1])
        if end_stream:
            self._close_local(stream_id, stream)

    def send_window(self, stream_id: int) -> int:
        """How many bytes of DATA may go on the stream now (both windows, one frame)."""
        stream = self._open_stream(stream_id)
        return min(stream.out_window, self._out_window, self.remote_max_frame_size)

    def send_data(
        self, stream_id: int, data: bytes | memoryview, *, end_stream: bool = False
    ) -> None:
        """One DATA frame that :meth:`send_window` allows (``end_stream``: the last of the
        response, which then has no trailers); raises :class:`StreamClosed`."""
        stream = self._open_stream(stream_id)
        size = len(data)
        stream.out_window -= size
        self._out_window -= size
        flags = END_STREAM if end_stream else 0
        self.output += _HEADER.pack(size >> 16, size & 0xFFFF, DATA, flags, stream_id)
        self.output += data
        if end_stream:
            self._close_local(stream_id, stream)

    def _close_local(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM: the stream is over both ways (nothing if it already is)."""
        if self.streams.pop(stream_id, None) is not None:
            self._dirty.discard(stream_id)
            self.output += frame(RST_STREAM, 0, stream_id, _U32.pack(code))

    def refuse_stream(self, stream_id: int) -> None:
        """Refuse a stream the listener will not serve (REFUSED_STREAM: safe to retry)."""
        self.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
        self._count_reset()

    def goaway(
        self, last_stream_id: int, code: int = ErrorCode.NO_ERROR, debug: bytes = b""
    ) -> None:
        """A GOAWAY frame; the streams up to ``last_stream_id`` go on. ``debug``: the
        frame's additional debug data, what the client may log (e.g. :data:`OVER_BUDGET`)."""
        payload = _U32.pack(last_stream_id) + _U32.pack(code) + debug
        self.output += frame(GOAWAY, 0, 0, payload)

    def ping(self, data: bytes) -> None:
        self.output += frame(PING, 0, 0, data)
