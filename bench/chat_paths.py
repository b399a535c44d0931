"""The chat relay's two WebSocket paths, each alone: CPU per message of the gateway's side.

    python -m bench.chat_paths [--paths source,sink,code] [--rates 1000,10000]
                               [--batches 10,100] [--seconds 3] [--repeat 3] [--profile DIR]

* ``source``: a :class:`WebSocketSource` (its frame reader, one queue offer per read) into a
  RingBuffer drained by a consumer task, in a process of its own; the client is the chat
  relay's sender (``bench.chat_relay``'s, on ``websockets``' sans-I/O protocol, in another
  process) sending ``{"room":"bench","t":...,"n":...}`` text messages on a schedule of
  ``--rates`` messages per second. The gateway's CPU is its process time from the first
  message to the last, divided by the messages.
* ``sink``: a :class:`WebSocketBroadcastSink` (``topic="room"``, as the chat example) in a
  process of its own, fed in-process with batches of ``--batches`` such messages at 10,000
  messages per second (their ``t`` stamped as each batch is made); the client is the chat
  relay's receiver (``bench.chat_relay``'s, subscribed to the room). The gateway's
  CPU is its process time from the first batch to 0.2 s after the last (idle costs
  nothing), divided by the messages; it includes making the payloads (an f-string each).
  The receiver's median and p99 latency come with it.
* ``code``: the pure-Python costs alone, no sockets: the frame reader over reads of 1, 10
  and 100 masked chat frames, and the sink's topic read of a batch of 100 chat messages.

Each figure is the median of ``--repeat`` runs. ``--profile DIR`` writes a cProfile of each
socket run's gateway process (``source-RATE.prof``, ``sink-BATCH.prof``).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.chat_paths")

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from bench.chat_relay import ROOM, child, free_port

REPO = Path(__file__).resolve().parent.parent
SINK_RATE = 10_000


def _cpu() -> tuple[float, float]:
    """This process's user and system CPU seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _spent(wall: float, cpu: tuple[float, float]) -> str:
    """The report line: wall seconds, user and system CPU seconds since ``cpu``."""
    user, system = _cpu()
    return json.dumps([wall, user - cpu[0], system - cpu[1]])


def _profiled(path: str, main: Any) -> None:
    """Run ``main`` (a trio main), under cProfile when ``path`` is not empty."""
    import trio

    if not path:
        trio.run(main)
        return
    import cProfile

    profile = cProfile.Profile()
    profile.runcall(trio.run, main)
    profile.dump_stats(path)


def serve_source(port: int, count: int, profile: str) -> None:
    """A WebSocket source on ``port``; print the wall and CPU seconds of ``count`` messages."""
    import trio

    from trio_gateway._ingress import Ingress
    from trio_gateway._ledger import SourceCounters
    from trio_gateway.queues import RingBuffer
    from trio_gateway.sources.websocket import WebSocketSource
    from trio_gateway.tuning import tune_allocator

    tune_allocator()

    async def main() -> None:
        queue: RingBuffer[Any] = RingBuffer(65536)
        ingress = Ingress(
            queue, SourceCounters("websocket", "bench"), trio.Event(), grace_period=0.1
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(WebSocketSource(port=port).run, ingress)
            print("ready", flush=True)
            seen, start, cpu = 0, 0.0, (0.0, 0.0)
            while seen < count:
                batch = await queue.get_batch(1024)
                if not seen:
                    start, cpu = time.perf_counter(), _cpu()
                seen += len(batch)
            print(_spent(time.perf_counter() - start, cpu), flush=True)
            nursery.cancel_scope.cancel()

    _profiled(profile, main)


def serve_sink(port: int, count: int, batch: int, profile: str) -> None:
    """A broadcast sink on ``port``; once one client is subscribed and "go" is read on stdin,
    feed it ``count`` chat messages in batches of ``batch`` at SINK_RATE; print the CPU."""
    import trio

    from trio_gateway._message import Batch, Origin
    from trio_gateway.sinks._wsbroadcast import WebSocketBroadcastSink
    from trio_gateway.tuning import tune_allocator

    tune_allocator()

    async def main() -> None:
        sink = WebSocketBroadcastSink(port=port, topic="room", client_queue=100_000)
        origin = Origin("nats", "nats:bench", "chat.bench", time.time())
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run, None)
            print("ready", flush=True)
            while sink.clients < 1:
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(sys.stdin.readline)  # go
            clock, stamp = time.perf_counter, time.perf_counter_ns
            start, cpu = clock(), _cpu()
            due = trio.current_time()  # trio's clock is not perf_counter's
            sent = 0
            while sent < count:
                n = min(batch, count - sent)
                payloads = [
                    f'{{"room":"{ROOM}","t":{stamp()},"n":{sent + i}}}'.encode() for i in range(n)
                ]
                await sink.send(Batch(payloads, [(origin, n)]))
                sent += n
                await trio.sleep_until(due + sent / SINK_RATE)
            await trio.sleep(0.2)  # the writer's last sends
            print(_spent(clock() - start, cpu), flush=True)
            nursery.cancel_scope.cancel()

    _profiled(profile, main)


def _server(*args: str) -> subprocess.Popen[str]:
    return child(*args, module="bench.chat_paths")


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"expected 'ready', got {line!r}")


