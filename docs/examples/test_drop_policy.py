"""Testing a drop policy: a stalled sink, a full queue, and which messages survive."""

from __future__ import annotations

import pytest
import trio.testing

from trio_gateway import RingBuffer
from trio_gateway.testing import GatewayFactory, MemorySource, RecordingSink

pytestmark = pytest.mark.trio


async def test_drop_oldest_keeps_the_latest_readings(
    autojump_clock: trio.testing.MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    gateway = await gateway_factory(queue=RingBuffer(3, policy="drop_oldest"))

    # The destination stops answering while it holds the first message.
    recording_sink.stall()
    await memory_source.send(b"reading 0")
    await recording_sink.wait_stalled()

    # Ten more readings arrive; only three fit behind the stalled send.
    for i in range(1, 11):
        await memory_source.send(b"reading %d" % i)
    assert gateway.statistics().queue.dropped["drop_oldest"] == 7

    # An hour later (virtual time: the test takes milliseconds) the destination is back.
    await trio.sleep(3600)
    recording_sink.recover()
    await recording_sink.wait_for(4)
    assert recording_sink.payloads == [b"reading 0", b"reading 8", b"reading 9", b"reading 10"]

    ledger = await gateway.shutdown()
    assert ledger.dropped["drop_oldest"] == 7
    assert ledger.balanced
