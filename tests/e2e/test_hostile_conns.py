"""Connection lockout against ``serve`` (every listener on, a subprocess): idle connections
fill ``max_connections`` and keep coming; a new well-behaved client must still be served
within seconds, not after the idle timeout. The longest-silent connections make room
(counted ``evicted``); nothing is counted ``internal_error``; memory stays flat; the ledger
balances at the end. bench/hostile.py runs it with 5,000 connections against the default
limit of 1,024 (figures in docs/reliability.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from hostile_kit import Gateway, GoodClient, closed_by_server, idle_connections, ledger_of

from trio_gateway.sources._base import EVICT_AFTER

LIMIT = 64
IDLE = 4 * LIMIT
IDLE_TIMEOUT = 300.0  # serve's TCP default: a lockout would last this long


async def tcp_message_arrives(gateway: Gateway, payload: bytes) -> float:
    """Seconds from connecting to the TCP listener until the gateway counts the message."""
    start = time.perf_counter()
    before = gateway.received()
    async with await trio.open_tcp_stream(*gateway.address("tcp")) as stream:
        await stream.send_all(payload + b"\n")
        while gateway.received() == before:
            await trio.sleep(0.02)
    return time.perf_counter() - start


@pytest.mark.slow
async def test_idle_connections_cannot_lock_new_clients_out(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, idle_timeout=IDLE_TIMEOUT, max_connections=LIMIT)
    held: list[trio.SocketStream] = []
    try:
        resting = gateway.rss_mib()
        with trio.fail_after(20):
            for transport in ("tcp", "http"):
                held += await idle_connections(gateway.address(transport), IDLE)
            # the limit is full of silent connections; once they are silent long enough,
            # each newcomer takes the slot of the longest-silent one
            await trio.sleep(EVICT_AFTER)
            assert await tcp_message_arrives(gateway, b"good-tcp") < 5
            good = GoodClient(gateway.address("http"))
            assert await good.request(b"good-http") == 202
            assert good.latencies[0] < 5
        assert gateway.rejected("evicted", "tcp") >= 1
        assert gateway.rejected("evicted", "http") >= 1
        assert gateway.rejected("internal_error") == 0
        assert await closed_by_server(held) >= 2 * (IDLE - LIMIT)
        assert gateway.peak_rss_mib() < resting + 32
    finally:
        for stream in held:
            await stream.aclose()
        code, log = gateway.stop()
    assert code == 0
    ledger = ledger_of(log)
    assert ledger["received"] == 2 and ledger["balanced"], ledger
