"""``send --retries`` across the gateway's going away: the run reconnects with backoff and
resends what was not acknowledged, so it ends with every message accepted.

In-process gateways on one port: the first is stopped mid-run (gracefully: its GOAWAY, close
``1001`` or closed connections, then a refused port), a second starts on the same port, and
the union of what both delivered holds every message (at-least-once: a message may be in
both). The ``kill -9`` version, a ``serve`` subprocess restarted with ids into JetStream, is
tests/e2e/test_send_retries_restart.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import trio
from helpers import wait_until
from test_send_errors import LISTENERS, target

from trio_gateway import Gateway, RingBuffer
from trio_gateway.loadgen import SendSummary, make_payload, send
from trio_gateway.testing import RecordingSink, start_gateway

CLIENTS: dict[str, tuple[str, dict[str, object]]] = {
    "http": ("http", {"concurrency": 2}),
    "http-ndjson": ("http", {"ndjson": 10}),
    "ws": ("ws", {}),
    "ws-acks": ("ws", {"acks": True, "concurrency": 2}),
    "grpc-unary": ("grpc", {"mode": "unary", "concurrency": 4}),
    "grpc-stream": ("grpc", {"mode": "stream"}),
    "grpc-bidi": ("grpc", {"mode": "bidi", "concurrency": 2}),
}
COUNT = 1500


def gateway_on(transport: str, port: int, sink: RecordingSink) -> Gateway:
    source: Callable[..., object] = LISTENERS[transport]
    return Gateway(
        sources=[source("127.0.0.1", port)],  # type: ignore[list-item]
        sink=sink,
        queue=RingBuffer(100_000),
        grace_period=0.2,
        drain_timeout=5,
    )


async def sending(result: list[SendSummary], transport: str, port: int, **options: Any) -> None:
    """A run of COUNT messages at 4,000 a second (long enough to be cut), into ``result``."""
    result.append(
        await send(
            transport,
            target(transport, port),
            count=COUNT,
            size=18,
            rate=4000,
            step_timeout=10,
            **options,
        )
    )


@pytest.mark.parametrize("stop", ["shutdown", "abort"])
@pytest.mark.parametrize(
    "client",
    # a gRPC call per message: about 1,500 a second here, so 2 s or more for the run
    [pytest.param(c, marks=pytest.mark.slow) if c == "grpc-unary" else c for c in CLIENTS],
)
async def test_send_retries_survives_a_restart_of_the_gateway(client: str, stop: str) -> None:
    """``shutdown``: the gateway leaves in its protocol (GOAWAY, close 1001, the connection
    closed after an answer) and delivers what it took. ``abort``: it drops its connections
    mid-write, as a crash does, and abandons what it held (acknowledged as queued, so not
    in its sink: only the client's count is checked then)."""
    transport, options = CLIENTS[client]
    first, second = RecordingSink(), RecordingSink()
    result: list[SendSummary] = []
    async with trio.open_nursery() as nursery:
        handle = await start_gateway(nursery, gateway_on(transport, 0, first))
        port = handle.address()[1]

        nursery.start_soon(partial(sending, result, transport, port, retries=10, **options))
        await wait_until(lambda: handle.ledger.received >= 300, what="the first messages")
        if stop == "abort":
            handle.abort()
            await handle.wait_stopped()
        else:
            await handle.shutdown()
        # Down for a moment: the reconnects are refused, then come back (backoff).
        await trio.sleep(0.3)
        again = await start_gateway(nursery, gateway_on(transport, port, second))
        await wait_until(lambda: bool(result), timeout=30, what="the end of the run")
        await again.shutdown()
    [summary] = result
    line = summary.line()
    assert summary.all_accepted and summary.accepted == COUNT, line
    assert summary.stopped is None and summary.given_up == 0, line
    assert summary.reconnects >= 1 and "; reconnected" in line, line
    if stop == "abort":
        return
    stored = set(first.payloads) | set(second.payloads)
    assert stored == {make_payload(18, seq) for seq in range(COUNT)}, line
    assert second.payloads, line  # the run went on against the new gateway


async def test_send_retries_gives_up_when_the_gateway_stays_away() -> None:
    sink = RecordingSink()
    result: list[SendSummary] = []
    async with trio.open_nursery() as nursery:
        handle = await start_gateway(nursery, gateway_on("http", 0, sink))
        port = handle.address()[1]

        nursery.start_soon(partial(sending, result, "http", port, ndjson=10, retries=2))
        await wait_until(lambda: handle.ledger.received >= 100, what="the first messages")
        await handle.shutdown()
        await wait_until(lambda: bool(result), timeout=30, what="the end of the run")
    [summary] = result
    line = summary.line()
    # Two tries of the batch in flight, refused (nothing listens): it is given up, the run
    # stops, and every message is still in one bucket.
    assert not summary.all_accepted and summary.stopped is not None, line
    assert summary.given_up == 10 and "; gave up on 10" in line, line
    assert summary.accepted == len(sink.payloads), line
    assert summary.accepted + summary.rejected_count == COUNT, line