def run_source(rate: int, seconds: float, profile: str) -> dict[str, float]:
    count = int(rate * seconds)
    port = free_port()
    server = _server("--role", "source", str(port), str(count), profile)
    try:
        _ready(server)
        sender = child("--role", "send", f"ws://127.0.0.1:{port}/", str(rate), str(count), "0")
        _ready(sender)
        assert sender.stdin is not None and server.stdout is not None
        sender.stdin.write("go\n")
        sender.stdin.flush()
        wall, user, system = json.loads(server.stdout.readline())
        sender.communicate()
        server.wait(timeout=10)
    finally:
        server.kill()
    return _figures(count, wall, user, system)


def run_sink(batch: int, seconds: float, profile: str) -> dict[str, float]:
    count = int(SINK_RATE * seconds)
    port = free_port()
    server = _server("--role", "sink", str(port), str(count), str(batch), profile)
    try:
        _ready(server)
        url = f"ws://127.0.0.1:{port}/{ROOM}"
        receiver = child("--role", "receive", url, str(count), str(seconds + 20))
        _ready(receiver)
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write("go\n")
        server.stdin.flush()
        wall, user, system = json.loads(server.stdout.readline())
        heard = json.loads(receiver.communicate()[0].splitlines()[-1])["total"]
        server.wait(timeout=10)
    finally:
        server.kill()
    heard.sort()
    return _figures(count, wall, user, system) | {
        "received": len(heard) / count,
        "p50_ms": 1e3 * heard[len(heard) // 2],
        "p99_ms": 1e3 * heard[min(len(heard) - 1, int(0.99 * len(heard)))],
    }


def _figures(count: int, wall: float, user: float, system: float) -> dict[str, float]:
    return {
        "us_per_message": 1e6 * (user + system) / count,
        "user_us": 1e6 * user / count,
        "cpu_percent": 100 * (user + system) / wall,
    }


def code_costs() -> dict[str, float]:
    """us per message of the reader's frame scan and of the sink's topic read (no I/O)."""
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    from trio_gateway._message import Batch, Origin
    from trio_gateway.sinks._wsbroadcast import WebSocketBroadcastSink
    from trio_gateway.sources._wsframes import MessageReader

    text = f'{{"room":"{ROOM}","t":{time.perf_counter_ns()},"n":12345}}'
    frame = Frame(Opcode.TEXT, text.encode()).serialize(mask=True, extensions=[])
    results: dict[str, float] = {}
    for per_read in (1, 10, 100):
        protocol = ServerProtocol()
        protocol.state = State.OPEN
        reader = MessageReader(protocol)
        chunk = frame * per_read

        def read(reader: MessageReader = reader, chunk: bytes = chunk) -> None:
            buffer = reader.read_buffer()
            buffer[: len(chunk)] = chunk
            reader.received(len(chunk))

        runs = max(200, 20_000 // per_read)
        best = min(timeit.repeat(read, number=runs, repeat=5))
        results[f"reader, {per_read} a read"] = 1e6 * best / (runs * per_read)
    sink = WebSocketBroadcastSink(topic="room")
    origin = Origin("nats", "nats:bench", "chat.bench", 0.0)
    batch = Batch([text.encode()] * 100, [(origin, 100)])
    best = min(timeit.repeat(lambda: sink._topics(batch), number=200, repeat=5))
    results["sink topics, a batch of 100"] = 1e6 * best / (200 * 100)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_paths", description=__doc__)
    parser.add_argument("--paths", default="source,sink,code")
    parser.add_argument("--rates", default="1000,10000")
    parser.add_argument("--batches", default="10,100")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--role", choices=("source", "sink"), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "source":
        port, count, profile = args.args
        serve_source(int(port), int(count), profile)
        return 0
    if args.role == "sink":
        port, count, batch, profile = args.args
        serve_sink(int(port), int(count), int(batch), profile)
        return 0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    def profile(name: str) -> str:
        return str(args.profile / f"{name}.prof") if args.profile else ""

    paths = args.paths.split(",")
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    rows: list[tuple[str, dict[str, float]]] = []
    if "code" in paths:
        runs = [code_costs() for _ in range(args.repeat)]
        for key in runs[0]:
            rows.append((key, {"us_per_message": statistics.median(r[key] for r in runs)}))
    if "source" in paths:
        for rate in map(int, args.rates.split(",")):
            runs = [
                run_source(rate, args.seconds, profile(f"source-{rate}"))
                for _ in range(args.repeat)
            ]
            rows.append((f"source at {rate:,} msg/s", _median(runs)))
    if "sink" in paths:
        for batch in map(int, args.batches.split(",")):
            runs = [
                run_sink(batch, args.seconds, profile(f"sink-{batch}")) for _ in range(args.repeat)
            ]
            rows.append((f"sink, batches of {batch} at {SINK_RATE:,} msg/s", _median(runs)))
    results["load_after"] = os.getloadavg()[0]
    results["rows"] = dict(rows)
    print(f"load average {results['load_before']:.1f} -> {results['load_after']:.1f}")
    print("| path | us of CPU a message (user) | CPU % | sink: received, p50 / p99 ms |")
    print("|---|---:|---:|---:|")
    for name, row in rows:
        cpu = f"{row['cpu_percent']:.0f}" if "cpu_percent" in row else ""
        heard = (
            f"{row['received']:.0%}, {row['p50_ms']:.1f} / {row['p99_ms']:.1f}"
            if "p99_ms" in row
            else ""
        )
        user = f" ({row['user_us']:.2f})" if "user_us" in row else ""
        print(f"| {name} | {row['us_per_message']:.2f}{user} | {cpu} | {heard} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


if __name__ == "__main__":
    raise SystemExit(main())
