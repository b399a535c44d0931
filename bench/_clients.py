"""The load generators, one connection per process, on blocking sockets with pre-built bytes.

    python -m bench._clients TRANSPORT --port P --size BYTES --count N [--index I]

``TRANSPORT`` is ``tcp``, ``udp``, ``http``, ``ws``, ``grpc-unary`` or ``grpc-stream``. Only the
standard library is imported, and every byte on the wire is built before the start signal,
so the client spends its time in ``send`` and ``recv`` and stays off the server's core as much
as a Python client can.

The protocol with the runner, one line each way: the client connects and prepares, prints
``ready``; on ``go`` it sends its ``count`` messages and prints ``sent T0 T1 REJECTED``
(``time.monotonic()`` at start and end; REJECTED counts answers other than success, for the
transports that answer); on ``stop`` (or end of input) it closes the connection and exits.
``--then-close`` closes right after sending instead (a reader that runs to end of stream,
like ``socat``, needs the end of stream to finish).

* tcp: newline-framed payloads written in blocks of about 1 MiB (``sendall``).
* udp: one ``send`` per datagram on a connected socket, as fast as the loop goes.
* http: ``POST /ingest`` with a ``Content-Length`` body, one request in flight, HTTP/1.1
  keep-alive (one connection for all requests: the talk's client opened one per request).
* ws: the opening handshake, then masked binary frames in blocks of about 1 MiB.
* grpc-unary: HTTP/2 by hand: one ``trio_gateway.v1.Gateway/Send`` call in flight, each on a
  new stream of the one connection, the reply's trailers awaited before the next call.
* grpc-stream: one ``Stream`` call carrying every message, in DATA frames as large as the
  server allows, within its flow-control windows.

Payloads come from :mod:`bench._payloads` (deterministic JSON of the exact size); client
``--index I`` numbers its messages from ``I * count`` so parallel clients send distinct ones.

Why not :mod:`trio_gateway.loadgen` (what ``send`` and ``bench.soak`` use): this benchmark
measures servers side by side (trio_gateway, asyncio, uvloop), so its client must cost as
little as a Python client can, and the same against each of them: no event loop, nothing
built or parsed per message while the clock runs, answers read only as far as counting them
needs. The load generator does the opposite on purpose (a payload per sequence number, every
answer parsed and counted, pacing, TLS and tokens), and that work would be timed as the
server's.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import struct
import sys
import time
from collections.abc import Sequence

from ._payloads import payload

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench._clients")

TRANSPORTS = ("tcp", "udp", "http", "ws", "grpc-unary", "grpc-stream")
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


# -- http ---------------------------------------------------------------------------------------


class HttpClient:
    def __init__(self, port: int, size: int, count: int, first: int) -> None:
        self.sock = connect(port)
        head = (
            b"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, size)
        )
        self.requests = [head + m for m in distinct_payloads(size, count, first)]
        self.count = count

    def send(self) -> int:
        sock = self.sock
        sendall, recv = sock.sendall, sock.recv
        rejected = 0
        buffer = b""
        for request in itertools.islice(itertools.cycle(self.requests), self.count):
            sendall(request)
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                data = recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buffer += data
            head = buffer[: end + 2].lower()  # every header line ends in CRLF
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            total = end + 4 + length
            while len(buffer) < total:
                data = recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buffer += data
            if not head.startswith(b"http/1.1 202"):
                rejected += 1
            buffer = buffer[total:]
        return rejected

    def close(self) -> None:
        self.sock.close()


# -- grpc: a minimal HTTP/2 client --------------------------------------------------------------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MAX_WINDOW = (1 << 31) - 1


def _frame(kind: int, flags: int, stream: int, body: bytes = b"") -> bytes:
    return struct.pack(">I", len(body))[1:] + struct.pack(">BBI", kind, flags, stream) + body


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_str(text: bytes) -> bytes:
    return _hpack_int(len(text), 7) + text


def request_headers(port: int, path: bytes) -> bytes:
    """The HPACK block of a gRPC request: static-table names, literals never indexed, so every
    request's block is the same bytes (no dynamic-table state to keep)."""
    return (
        b"\x83"  # :method: POST
        + b"\x86"  # :scheme: http
        + _hpack_int(4, 4)
        + _hpack_str(path)  # :path
        + _hpack_int(1, 4)
        + _hpack_str(b"127.0.0.1:%d" % port)  # :authority
        + _hpack_int(31, 4)
        + _hpack_str(b"application/grpc")  # content-type
        + b"\x00"
        + _hpack_str(b"te")
        + _hpack_str(b"trailers")
    )


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


