"""WebSocket messages/s over one connection, for 18, 4266 and 79,435-byte binary messages.

Servers (each in its own process, each counting messages as they are parsed):

* ``trio_gateway``     WebSocketSource (common frames decoded out of one reused receive buffer,
  the rest by websockets' Sans-I/O protocol; one queue offer per read) into a RingBuffer
  drained by a consumer task
* ``websockets``       the ``websockets`` asyncio server, ``async for message in ws``
* ``trio-websocket``   ``trio_websocket.serve_websocket`` (wsproto), ``await ws.get_message()``

Every server process applies ``trio_gateway.tuning.tune_allocator`` (what ``serve`` does), so
that the comparison is between the code, not glibc's settings. The queue holds at most 64 MiB
of payload (at most 65,536 messages). The client is a separate process that writes pre-masked
frames as fast as the socket takes them, so the server is the bottleneck (where it is not, the
server's CPU figure is the one to compare). The server reports the time from its first to its
last message. Usage: ``python -m bench.ws [--count 100000]``.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.ws")

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("trio_gateway", "websockets", "trio-websocket")


def serve(kind: str, port: int, count: int, size: int) -> None:
    """Serve one connection; print the seconds between the first and the count-th message."""
    from trio_gateway.tuning import tune_allocator

    tune_allocator()
    if kind == "trio_gateway":
        import trio

        from trio_gateway._ingress import Ingress
        from trio_gateway._ledger import SourceCounters
        from trio_gateway.queues import RingBuffer
        from trio_gateway.sources.websocket import WebSocketSource

        async def main() -> None:
            queue: RingBuffer[Any] = RingBuffer(max(64, min(65536, (64 << 20) // size)))
            stopping = trio.Event()
            ingress = Ingress(
                queue, SourceCounters("websocket", "bench"), stopping, grace_period=0.1
            )
            source = WebSocketSource(port=port, max_message_size=1 << 20)
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, ingress)
                print("ready", flush=True)
                seen, start, cpu = 0, 0.0, 0.0
                while seen < count:
                    batch = await queue.get_batch(65536)
                    if not seen:
                        start, cpu = time.perf_counter(), time.process_time()
                    seen += len(batch)
                print(time.perf_counter() - start, time.process_time() - cpu, flush=True)
                nursery.cancel_scope.cancel()

        trio.run(main)
    elif kind == "websockets":
        import asyncio

        from websockets.asyncio.server import ServerConnection
        from websockets.asyncio.server import serve as ws_serve

        async def amain() -> None:
            done = asyncio.Event()

            async def handler(ws: ServerConnection) -> None:
                seen, start, cpu = 0, 0.0, 0.0
                async for _ in ws:
                    if not seen:
                        start, cpu = time.perf_counter(), time.process_time()
                    seen += 1
                    if seen == count:
                        print(time.perf_counter() - start, time.process_time() - cpu, flush=True)
                        done.set()

            async with ws_serve(handler, "127.0.0.1", port, compression=None, max_size=1 << 20):
                print("ready", flush=True)
                await done.wait()

        asyncio.run(amain())
    elif kind == "trio-websocket":
        import trio
        from trio_websocket import WebSocketRequest, serve_websocket

        async def tmain() -> None:
            async with trio.open_nursery() as nursery:

                async def handler(request: WebSocketRequest) -> None:
                    ws = await request.accept()
                    seen, start, cpu = 0, 0.0, 0.0
                    while seen < count:
                        await ws.get_message()
                        if not seen:
                            start, cpu = time.perf_counter(), time.process_time()
                        seen += 1
                    print(time.perf_counter() - start, time.process_time() - cpu, flush=True)
                    nursery.cancel_scope.cancel()

                await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
                print("ready", flush=True)

        trio.run(tmain)
    else:
        raise SystemExit(f"unknown server {kind!r}")


def blast(port: int, size: int, count: int) -> None:
    """Handshake, then send ``count`` masked binary frames of ``size`` bytes."""
    from websockets.frames import Frame, Opcode

    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    frame = Frame(Opcode.BINARY, b"m" * size).serialize(mask=True, extensions=[])
    per_write = max(1, (256 * 1024) // len(frame))
    chunk = frame * per_write
    sent = 0
    while sent < count:
        n = min(per_write, count - sent)
        sock.sendall(chunk if n == per_write else frame * n)
        sent += n
    # Keep the socket open until the server has read everything (it closes or we are killed).
    sock.settimeout(60)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def measure(kind: str, size: int, count: int) -> tuple[float, float]:
    """Returns (messages per wall second, messages per CPU second of the server)."""
    port = 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.ws", "--serve", kind, str(port), str(count), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen(
            [sys.executable, "-m", "bench.ws", "--blast", str(port), str(size), str(count)],
            cwd=REPO,
        )
        wall, cpu = map(float, server.stdout.readline().split())
        client.kill()
        client.wait()
        return count / wall, count / cpu
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "PORT", "COUNT", "SIZE"))
    parser.add_argument("--blast", nargs=3, type=int, metavar=("PORT", "SIZE", "COUNT"))
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="*", default=[18, 4266, 79435])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), int(args.serve[2]), int(args.serve[3]))
        return
    if args.blast:
        blast(*args.blast)
        return
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for size in args.sizes:
        count = args.count if size < 1000 else max(1000, args.count // 5)
        if size > 50_000:
            count = max(1000, args.count // 20)
        results[str(size)] = {kind: measure(kind, size, count) for kind in SERVERS}
    print(f"\nWebSocket binary messages over one connection, {os.cpu_count()} cores\n")
    print("wall = messages per second; cpu = messages per CPU-second of the server process")
    print("(the fair figure on a shared machine: a busy neighbour steals wall time, not CPU).\n")
    print(
        "| size (bytes) | "
        + " | ".join(f"{k} wall / cpu" for k in SERVERS)
        + " | trio_gateway / websockets (wall, cpu) |"
    )
    print("|---:|" + "---:|" * (len(SERVERS) + 1))
    for size, row in results.items():
        cells = " | ".join(f"{row[k][0]:,.0f} / {row[k][1]:,.0f}" for k in SERVERS)
        gw, ws = row["trio_gateway"], row["websockets"]
        print(f"| {size} | {cells} | {gw[0] / ws[0]:.2f}x, {gw[1] / ws[1]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
