"""The HTTP/2 load generators of :mod:`bench._clients`: unary gRPC, h2c and streaming gRPC.

A minimal client side of HTTP/2 on a blocking socket (preface, settings, flow control, HPACK
blocks built before the clock starts), and the wire patterns of the clients people use:
grpcio's unary calls, curl's h2c requests, grpc-go's one DATA frame per message. See
:mod:`bench._clients` for the protocol with the runner.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence

from ._clients import DISTINCT, blocks, connect, distinct_payloads

# -- HTTP/2: gRPC and h2c -----------------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MAX_WINDOW = (1 << 31) - 1
CLIENT_MAX_FRAME = 16384
"""The largest DATA frame grpc-go and grpcio send, whatever the server allows."""
GRPC_WRITE = 32 * 1024
"""grpc-go's default write buffer: frames that queue up while one write is under way go out
together, up to this many bytes a write."""
GRPC_USER_AGENT = b"grpc-python/1.85.3 grpc-c/58.0.0 (linux; chttp2)"

GRPC_PATHS = {
    "grpc-unary": b"/trio_gateway.v1.Gateway/Send",
    "grpc-make": b"/model.GrpcUnaryInputterService/MakeRequest",
    "grpc-stream": b"/trio_gateway.v1.Gateway/Stream",
    "grpc-frames": b"/trio_gateway.v1.Gateway/Stream",
}


def _frame(kind: int, flags: int, stream: int, body: bytes = b"") -> bytes:
    return struct.pack(">I", len(body))[1:] + struct.pack(">BBI", kind, flags, stream) + body


def grpc_headers(port: int, path: bytes) -> list[tuple[bytes, bytes]]:
    """The request headers grpcio's client sends, in its order (captured from grpcio 1.85)."""
    return [
        (b":path", path),
        (b":authority", b"127.0.0.1:%d" % port),
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-accept-encoding", b"identity, deflate, gzip"),
        (b"user-agent", GRPC_USER_AGENT),
    ]


def h2c_headers(port: int, size: int) -> list[tuple[bytes, bytes]]:
    """The request headers of ``curl --http2-prior-knowledge --data-binary @file``."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"127.0.0.1:%d" % port),
        (b":path", b"/ingest"),
        (b"user-agent", b"curl/7.88.1"),
        (b"accept", b"*/*"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % size),
    ]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def grpc_message(data: bytes, sequence: int) -> bytes:
    """``trio_gateway.v1.Message(payload=data, sequence=sequence)`` with gRPC's 5-byte prefix."""
    body = b"\x0a" + _varint(len(data)) + data + (b"\x20" + _varint(sequence) if sequence else b"")
    return b"\x00" + len(body).to_bytes(4, "big") + body


def grpc_request(data: bytes) -> bytes:
    """The talk's ``model.Request(message=data)`` with gRPC's 5-byte prefix."""
    body = b"\x0a" + _varint(len(data)) + data
    return b"\x00" + len(body).to_bytes(4, "big") + body


