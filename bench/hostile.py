"""Hostile peers, longer and larger: the attacks of tests/e2e/test_hostile_*.py against ``serve``.

    python -m bench.hostile                       # every attack at 1, 10 and 100 connections
    python -m bench.hostile --only body-stall --scales 1 10 --duration 20
    python -m bench.hostile --json hostile.json

For each attack and scale, a fresh ``python -m trio_gateway serve`` (every listener on, sink
``null``, the admin endpoint; ``--idle-timeout`` on the stream listeners, 5 s by default so
that deadlines come within the run; ``max_connections`` 1,024) is started. A well-behaved
client (HTTP/1.1 ``POST``, or for the gRPC attacks a grpcio unary ``Send``; a new connection
per request, one at a time, in a process of its own so that the attackers' CPU does not show
in its figures) runs alone for
``--baseline`` seconds, then beside the attack for ``--duration`` seconds. Printed per row:
the gateway's peak RSS (``VmHWM``), the good client's p50/p99 alone and under attack and its
failures, what the attackers saw (cut, and when), the refusal counters from ``/metrics`` and
whether the shutdown ledger balanced.

The attacks (clients in tests/hostile_kit.py):

* ``body-stall``: per connection, 100 HTTP/2 streams whose bodies (1 MB each) never finish,
  kept alive with PINGs;
* ``slowloris``: HTTP/2 connections sending their preface and a HEADERS frame one byte every
  2 s;
* ``rapid-reset``: per connection, HEADERS + RST_STREAM pairs, 500 per write, 40 writes;
* ``idle-flood``: 50 idle TCP connections per scale unit on each of the TCP and HTTP
  listeners (5,000 on each at scale 100; the limit is 1,024 per listener);
* ``requests``: ``--requests`` HTTP/2 requests one after another on one connection (scale
  ignored), each waiting for its answer;
* ``grpc-stall``: per connection, 64 streaming gRPC calls, each a message announced at 4 MiB
  whose bytes come as far as the windows allow and never complete, kept alive with PINGs;
* ``grpc-bomblets``: per connection, 24 bidi calls in one write, each a 3 KB gzip message
  that inflates to 3 MiB, from a client that opens no window for the acks;
* ``grpc-reset``: ``rapid-reset`` against the gRPC listener.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hostile_kit import (
    Gateway,
    GoodClient,
    Outcome,
    grpc_bomblets,
    h2_body_stall,
    h2_rapid_reset,
    h2_sequential,
    h2_slowloris,
    idle_connections,
    ledger_of,
)

REASONS = (
    "too_slow",
    "rapid_reset",
    "evicted",
    "over_budget",
    "over_budget_evicted",
    "too_many_connections",
    "idle_timeout",
    "malformed",
    "too_many_streams",
    "internal_error",
)
ATTACKS = (
    "body-stall",
    "slowloris",
    "rapid-reset",
    "idle-flood",
    "requests",
    "grpc-stall",
    "grpc-bomblets",
    "grpc-reset",
)
GRPC_ATTACKS = ("grpc-stall", "grpc-bomblets", "grpc-reset")


@dataclass
class Row:
    attack: str
    scale: int
    peak_rss_mib: float = 0.0
    resting_rss_mib: float = 0.0
    good_alone_ms: tuple[float, float] = (math.nan, math.nan)
    good_attacked_ms: tuple[float, float] = (math.nan, math.nan)
    good_served: int = 0
    good_failures: dict[str, int] = field(default_factory=dict)
    attackers_cut: int = 0
    cut_after_s: float = math.nan
    attacker_note: str = ""
    counters: dict[str, float] = field(default_factory=dict)
    balanced: bool = False


async def _attack(
    name: str, gateway: Gateway, scale: int, duration: float, requests: int
) -> tuple[list[Outcome], Callable[[], Any]]:
    """Run one attack at ``scale``; returns the attackers' outcomes and a cleanup."""
    http = gateway.address("http")
    grpc = gateway.address("grpc")
    outcomes: list[Outcome] = []
    held: list[trio.SocketStream] = []

    async def collect(attack: Awaitable[Outcome]) -> None:
        outcomes.append(await attack)

    async with trio.open_nursery() as nursery:
        for _ in range(scale if name not in ("idle-flood", "requests") else 0):
            if name == "body-stall":
                nursery.start_soon(collect, h2_body_stall(http, duration=duration))
            elif name == "slowloris":
                nursery.start_soon(collect, h2_slowloris(http, interval=2.0, duration=duration))
            elif name == "rapid-reset":
                nursery.start_soon(collect, h2_rapid_reset(http, pairs_per_write=500, writes=40))
            elif name == "grpc-stall":
                attack = h2_body_stall(grpc, duration=duration, grpc=True, streams=64)
                nursery.start_soon(collect, attack)
            elif name == "grpc-bomblets":
                nursery.start_soon(collect, grpc_bomblets(grpc, duration=duration))
            elif name == "grpc-reset":
                nursery.start_soon(
                    collect, h2_rapid_reset(grpc, pairs_per_write=500, writes=40, grpc=True)
                )
        if name == "idle-flood":
            for transport in ("tcp", "http"):
                held += await idle_connections(gateway.address(transport), 50 * scale)
            await trio.sleep(duration)
        elif name == "requests":
            outcomes.append(await h2_sequential(http, requests))

    async def cleanup() -> None:
        for stream in held:
            await stream.aclose()

    return outcomes, cleanup


