"""Testing the shutdown: the drain deadline, and a ledger that accounts for every message."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_gateway import Gateway, RetryPolicy
from trio_gateway.testing import MemorySource, RecordingSink, open_gateway

pytestmark = pytest.mark.trio


async def test_drain_deadline_abandons_what_a_stalled_sink_cannot_take(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, sink = MemorySource(), RecordingSink()
    gateway = Gateway(sources=[source], sink=sink, drain_timeout=5.0)

    async with open_gateway(gateway) as handle:
        await source.send_many([b"a", b"b"])
        await sink.wait_for(2)
        sink.stall()
        await source.send_many([b"c", b"d", b"e"])
        await sink.wait_stalled()
        started = trio.current_time()
    # Leaving the block shut the gateway down: it waited 5 (virtual) seconds for the sink.
    assert trio.current_time() - started == pytest.approx(5.0)

    ledger = handle.ledger
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (5, 2, 3)
    assert ledger.received == ledger.delivered + sum(ledger.dropped.values()) + ledger.abandoned
    assert ledger.balanced


async def test_a_flaky_sink_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    source, sink = MemorySource(), RecordingSink()
    gateway = Gateway(sources=[source], sink=sink, retry=RetryPolicy(initial=1.0, maximum=10.0))

    async with open_gateway(gateway) as handle:
        sink.fail(times=5)  # the next five sends raise SinkError
        await source.send_many([b"x"] * 100)
        await sink.wait_for(100)  # retried with backoff: ~30 virtual seconds

    assert handle.statistics().sink_retries == 5
    assert handle.ledger.delivered == 100
    assert handle.ledger.balanced
