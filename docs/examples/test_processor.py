"""Testing a processor: transform, filter, and what happens when it raises."""

from __future__ import annotations

import json

import pytest

from trio_gateway import Message
from trio_gateway.testing import GatewayFactory, MemorySource, RecordingSink

pytestmark = pytest.mark.trio  # not needed with trio_mode = true


def to_celsius(message: Message) -> bytes | None:
    """Drop heartbeats; convert Fahrenheit readings to Celsius."""
    reading = json.loads(message.payload)  # raises on bad JSON: counted, not fatal
    if reading.get("type") == "heartbeat":
        return None
    if reading["unit"] == "F":
        reading = {"t": round((reading["t"] - 32) * 5 / 9, 1), "unit": "C"}
    return json.dumps(reading).encode()


async def test_to_celsius(
    gateway_factory: GatewayFactory, memory_source: MemorySource, recording_sink: RecordingSink
) -> None:
    gateway = await gateway_factory(processor=to_celsius)

    await memory_source.send(b'{"t": 212, "unit": "F"}')
    await memory_source.send(b'{"type": "heartbeat"}')
    await memory_source.send(b"not json")
    await memory_source.send(b'{"t": 21.5, "unit": "C"}')

    ledger = await gateway.shutdown()
    assert [json.loads(p) for p in recording_sink.payloads] == [
        {"t": 100.0, "unit": "C"},
        {"t": 21.5, "unit": "C"},
    ]
    assert ledger.dropped["filtered"] == 1  # the heartbeat
    assert ledger.dropped["processor_error"] == 1  # the bad JSON
    assert gateway.statistics().failed == {"JSONDecodeError": 1}
    assert ledger.balanced
