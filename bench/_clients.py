"""The load generators, on blocking sockets with pre-built bytes, one process each.

    python -m bench._clients TRANSPORT --port P --size BYTES --count N [--index I] [--inflight K]

``TRANSPORT`` is one of :data:`TRANSPORTS`. Every byte on the wire is built before the start
signal (``hpack``, h2's encoder, builds the HTTP/2 header blocks; the rest is the standard
library), so the client spends its time in ``send`` and ``recv`` and stays off the server's
core as much as a Python client can. What each sends is what a real client of that protocol
sends, message for message (the wire pattern), never batched further than those clients
batch; the one exception, ``grpc-stream``, is labelled as such wherever it is reported.

The protocol with the runner, one line each way: the client connects and prepares, prints
``ready``; on ``go`` it sends its ``count`` messages and prints ``sent T0 T1 REJECTED CPU``
(``time.monotonic()`` at start and end; REJECTED counts answers other than success, for the
transports whose answers it reads; CPU is this process's CPU seconds while sending, so that
the report can show the client was not what limited the run); on ``stop`` (or end of input)
it closes the connection and exits. ``--then-close`` closes right after sending instead (a
reader that runs to end of stream, like ``socat``, needs the end of stream to finish).

* tcp: newline-framed payloads written in blocks of about 1 MiB (``sendall``).
* udp: one ``send`` per datagram on a connected socket, as fast as the loop goes.
* http: ``POST /ingest`` as curl, Go's ``net/http`` and browsers send it: keep-alive, Go's
  headers, head and body in two writes, one request in flight per connection; ``--inflight
  K`` = K connections from this process.
* h2c: ``POST /ingest`` on HTTP/2 with prior knowledge, curl's headers, HEADERS +
  DATA(END_STREAM) per request; ``--inflight K`` streams at a time on the one connection.
* ws: the opening handshake, then masked binary frames in blocks of about 1 MiB.
* grpc-unary, grpc-make: unary calls to ``trio_gateway.v1.Gateway/Send`` or the talk's
  ``model.GrpcUnaryInputterService/MakeRequest`` as grpcio sends them (captured): its headers,
  HPACK with the dynamic table (8 bytes a call after the first), HEADERS + DATA(END_STREAM)
  in one write; ``--inflight K`` calls at a time on the one connection.
* grpc-frames: one client-streaming ``Stream`` call, one DATA frame per message (as grpcio,
  grpc-go and grpc-java send them), the frames written 32 KiB at a time as grpc-go's writer
  does, within the flow-control windows.
* grpc-stream: the same call with many messages packed into each DATA frame, as large as the
  server allows: no gRPC library sends this; kept as the "batched DATA frames" row.

Payloads come from :mod:`bench._payloads` (deterministic JSON of the exact size); client
``--index I`` numbers its messages from ``I * count`` so parallel clients send distinct ones.

Why not :mod:`trio_gateway.loadgen` (what ``send`` and ``bench.soak`` use): this benchmark
measures servers side by side (trio_gateway, asyncio, grpcio, uvicorn ...), so its client must
cost as little as a Python client can, and the same against each of them: no event loop,
nothing built or parsed per message while the clock runs beyond what counting the answers
needs. The load generator does the opposite on purpose (a payload per sequence number, every
answer parsed and counted, pacing, TLS and tokens), and that work would be timed as the
server's.
"""

from __future__ import annotations

import argparse
import itertools
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence

from ._payloads import payload

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench._clients")

TRANSPORTS = (
    "tcp",
    "udp",
    "http",
    "h2c",
    "ws",
    "grpc-unary",
    "grpc-make",
    "grpc-stream",
    "grpc-frames",
)
BLOCK = 1 << 20
DISTINCT = 1024


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def distinct_payloads(size: int, count: int, first: int) -> list[bytes]:
    return [payload(size, first + i) for i in range(min(count, DISTINCT))]


