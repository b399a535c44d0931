"""Where a server's CPU goes in one case of ``python -m bench``: cProfile, per message.

    python -m bench.profile ROW [--size 18] [--inflight N] [--parallel] [--impl IMPL]
                                [--seconds S] [--top N]

Runs the case the way the runner does (the same server process, the same clients), after a
warm-up, with the server under cProfile from the start signal to its last message; prints
the server's time per message (the time its event loop waited in ``epoll`` left out), then
that time by area (trio's scheduler and I/O, h2, hpack,
h11, protobuf, trio_gateway's own modules, the kernel calls) and the functions that spend
most of it, in microseconds per message. cProfile's own cost inflates Python-heavy code
(about 1.5 to 2x here), so quote the shares, and the CPU figure of the benchmark run.
``ROW`` is a row key of :mod:`bench.run` (``grpc-frames``, ``grpc-send``, ``http-wire`` ...).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.profile")

import argparse
import os
import pstats
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .run import ROWS, UNARY_CLIENTS, Server, run_once

AREAS = (
    ("trio_gateway/sources/_http2", "trio_gateway HTTP/2 layer (gRPC and h2c)"),
    ("trio_gateway/sources/_streamio", "trio_gateway HTTP/2 layer (gRPC and h2c)"),
    ("trio_gateway/sources/grpc", "trio_gateway gRPC server"),
    ("trio_gateway/sources/http", "trio_gateway HTTP source"),
    ("trio_gateway/", "trio_gateway (queue, pump, sink, ingress)"),
    ("trio/_core", "trio scheduler and I/O"),
    ("trio/", "trio streams and sockets"),
    ("h2/", "h2 + hyperframe (HTTP/2 state machine)"),
    ("hyperframe/", "h2 + hyperframe (HTTP/2 state machine)"),
    ("hpack/", "hpack"),
    ("h11/", "h11"),
    ("hypercorn/", "hypercorn"),
    ("grpclib/", "grpclib"),
    ("grpc/", "grpcio (Python side)"),
    ("uvicorn/", "uvicorn"),
    ("asyncio/", "asyncio"),
    ("google/protobuf", "protobuf"),
    ("bench/", "the bench harness (count poll)"),
)
"""Areas by the start of a file's path (site-packages and the repository stripped)."""


def area(filename: str, name: str) -> str:
    if filename == "~":
        if "socket" in name or "recv" in name or "send" in name or "epoll" in name:
            return "kernel calls (socket, epoll)"
        return "built-ins"
    short = _short(filename)
    for start, label in AREAS:
        if short.startswith(start) or f"/{start}" in short:
            return label
    return "other Python"


IDLE = ("<method 'poll' of 'select.epoll' objects>", "<built-in method select.select>")
"""Where an event loop waits for the kernel: wall time, not CPU; left out of the figures."""


def report(path: Path, count: int, top: int) -> None:
    stats = pstats.Stats(str(path))
    raw = dict(stats.stats)  # type: ignore[attr-defined]
    idle = sum(raw.pop(key)[2] for key in list(raw) if key[0] == "~" and key[2] in IDLE)
    total = sum(tt for (_, _, tt, _, _) in raw.values())
    print(f"waiting in epoll (left out): {idle / count * 1e6:,.1f} us a message")
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _, name), (_, _, tt, _, _) in raw.items():
        by_area[area(filename, name)] += tt
    print(f"profiled server CPU: {total / count * 1e6:,.1f} us a message ({count:,} messages)\n")
    print("| area | us a message | share |\n|---|---:|---:|")
    for label, tt in sorted(by_area.items(), key=lambda item: -item[1]):
        if tt / total >= 0.005:
            print(f"| {label} | {tt / count * 1e6:,.2f} | {tt / total:.0%} |")
    print("\n| function | calls a message | us a message (own) | share |\n|---|---:|---:|---:|")
    rows = sorted(raw.items(), key=lambda item: -item[1][2])[:top]
    for (filename, line, name), (_, calls, tt, _, _) in rows:
        where = filename if filename == "~" else f"{_short(filename)}:{line}"
        print(
            f"| `{name}` ({where}) | {calls / count:,.2f} | {tt / count * 1e6:,.2f} | "
            f"{tt / total:.0%} |"
        )


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "trio_gateway", "bench"):
        if anchor in parts:
            at = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[at + (anchor == "site-packages") :])
    if "python3" in filename:  # the standard library
        return "/".join(parts[-2:])
    return Path(filename).name


def _keep(path: Path) -> None:
    keep = os.environ.get("BENCH_PROFILE_KEEP")
    if keep:
        Path(keep).write_bytes(path.read_bytes())


def main(argv: Sequence[str] | None = None) -> None:
    rows = {row.key: row for row in ROWS}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=sorted(rows))
    parser.add_argument("--size", type=int, default=18)
    parser.add_argument("--inflight", type=int, default=1, help="wire rows: calls in flight")
    parser.add_argument("--parallel", type=int, default=1, help="client connections (processes)")
    parser.add_argument("--impl", default="trio_gateway", help="the server to profile")
    parser.add_argument("--seconds", type=float, default=2.0, help="about how long to profile")
    parser.add_argument("--top", type=int, default=15, help="functions to list")
    args = parser.parse_args(argv)
    row = rows[args.row]
    if args.impl not in row.impls:
        parser.error(f"{args.row} is measured with {', '.join(row.impls)}")
    with tempfile.TemporaryDirectory(prefix="trio_gateway-profile-") as tmp:
        work = Path(tmp)
        path = work / "server.prof"
        server = Server(row, args.impl, args.size, work, profile=path)
        try:
            server.wait_ready()
            unary = row.client in UNARY_CLIENTS
            warm = 200 if unary else max(1000, (8 << 20) // args.size)
            warm -= warm % args.parallel
            sample = run_once(server, warm, args.parallel, timeout=60, inflight=args.inflight)
            rate = sample.count / max(sample.elapsed, 1e-6)
            count = max(args.parallel * 20, int(rate * args.seconds))
            count -= count % args.parallel
            sample = run_once(server, count, args.parallel, timeout=120, inflight=args.inflight)
            server.after_run()
        finally:
            server.close()
        print(
            f"{row.title}, {args.size} B, {args.impl}, {args.parallel} connection(s), "
            f"{args.inflight} in flight: {sample.ns_per_op or 0:,.0f} ns a message under the "
            f"profiler, load {os.getloadavg()[0]:.2f}\n"
        )
        _keep(path)
        report(path, sample.count, args.top)


if __name__ == "__main__":
    main()
