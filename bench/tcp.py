"""Streaming TCP throughput: trio_gateway against asyncio peers and an in-process floor.

    python -m bench.tcp [--quick] [--repeats N] [--json FILE]

One op = one newline-framed message read by the server and handed to its queue, whose consumer
counts it (trio_gateway: the null sink). The client is a separate process that writes the whole
pre-built stream over one connection, shuts down its side and waits for the server to close:
the time from connect to that EOF is the figure, so every byte has been consumed.

Servers, each a fresh process, run in turn within each repeat (so machine drift hits all alike):

- trio_gateway: ``python -m trio_gateway serve --sink null`` (the real product path).
- asyncio typical: ``asyncio.start_server`` + ``await reader.readline()`` + ``await queue.put``,
  a consumer task doing ``await queue.get()``: what most asyncio code looks like.
- asyncio best: a ``Protocol`` using our technique: one ``bytes.split`` per chunk, a deque
  extended per chunk, a consumer draining batches, ``pause_reading`` as backpressure.
- floor: no sockets: the same bytes in the same 256 KiB chunks through our NewlineDecoder, as
  the TCP source feeds it (short frames through ``feed_packed``: counted, not split).

Ratios are ours / theirs, measured in the same run. Figures are whole-process wall times on
a shared machine: quote ratios, not absolutes.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.tcp")

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trio_gateway.codecs import NewlineDecoder

from ._payloads import payload

ROOT = Path(__file__).resolve().parent.parent

CHUNK = 256 * 1024

# -- the asyncio peers (run as `python -c SOURCE`) -----------------------------

_TYPICAL = """
import asyncio, sys

async def main():
    queue = asyncio.Queue(maxsize=10_000)
    count = 0

    async def consume():
        nonlocal count
        while True:
            await queue.get()
            count += 1

    async def handle(reader, writer):
        while line := await reader.readline():
            await queue.put(line.rstrip(b"\\n"))
        while queue.qsize():
            await asyncio.sleep(0)
        writer.close()

    asyncio.get_running_loop().create_task(consume())
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    print("listening: tcp on 127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""

_BEST = """
import asyncio, collections

CAPACITY = 65_536

class Gateway:
    def __init__(self):
        self.items = collections.deque()
        self.waiter = None
        self.paused = []
        self.count = 0

    def put_many(self, frames, protocol):
        self.items.extend(frames)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if len(self.items) >= CAPACITY:
            protocol.transport.pause_reading()
            self.paused.append(protocol)

    async def consume(self):
        while True:
            if not self.items:
                self.waiter = asyncio.get_running_loop().create_future()
                await self.waiter
            n = min(len(self.items), 4096)
            popleft = self.items.popleft
            for _ in range(n):
                popleft()
            self.count += n
            if self.paused and len(self.items) < CAPACITY:
                for protocol in self.paused:
                    protocol.transport.resume_reading()
                self.paused.clear()

class Reader(asyncio.Protocol):
    def __init__(self, gateway):
        self.gateway = gateway
        self.rest = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.rest:
            data = self.rest + data
        frames = data.split(b"\\n")
        self.rest = frames.pop()
        if frames:
            self.gateway.put_many(frames, self)

    def eof_received(self):
        return False  # close once the data is consumed: the client is waiting for it

async def main():
    gateway = Gateway()
    loop = asyncio.get_running_loop()
    loop.create_task(gateway.consume())
    server = await loop.create_server(lambda: Reader(gateway), "127.0.0.1", 0)
    print("listening: tcp on 127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def start_server(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    if kind == "trio_gateway":
        argv = [
            sys.executable,
            "-m",
            "trio_gateway",
            "serve",
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            "null",
            "--capacity",
            "65536",
            "--batch-size",
            "4096",
            "--log-level",
            "info",
        ]
    else:
        argv = [sys.executable, "-c", _TYPICAL if kind == "asyncio typical" else _BEST]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    assert proc.stdout is not None
    port = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"{kind} server exited")
        match = re.search(r"listening: tcp on .*:(\d+)", line)
        if match:
            port = int(match[1])
        if line.rstrip().endswith("ready") and port:
            return proc, port
    raise TimeoutError(f"{kind} server did not start")


def stop_server(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(2)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


# -- the client (run as `python -m bench.tcp --client PORT SIZE COUNT`) ------------------------


def build_stream(size: int, count: int) -> bytes:
    # A few distinct documents repeated: building millions of unique ones would time the client.
    distinct = [payload(size, seq) for seq in range(min(count, 1024))]
    body = b"\n".join(distinct) + b"\n"
    reps, extra = divmod(count, len(distinct))
    return body * reps + b"".join(p + b"\n" for p in distinct[:extra])


def client(port: int, size: int, count: int) -> float:
    data = build_stream(size, count)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.perf_counter() - started


def run_client(port: int, size: int, count: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "bench.tcp", "--client", str(port), str(size), str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(out.stdout.strip())


def floor(size: int, count: int) -> float:
    data = build_stream(size, count)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    decoder = NewlineDecoder(max_frame_size=1 << 20)
    total = 0
    started = time.perf_counter()
    for chunk in chunks:
        if decoder.long_frames:  # as the source: long frames are found one by one
            total += len(decoder.feed(chunk))
        else:
            total += decoder.feed_packed(chunk)[2]
    elapsed = time.perf_counter() - started
    assert total == count, (total, count)
    return elapsed


# -- the driver ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--client", nargs=3, type=int, metavar=("PORT", "SIZE", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        print(client(*args.client))
        return

    repeats = 1 if args.quick else args.repeats
    scale = 0.1 if args.quick else 1.0
    # Messages per run, per size: enough for a run of about a second for the fast servers;
    # the typical asyncio server gets a tenth (its rate is what is compared, not its time).
    counts = {18: int(3_000_000 * scale), 4266: int(150_000 * scale)}
    kinds = ["trio_gateway", "asyncio best", "asyncio typical"]
    rates: dict[int, dict[str, list[float]]] = {
        size: {k: [] for k in [*kinds, "floor"]} for size in counts
    }
    for size, count in counts.items():
        for _ in range(repeats):
            for kind in kinds:
                n = count // 10 if kind == "asyncio typical" else count
                proc, port = start_server(kind)
                try:
                    elapsed = run_client(port, size, n)
                finally:
                    log = stop_server(proc)
                if kind == "trio_gateway":
                    ledger = json.loads(log[log.index('{"ledger"') :].splitlines()[0])["ledger"]
                    assert ledger["delivered"] == n and ledger["balanced"], ledger
                rates[size][kind].append(n / elapsed)
            rates[size]["floor"].append(count / floor(size, count))

    med = {size: {k: statistics.median(v) for k, v in by.items()} for size, by in rates.items()}
    print(
        f"\nTCP, one connection, newline framing, null sink; {os.cpu_count()} cores; "
        f"median of {repeats}; msg/s\n"
    )
    print(
        "| size (B) | trio_gateway | asyncio best | asyncio typical | floor (no sockets) "
        "| vs best | vs typical | vs floor |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, m in med.items():
        ours = m["trio_gateway"]
        print(
            f"| {size} | {ours:,.0f} | {m['asyncio best']:,.0f} | {m['asyncio typical']:,.0f} "
            f"| {m['floor']:,.0f} | {ours / m['asyncio best']:.2f}x "
            f"| {ours / m['asyncio typical']:.1f}x | {ours / m['floor']:.2f}x |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "bench": "tcp",
                    "repeats": repeats,
                    "counts": counts,
                    "msg_per_s": rates,
                    "median": med,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
