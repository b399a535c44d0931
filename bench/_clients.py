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
  This and the gRPC clients below live in :mod:`bench._h2clients`.
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
import sys
import time
from collections.abc import Sequence

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
    from ._h2clients import (
        GRPC_PATHS,
        GrpcStreamClient,
        H2Client,
        H2UnaryClient,
        grpc_headers,
        grpc_message,
        grpc_request,
        h2c_headers,
    )

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