def blocks(frames: Sequence[bytes], count: int) -> tuple[bytes, int, bytes]:
    """``(block, repeats, tail)``: ``block * repeats + tail`` holds ``count`` frames, cycling
    through ``frames``; a block is about :data:`BLOCK` bytes (at least one frame)."""
    per_block = max(1, min(count, BLOCK // max(1, len(frames[0]))))
    cycle = itertools.cycle(frames)
    block = b"".join(itertools.islice(cycle, per_block))
    repeats, extra = divmod(count, per_block)
    tail = b"".join(itertools.islice(itertools.cycle(frames), extra))
    return block, repeats, tail


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- stream writers (tcp, ws) -------------------------------------------------------------------


def ws_frame(data: bytes, opcode: int = 0x2, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """One masked frame with FIN set (binary by default), as a client sends it (RFC 6455)."""
    n = len(data)
    first = 0x80 | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


def ws_handshake(sock: socket.socket, port: int) -> None:
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % port
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the WebSocket handshake")
        head += data
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head[:80]!r}")


class StreamClient:
    def __init__(self, transport: str, port: int, size: int, count: int, first: int) -> None:
        self.sock = connect(port)
        self.transport = transport
        messages = distinct_payloads(size, count, first)
        if transport == "ws":
            ws_handshake(self.sock, port)
            frames = [ws_frame(m) for m in messages]
        else:
            frames = [m + b"\n" for m in messages]
        self.block, self.repeats, self.tail = blocks(frames, count)

    def send(self) -> int:
        sendall = self.sock.sendall
        block = self.block
        for _ in range(self.repeats):
            sendall(block)
        if self.tail:
            sendall(self.tail)
        return 0

    def close(self) -> None:
        if self.transport == "ws":
            try:
                self.sock.sendall(ws_frame((1000).to_bytes(2, "big"), opcode=0x8))
                self.sock.settimeout(2)
                while self.sock.recv(65536):
                    pass
            except OSError:
                pass
        else:
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()


# -- udp ----------------------------------------------------------------------------------------


class UdpClient:
    def __init__(self, port: int, size: int, count: int, first: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock.connect(("127.0.0.1", port))
        self.messages = distinct_payloads(size, count, first)
        self.count = count

    def send(self) -> int:
        send = self.sock.send
        errors = 0
        for message in itertools.islice(itertools.cycle(self.messages), self.count):
            try:
                send(message)
            except OSError:  # ECONNREFUSED from an earlier ICMP, ENOBUFS: the datagram is lost
                errors += 1
        return errors

    def close(self) -> None:
        self.sock.close()


# -- http/1.1 ----------------------------------------------------------------------------------

GO_REQUEST_HEAD = (
    b"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: %d\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
)
"""The request head Go's ``net/http`` sends for ``http.Post(url, "application/json", body)``."""


def _response_end(buffer: bytes) -> int:
    """Where the first complete response in ``buffer`` ends (it has a ``Content-Length``), or
    -1 when it has not all come."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return -1
    head = buffer[: end + 2].lower()  # every header line ends in CRLF
    at = head.find(b"content-length:")
    length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
    total = end + 4 + length
    return total if len(buffer) >= total else -1


class HttpClient:
    """``POST /ingest`` as curl, Go's ``net/http`` and browsers send it: keep-alive, Go's
    header set, the head and the body in two writes (with ``TCP_NODELAY``, two segments: a
    server sees the head before the body), one request in flight per connection, the next
    request sent when the response is in. ``inflight`` connections in this process (none of
    those clients pipelines, so N in flight is N connections), driven by ``epoll``."""

    def __init__(self, port: int, size: int, count: int, first: int, inflight: int) -> None:
        self.socks = [connect(port) for _ in range(max(1, min(inflight, count)))]
        self.head = GO_REQUEST_HEAD % (port, size)
        self.bodies = distinct_payloads(size, count, first)
        self.count = count

    def send(self) -> int:
        head, count = self.head, self.count
        bodies = itertools.cycle(self.bodies)
        epoll = select.epoll()
        socks = {sock.fileno(): sock for sock in self.socks}
        buffers = dict.fromkeys(socks, b"")
        issued = done = rejected = 0
        for fd, sock in socks.items():
            sock.sendall(head)
            sock.sendall(next(bodies))
            issued += 1
            epoll.register(fd, select.EPOLLIN)
        try:
            while done < count:
                for fd, _ in epoll.poll():
                    sock = socks[fd]
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    buffer = buffers[fd] + data
                    total = _response_end(buffer)
                    if total < 0:
                        buffers[fd] = buffer
                        continue
                    if not buffer.startswith(b"HTTP/1.1 202"):
                        rejected += 1
                    buffers[fd] = buffer[total:]
                    done += 1
                    if issued < count:
                        sock.sendall(head)
                        sock.sendall(next(bodies))
                        issued += 1
        finally:
            epoll.close()
        return rejected

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


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
        (b"user-agent", b"curl/8.14.1"),
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


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transport", choices=TRANSPORTS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument(
        "--inflight", type=int, default=1, help="unary: requests or calls in flight (default 1)"
    )
    parser.add_argument("--then-close", action="store_true", help="close once all is sent")
    args = parser.parse_args(argv)
    first = args.index * args.count
    client: StreamClient | UdpClient | HttpClient | H2Client
    port, size, count = args.port, args.size, args.count
    try:
        if args.transport in ("tcp", "ws"):
            client = StreamClient(args.transport, port, size, count, first)
        elif args.transport == "udp":
            client = UdpClient(port, size, count, first)
        elif args.transport == "http":
            client = HttpClient(port, size, count, first, args.inflight)
        elif args.transport == "h2c":
            bodies = distinct_payloads(size, count, first)
            client = H2UnaryClient(port, h2c_headers(port, size), bodies, count, args.inflight)
        elif args.transport in ("grpc-unary", "grpc-make"):
            payloads = distinct_payloads(size, count, first)
            if args.transport == "grpc-unary":
                bodies = [grpc_message(m, first + i + 1) for i, m in enumerate(payloads)]
            else:
                bodies = [grpc_request(m) for m in payloads]
            headers = grpc_headers(port, GRPC_PATHS[args.transport])
            client = H2UnaryClient(port, headers, bodies, count, args.inflight)
        else:
            mode = "batched" if args.transport == "grpc-stream" else "frames"
            client = GrpcStreamClient(mode, port, size, count, first)
    except OSError as exc:
        say(f"error {exc!r}")
        raise SystemExit(1) from exc
    say("ready")
    if sys.stdin.readline().strip() != "go":
        client.close()
        return
    started = time.monotonic()
    cpu = time.process_time()
    try:
        rejected = client.send()
    except OSError as exc:
        say(f"error {exc!r}")
        raise SystemExit(1) from exc
    cpu = time.process_time() - cpu
    if args.then_close:
        client.close()
    say(f"sent {started!r} {time.monotonic()!r} {rejected} {cpu!r}")
    if not args.then_close:
        sys.stdin.readline()  # "stop", or end of input
        client.close()


if __name__ == "__main__":
    main()