class GrpcClient:
    def __init__(self, mode: str, port: int, size: int, count: int, first: int) -> None:
        self.sock = connect(port)
        self.mode = mode
        self.count = count
        path = b"/trio_gateway.v1.Gateway/" + (b"Send" if mode == "unary" else b"Stream")
        self.headers = request_headers(port, path)
        self.buffer = b""
        self.send_window = 65535  # the connection's, from the server's WINDOW_UPDATEs
        self.initial_window = 65535  # each new stream's, from the server's SETTINGS
        self.stream_windows: dict[int, int] = {}
        self.max_frame = 16384
        self.finished: set[int] = set()
        self.failed = 0
        self.next_stream = 1
        self.sock.sendall(
            _PREFACE
            + _frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, MAX_WINDOW))
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
        )
        self._read_until(lambda: self.got_settings)
        messages = distinct_payloads(size, count, first)
        if mode == "unary":
            self.messages = [grpc_message(m, first + i + 1) for i, m in enumerate(messages)]
        else:
            frames = [grpc_message(m, 0) for m in messages]
            self.block, self.repeats, self.tail = blocks(frames, count)

    got_settings = False

    def _read_until(self, done: object) -> None:
        """Read and handle frames until ``done()`` is true."""
        sock = self.sock
        while not done():  # type: ignore[operator]
            buffer = self.buffer
            if len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) >= 9 + length:
                    kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big")
                    body = buffer[9 : 9 + length]
                    self.buffer = buffer[9 + length :]
                    self._handle(kind, flags, stream & 0x7FFFFFFF, body)
                    continue
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buffer += data

    def _handle(self, kind: int, flags: int, stream: int, body: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for at in range(0, len(body), 6):
                key, value = struct.unpack_from(">HI", body, at)
                if key == 4:
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
        elif kind == HEADERS and flags & END_STREAM:
            # The trailers end the call. Their grpc-status is HPACK-coded and not decoded
            # here: the server's count of queued messages is what tells success.
            self.finished.add(stream)
        elif kind == RST_STREAM:
            self.finished.add(stream)
            self.failed += 1
        elif kind == GOAWAY:
            raise ConnectionError(f"GOAWAY from the server: {body[8:]!r}")

    def _send_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        """DATA frames within the windows, waiting for WINDOW_UPDATEs when they are spent."""
        view = memoryview(data)
        sendmsg = self.sock.sendmsg
        while view or end:
            room = min(self.send_window, self.stream_windows[stream], self.max_frame)
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

    def _open(self) -> int:
        stream = self.next_stream
        self.next_stream += 2
        self.stream_windows[stream] = self.initial_window
        self.sock.sendall(_frame(HEADERS, END_HEADERS, stream, self.headers))
        return stream

    def send(self) -> int:
        if self.mode == "unary":
            finished = self.finished
            for message in itertools.islice(itertools.cycle(self.messages), self.count):
                stream = self._open()
                self._send_data(stream, message, end=True)
                self._read_until(lambda s=stream: s in finished)  # type: ignore[misc]
                finished.discard(stream)
                del self.stream_windows[stream]
        else:
            stream = self._open()
            for _ in range(self.repeats):
                self._send_data(stream, self.block, end=False)
            self._send_data(stream, self.tail, end=True)
            self._read_until(lambda: stream in self.finished)
        return self.failed

    def close(self) -> None:
        try:
            self.sock.sendall(_frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
        except OSError:
            pass
        self.sock.close()


def _sendall_parts(sendmsg: object, header: bytes, chunk: memoryview) -> None:
    parts: list[bytes | memoryview] = [header, chunk]
    total = len(header) + len(chunk)
    sent = 0
    while sent < total:
        n = sendmsg(parts)  # type: ignore[operator]
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
    parser.add_argument("--then-close", action="store_true", help="close once all is sent")
    args = parser.parse_args(argv)
    first = args.index * args.count
    client: StreamClient | UdpClient | HttpClient | GrpcClient
    try:
        if args.transport in ("tcp", "ws"):
            client = StreamClient(args.transport, args.port, args.size, args.count, first)
        elif args.transport == "udp":
            client = UdpClient(args.port, args.size, args.count, first)
        elif args.transport == "http":
            client = HttpClient(args.port, args.size, args.count, first)
        else:
            mode = args.transport.split("-")[1]
            client = GrpcClient(mode, args.port, args.size, args.count, first)
    except OSError as exc:
        say(f"error {exc!r}")
        raise SystemExit(1) from exc
    say("ready")
    if sys.stdin.readline().strip() != "go":
        client.close()
        return
    started = time.monotonic()
    try:
        rejected = client.send()
    except OSError as exc:
        say(f"error {exc!r}")
        raise SystemExit(1) from exc
    if args.then_close:
        client.close()
    say(f"sent {started!r} {time.monotonic()!r} {rejected}")
    if not args.then_close:
        sys.stdin.readline()  # "stop", or end of input
        client.close()


if __name__ == "__main__":
    main()