def _ms(good: GoodClient) -> tuple[float, float]:
    return (good.percentile(0.5) * 1000, good.percentile(0.99) * 1000)


async def _measure(name: str, scale: int, args: argparse.Namespace, directory: Path) -> Row:
    row = Row(name, scale)
    gateway = Gateway(directory, idle_timeout=args.idle_timeout, max_connections=1024)
    try:
        kind = "grpc" if name in GRPC_ATTACKS else "http"
        alone = GoodClient(gateway.address(kind), kind)
        await alone.run_elsewhere(args.baseline)
        row.good_alone_ms = _ms(alone)
        row.resting_rss_mib = gateway.rss_mib()
        gateway.reset_peak_rss()
        good = GoodClient(gateway.address(kind), kind)
        outcomes: list[Outcome] = []
        cleanup: Callable[[], Any] | None = None

        async def attack() -> None:
            nonlocal outcomes, cleanup
            outcomes, cleanup = await _attack(name, gateway, scale, args.duration, args.requests)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack)
            nursery.start_soon(good.run_elsewhere, args.duration)
        row.peak_rss_mib = gateway.peak_rss_mib()
        row.good_attacked_ms = _ms(good)
        row.good_served = len(good.latencies)
        row.good_failures = dict(good.failures)
        cuts = [o.cut_after for o in outcomes if o.cut_after is not None]
        row.attackers_cut = len(cuts)
        row.cut_after_s = max(cuts) if cuts else math.nan
        if name == "requests" and outcomes:
            done = outcomes[0]
            rate = done.ended / done.took if done.took else math.nan
            row.attacker_note = f"answered {dict(done.statuses)} at {rate:,.0f} req/s"
        elif name == "body-stall" and outcomes:
            row.attacker_note = f"sent {max(o.sent_bytes for o in outcomes) / 1e6:.1f} MB/conn"
        row.counters = {reason: gateway.rejected(reason) for reason in REASONS}
        if cleanup is not None:
            await cleanup()
    finally:
        code, log = gateway.stop()
    try:
        row.balanced = bool(ledger_of(log)["balanced"]) and code == 0
    except AssertionError:
        row.balanced = False
    return row


def _print(row: Row) -> None:
    counters = ", ".join(f"{k} {v:.0f}" for k, v in row.counters.items() if v)
    alone, attacked = row.good_alone_ms, row.good_attacked_ms
    failures = sum(row.good_failures.values())
    print(
        f"{row.attack:<12} x{row.scale:<4} peak RSS {row.peak_rss_mib:6.1f} MiB "
        f"(rest {row.resting_rss_mib:5.1f}) | good p50/p99 alone {alone[0]:.1f}/{alone[1]:.1f} "
        f"ms, attacked {attacked[0]:.1f}/{attacked[1]:.1f} ms, served {row.good_served}, "
        f"failed {failures} | cut {row.attackers_cut} (last at {row.cut_after_s:.1f} s) "
        f"{row.attacker_note} | {counters or 'no refusals'} | ledger "
        f"{'balanced' if row.balanced else 'NOT balanced'}",
        flush=True,
    )


async def _main(args: argparse.Namespace) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or ATTACKS:
            for scale in [1] if name == "requests" else args.scales:
                started = time.perf_counter()
                row = await _measure(name, scale, args, Path(tmp))
                _print(row)
                rows.append(row)
                print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=ATTACKS)
    parser.add_argument("--scales", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per attack")
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds unattacked")
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = trio.run(_main, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
