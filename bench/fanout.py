"""What fan-out costs on the streaming TCP path, and what a stalled sink does to the others.

    python -m bench.fanout [--messages N] [--repeats N] [--json FILE]

One process: a TCP source on port 0, a client in the same Trio run sending ``--messages``
18-byte lines in 256 KiB writes, and the time until the last message is delivered, for:

* ``one sink``: ``Gateway(sink=NullSink())``, no fan-out;
* ``two sinks``: a :class:`~trio_gateway.Pipeline` fanning out to two null sinks;
* ``two sinks, one stalled``: the same, with the second sink never answering and its queue
  under ``drop_oldest`` (it loses messages, counted; the first should not slow down).

Rates are messages per second delivered to the (first) null sink, median of ``--repeats``
interleaved runs.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.fanout")

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import trio

from trio_gateway import Batch, Gateway, NullSink, Pipeline, QueuedSink, Sink, TcpSource

LINE = b'{"t":21.5,"id":7}\n'  # 18 bytes


class StalledSink(Sink):
    """A destination that stopped answering: every send waits until cancelled."""

    name = "stalled"

    async def send(self, batch: Batch) -> None:
        await trio.sleep_forever()


def one_sink() -> tuple[Gateway, NullSink]:
    sink = NullSink()
    return Gateway(sources=[TcpSource(port=0)], sink=sink), sink


def two_sinks() -> tuple[Gateway, NullSink]:
    first, second = NullSink(), NullSink()
    second.name = "null2"
    pipeline = Pipeline("p", sources=[TcpSource(port=0)], sinks=[first, second])
    return pipeline.gateway, first


def one_stalled() -> tuple[Gateway, NullSink]:
    first = NullSink()
    stalled = QueuedSink(StalledSink(), capacity=10_000, policy="drop_oldest")
    pipeline = Pipeline("p", sources=[TcpSource(port=0)], sinks=[first, stalled], drain_timeout=0.1)
    return pipeline.gateway, first


CASES: dict[str, Callable[[], tuple[Gateway, NullSink]]] = {
    "one sink": one_sink,
    "two sinks": two_sinks,
    "two sinks, one stalled": one_stalled,
}


async def run_case(make: Callable[[], tuple[Gateway, NullSink]], messages: int) -> float:
    gateway, sink = make()
    chunk = LINE * ((256 * 1024) // len(LINE))
    per_chunk = len(chunk) // len(LINE)
    async with trio.open_nursery() as nursery:
        ((address,),) = await nursery.start(gateway.run)
        started = time.perf_counter()
        async with await trio.open_tcp_stream(*address) as stream:
            for _ in range(messages // per_chunk):
                await stream.send_all(chunk)
            total = (messages // per_chunk) * per_chunk
            while sink.messages < total:
                await trio.sleep(0.001)
        elapsed = time.perf_counter() - started
        gateway.shutdown()
    return total / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, make in CASES.items():
            runs[name].append(trio.run(run_case, make, args.messages))
    rates = {name: statistics.median(r) for name, r in runs.items()}
    base = rates["one sink"]
    print(f"{args.messages} messages of {len(LINE)} B over TCP, median of {args.repeats}")
    print("| case | msg/s to the first sink | cost vs one sink |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {base / rate:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rates, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
