"""ns per put+get for the four queues beside a bare collections.deque, at the talk's sizes.

    python -m bench.queues [--quick] [--json FILE] [--repeats N]

Three ways of moving a message through each queue, all in one Trio task (no contention: this
measures the data structure and the Trio machinery, not scheduling between tasks):

* sync:     ``put_nowait`` + ``get_nowait`` per message
            (deque: ``append`` + ``popleft``)
* await:    ``await put`` + ``await get`` per message: two checkpoints per message
            (deque: ``append`` + ``popleft`` + two ``trio.lowlevel.checkpoint()``)
* batched:  ``put_many_nowait`` of 256 + ``await get_batch(256)``, per message
            (deque: ``extend`` + 256 ``popleft`` + one checkpoint per batch)

Each cell is the median of ``--repeats`` runs; the ratio is to the deque in the same column.
Payloads are the shared ones from ``bench/_payloads.py``. The queues hold references, so the
message size only matters through cache effects (and ``max_bytes`` accounting, off here).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.queues")

import argparse
import collections
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from trio_gateway.queues import QUEUE_KINDS, Queue

from ._payloads import SIZES, payloads

BATCH = 256
CAPACITY = 4096
MODES = ("sync", "await", "batched")
ROWS = ("deque", *QUEUE_KINDS)
TARGET_RATIO = 6.0

Runner = Callable[[Sequence[bytes], int], Awaitable[int]]


# -- one measurement: returns elapsed ns for `count` messages ------------------------------


async def deque_sync(messages: Sequence[bytes], count: int) -> int:
    d: collections.deque[bytes] = collections.deque()
    append, popleft = d.append, d.popleft
    n = len(messages)
    start = time.perf_counter_ns()
    for i in range(count):
        append(messages[i % n])
        popleft()
    return time.perf_counter_ns() - start


async def deque_await(messages: Sequence[bytes], count: int) -> int:
    d: collections.deque[bytes] = collections.deque()
    append, popleft = d.append, d.popleft
    checkpoint = trio.lowlevel.checkpoint
    n = len(messages)
    start = time.perf_counter_ns()
    for i in range(count):
        append(messages[i % n])
        await checkpoint()
        popleft()
        await checkpoint()
    return time.perf_counter_ns() - start


async def deque_batched(messages: Sequence[bytes], count: int) -> int:
    d: collections.deque[bytes] = collections.deque()
    extend, popleft = d.extend, d.popleft
    checkpoint = trio.lowlevel.checkpoint
    batch = list(messages[:BATCH])
    take = range(BATCH)
    start = time.perf_counter_ns()
    for _ in range(count // BATCH):
        extend(batch)
        await checkpoint()
        [popleft() for _ in take]
    return time.perf_counter_ns() - start


def queue_runners(kind: str) -> dict[str, Runner]:
    make = QUEUE_KINDS[kind]

    async def sync(messages: Sequence[bytes], count: int) -> int:
        queue: Queue[Any] = make(CAPACITY)
        put, get = queue.put_nowait, queue.get_nowait
        n = len(messages)
        start = time.perf_counter_ns()
        for i in range(count):
            put(messages[i % n])
            get()
        return time.perf_counter_ns() - start

    async def awaiting(messages: Sequence[bytes], count: int) -> int:
        queue: Queue[Any] = make(CAPACITY)
        put, get = queue.put, queue.get
        n = len(messages)
        start = time.perf_counter_ns()
        for i in range(count):
            await put(messages[i % n])
            await get()
        return time.perf_counter_ns() - start

    async def batched(messages: Sequence[bytes], count: int) -> int:
        queue: Queue[Any] = make(CAPACITY)
        put_many, get_batch = queue.put_many_nowait, queue.get_batch
        batch = list(messages[:BATCH])
        start = time.perf_counter_ns()
        for _ in range(count // BATCH):
            put_many(batch)
            await get_batch(BATCH)
        return time.perf_counter_ns() - start

    return {"sync": sync, "await": awaiting, "batched": batched}


RUNNERS: dict[str, dict[str, Runner]] = {
    "deque": {"sync": deque_sync, "await": deque_await, "batched": deque_batched},
    **{kind: queue_runners(kind) for kind in QUEUE_KINDS},
}


# -- the run --------------------------------------------------------------------------------


async def measure(counts: dict[str, int], repeats: int) -> dict[tuple[str, str, int], float]:
    """Median ns per message for every (row, mode, size)."""
    results: dict[tuple[str, str, int], float] = {}
    for size in SIZES:
        messages = payloads(size, BATCH)
        for mode in MODES:
            count = counts[mode]
            samples: dict[str, list[float]] = {row: [] for row in ROWS}
            # Interleave the rows within each repeat, so that noise from the rest of the
            # machine spreads over all of them instead of landing on one.
            for _ in range(repeats):
                for row in ROWS:
                    gc.collect()
                    gc.disable()
                    try:
                        elapsed = await RUNNERS[row][mode](messages, count)
                    finally:
                        gc.enable()
                    samples[row].append(elapsed / count)
            for row in ROWS:
                results[(row, mode, size)] = statistics.median(samples[row])
    return results


def markdown(results: dict[tuple[str, str, int], float]) -> str:
    lines: list[str] = []
    titles = {
        "sync": "put_nowait + get_nowait per message",
        "await": "await put + await get per message",
        "batched": f"put_many_nowait({BATCH}) + await get_batch({BATCH}), per message",
    }
    for mode in MODES:
        lines.append(f"**{mode}**: {titles[mode]}; ns per message (ratio to deque)")
        lines.append("")
        lines.append("| queue | " + " | ".join(f"{size} B" for size in SIZES) + " |")
        lines.append("|---|" + "---:|" * len(SIZES))
        for row in ROWS:
            cells = []
            for size in SIZES:
                ns = results[(row, mode, size)]
                ratio = ns / results[("deque", mode, size)]
                cells.append(f"{ns:,.0f} ({ratio:.1f}x)")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def verdict(results: dict[tuple[str, str, int], float]) -> str:
    lines = []
    for size in SIZES:
        sync = {row: results[(row, "sync", size)] for row in ROWS if row != "deque"}
        fastest = min(sync, key=sync.__getitem__)
        ratio = sync["ring"] / results[("deque", "sync", size)]
        ok = fastest == "ring" and ratio <= TARGET_RATIO
        lines.append(
            f"{size:>6} B: fastest queue (sync) = {fastest}; ring = {ratio:.1f}x deque "
            f"(target <= {TARGET_RATIO:.0f}x): {'ok' if ok else 'MISSED'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (< 10 s)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (median)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.quick:
        counts = {"sync": 4_000, "await": 1_000, "batched": 16 * BATCH}
        repeats = args.repeats or 3
    else:
        counts = {"sync": 15_000, "await": 3_000, "batched": 60 * BATCH}
        repeats = args.repeats or 7

    started = time.perf_counter()
    results = trio.run(measure, counts, repeats)
    elapsed = time.perf_counter() - started

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"# Queues: ns per message ({machine}, trio {trio.__version__})")
    print()
    print(markdown(results))
    print(verdict(results))
    print(f"\n{repeats} repeats per cell, median; run took {elapsed:.1f} s")
    if args.json:
        document = {
            "benchmark": "queues",
            "machine": machine,
            "python": platform.python_version(),
            "trio": trio.__version__,
            "repeats": repeats,
            "messages": counts,
            "batch": BATCH,
            "elapsed_s": round(elapsed, 2),
            "results": [
                {
                    "queue": row,
                    "mode": mode,
                    "size": size,
                    "ns_per_message": round(ns, 1),
                    "ratio_to_deque": round(ns / results[("deque", mode, size)], 2),
                }
                for (row, mode, size), ns in results.items()
            ],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