class H2Client:
    """The connection side of a minimal HTTP/2 client: preface, settings, flow control.

    Header blocks are HPACK-encoded once, before the clock starts, by ``hpack`` (h2's encoder)
    with its dynamic table, as grpcio, grpc-go and nghttp2 (curl) encode them: the first
    request's headers are added to the table, every later request names them by index.
    """

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.buffer = b""
        self.send_window = 65535  # the connection's, from the server's WINDOW_UPDATEs
        self.initial_window = 65535  # each new stream's, from the server's SETTINGS
        self.stream_windows: dict[int, int] = {}
        self.max_frame = 16384
        self.header_table = 4096
        self.finished: set[int] = set()
        self.failed = 0
        self.next_stream = 1
        self.got_settings = False
        self.sock.sendall(
            _PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, MAX_WINDOW))
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
        )
        self._read_until(lambda: self.got_settings)

    def header_blocks(self, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
        """``(first, every later)`` HPACK block of a request with these headers."""
        import hpack

        encoder = hpack.Encoder()
        if self.header_table < 4096:
            encoder.header_table_size = self.header_table
        return encoder.encode(headers, huffman=False), encoder.encode(headers, huffman=False)

    def _read_until(self, done: Callable[[], bool]) -> None:
        """Read and handle frames until ``done()`` is true."""
        sock = self.sock
        while not done():
            if not self._handle_buffered():
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self.buffer += data

    def _handle_buffered(self) -> bool:
        """Handle the first complete frame in the buffer; False if there is none."""
        buffer = self.buffer
        if len(buffer) < 9:
            return False
        length = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + length:
            return False
        kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big")
        self.buffer = buffer[9 + length :]
        self._handle(kind, flags, stream & 0x7FFFFFFF, buffer[9 : 9 + length])
        return True

    def _handle(self, kind: int, flags: int, stream: int, body: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(body), 6):
                key, value = struct.unpack_from(">HI", body, at)
                if key == 1:
                    self.header_table = value
                elif key == 4:
                    delta = value - self.initial_window
                    self.initial_window = value
                    for sid in self.stream_windows:
                        self.stream_windows[sid] += delta
                elif key == 5:
                    self.max_frame = value
            self.sock.sendall(_frame(SETTINGS, ACK, 0))
            self.got_settings = True
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self.send_window += increment
            elif stream in self.stream_windows:
                self.stream_windows[stream] += increment
        elif kind == PING and not flags & ACK:
            self.sock.sendall(_frame(PING, ACK, 0, body))
        elif kind in (HEADERS, DATA) and flags & END_STREAM:
            # gRPC ends a call with trailers, h2c with the response's last DATA frame. The
            # status is HPACK-coded and not decoded here: the server's count of queued
            # messages is what tells success.
            self.finished.add(stream)
        elif kind == RST_STREAM:
            self.finished.add(stream)
            self.failed += 1
        elif kind == GOAWAY:
            raise ConnectionError(f"GOAWAY from the server: {body[8:]!r}")

    @property
    def frame_limit(self) -> int:
        return min(self.max_frame, CLIENT_MAX_FRAME)

    def _send_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        """DATA frames within the windows, waiting for WINDOW_UPDATEs when they are spent."""
        view = memoryview(data)
        sendmsg = self.sock.sendmsg
        while view or end:
            room = min(self.send_window, self.stream_windows[stream], self.frame_limit)
            if room <= 0 and view:
                self._read_until(lambda: self.send_window > 0 and self.stream_windows[stream] > 0)
                continue
            chunk = view[:room]
            view = view[room:]
            last = end and not view
            header = struct.pack(">I", len(chunk))[1:] + struct.pack(
                ">BBI", DATA, END_STREAM if last else 0, stream
            )
            self.send_window -= len(chunk)
            self.stream_windows[stream] -= len(chunk)
            _sendall_parts(sendmsg, header, chunk)
            if last:
                return

    def _new_stream(self) -> int:
        stream = self.next_stream
        self.next_stream += 2
        self.stream_windows[stream] = self.initial_window
        return stream

    def close(self) -> None:
        try:
            self.sock.sendall(_frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
        except OSError:
            pass
        self.sock.close()


class H2UnaryClient(H2Client):
    """Unary calls (gRPC ``Send`` or ``MakeRequest``, or h2c ``POST /ingest``), ``inflight``
    at a time on one connection, each as grpcio and grpc-go send it: HEADERS and
    DATA(END_STREAM) in one write. With several in flight, the calls that answers free up are
    sent together, in one write, as a client's writer sends what queued up while it wrote."""

    def __init__(
        self,
        port: int,
        headers: list[tuple[bytes, bytes]],
        bodies: Sequence[bytes],
        count: int,
        inflight: int,
    ) -> None:
        super().__init__(port)
        self.count = count
        self.inflight = max(1, min(inflight, count))
        self.bodies = bodies
        self.first_block, self.block = self.header_blocks(headers)
        self.fits = max(map(len, bodies)) <= self.frame_limit

    def _call(self, body: bytes, out: list[bytes]) -> None:
        """Add one call's HEADERS + DATA(END_STREAM) to ``out``, if the windows take the body
        in one frame; else send ``out`` (its streams are older), then this call's HEADERS and
        its DATA as the windows allow."""
        stream = self._new_stream()
        block = self.block if self.block_used else self.first_block
        self.block_used = True
        sid = stream.to_bytes(4, "big")
        headers = len(block).to_bytes(3, "big") + bytes((HEADERS, END_HEADERS)) + sid + block
        if self.fits and len(body) <= min(self.send_window, self.stream_windows[stream]):
            self.send_window -= len(body)
            del self.stream_windows[stream]  # nothing more will be sent on it
            out.append(
                headers + len(body).to_bytes(3, "big") + bytes((DATA, END_STREAM)) + sid + body
            )
            return
        if out:
            self.sock.sendall(b"".join(out))
            out.clear()
        self.sock.sendall(headers)
        self._send_data(stream, body, end=True)
        del self.stream_windows[stream]

    block_used = False

    def send(self) -> int:
        count, finished, sock = self.count, self.finished, self.sock
        bodies = itertools.cycle(self.bodies)
        issued = done = 0
        while True:
            out: list[bytes] = []
            while issued - done < self.inflight and issued < count:
                self._call(next(bodies), out)
                issued += 1
            if out:
                sock.sendall(b"".join(out))
            if done >= count:
                return self.failed
            # Every complete frame of each read is handled before the freed calls are sent.
            while True:
                while self._handle_buffered():
                    pass
                if finished:
                    break
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self.buffer += data
            done += len(finished)
            finished.clear()


class GrpcStreamClient(H2Client):
    """One client-streaming ``Stream`` call carrying every message.

    ``frames`` (what grpc-go, grpcio and grpc-java send): one DATA frame per message (a
    message over 16 KiB spans several, as theirs do), the frames that queue up written
    together in writes of up to :data:`GRPC_WRITE` bytes, within the flow-control windows,
    then an empty DATA frame with END_STREAM (``CloseSend``). ``batched`` (this benchmark's
    first client, kept as its own row): many messages packed into each DATA frame, frames as
    large as the server allows, which no gRPC library does.
    """

    def __init__(self, mode: str, port: int, size: int, count: int, first: int) -> None:
        super().__init__(port)
        self.mode = mode
        self.count = count
        first_block, _ = self.header_blocks(grpc_headers(port, GRPC_PATHS["grpc-stream"]))
        self.headers = first_block
        messages = [grpc_message(m, 0) for m in distinct_payloads(size, count, first)]
        if mode == "batched":
            self.block, self.repeats, self.tail = blocks(messages, count)
            return
        # The frames of ``cycle`` messages, grouped into writes; ``count`` messages are
        # ``rounds`` cycles, then the first ``rest`` messages of one more.
        cycle = min(count, max(DISTINCT, GRPC_WRITE * 32 // len(messages[0])))
        self.rounds, rest = divmod(count, cycle)
        self.writes = self._writes(list(itertools.islice(itertools.cycle(messages), cycle)))
        self.tail_writes = self._writes(list(itertools.islice(itertools.cycle(messages), rest)))

    def _writes(self, messages: list[bytes]) -> list[tuple[bytes, int]]:
        """``(bytes, flow-controlled bytes)`` of each write: whole DATA frames, one message
        per frame (split at 16 KiB), up to :data:`GRPC_WRITE` bytes a write."""
        limit = self.frame_limit
        writes: list[tuple[bytes, int]] = []
        parts: list[bytes] = []
        size = counted = 0
        for message in messages:
            for at in range(0, len(message), limit):
                chunk = message[at : at + limit]
                frame = len(chunk).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + chunk
                if parts and size + len(frame) > GRPC_WRITE:
                    writes.append((b"".join(parts), counted))
                    parts, size, counted = [], 0, 0
                parts.append(frame)
                size += len(frame)
                counted += len(chunk)
        if parts:
            writes.append((b"".join(parts), counted))
        return writes

    def _write(self, stream: int, data: bytes, counted: int) -> None:
        if self.send_window < counted or self.stream_windows[stream] < counted:
            self._read_until(
                lambda: self.send_window >= counted and self.stream_windows[stream] >= counted
            )
        self.send_window -= counted
        self.stream_windows[stream] -= counted
        self.sock.sendall(data)

    def send(self) -> int:
        stream = self._new_stream()
        assert stream == 1  # the pre-built frames name stream 1
        headers = self.headers
        self.sock.sendall(_frame(HEADERS, END_HEADERS, stream, headers))
        if self.mode == "batched":
            for _ in range(self.repeats):
                self._send_data(stream, self.block, end=False)
            self._send_data(stream, self.tail, end=True)
        else:
            write = self._write
            for _ in range(self.rounds):
                for data, counted in self.writes:
                    write(stream, data, counted)
            for data, counted in self.tail_writes:
                write(stream, data, counted)
            self.sock.sendall(_frame(DATA, END_STREAM, stream))
        self._read_until(lambda: stream in self.finished)
        return self.failed


def _sendall_parts(
    sendmsg: Callable[[list[bytes | memoryview]], int], header: bytes, chunk: memoryview
) -> None:
    parts: list[bytes | memoryview] = [header, chunk]
    total = len(header) + len(chunk)
    sent = 0
    while sent < total:
        n = sendmsg(parts)
        sent += n
        if sent < total:  # a partial write: drop what went out and go on
            rest: list[bytes | memoryview] = []
            for part in parts:
                if n >= len(part):
                    n -= len(part)
                    continue
                rest.append(memoryview(part)[n:])
                n = 0
            parts = rest
