"""The pytest plugin: fixtures built on the test kit.

Registered through the entry point ``trio_gateway = "trio_gateway.testing._plugin"`` in the
``pytest11`` group, so installing trio_gateway makes the fixtures available. They need
pytest-trio (async fixtures, a Trio test), in ``trio_mode`` or with ``@pytest.mark.trio``, and
work with its ``autojump_clock``.

* ``memory_source``: a fresh :class:`~trio_gateway.testing.MemorySource`;
* ``recording_sink``: a fresh :class:`~trio_gateway.testing.RecordingSink`;
* ``gateway_factory``: a :class:`~trio_gateway.testing.GatewayFactory` whose gateways read
  ``memory_source`` and write to ``recording_sink`` unless told otherwise. At the end of the
  test every gateway still running is shut down gracefully, and the test fails if any
  gateway's shutdown ledger does not balance.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from ._harness import GatewayFactory
from ._sink import RecordingSink
from ._source import MemorySource

__all__ = ("gateway_factory", "memory_source", "recording_sink")


@pytest.fixture
def memory_source() -> MemorySource:
    """An in-memory source the test feeds with ``await memory_source.send(b"...")``."""
    return MemorySource()


@pytest.fixture
def recording_sink() -> RecordingSink:
    """A sink that records every batch and can be told to fail, stall or recover."""
    return RecordingSink()


@pytest.fixture
async def gateway_factory(
    memory_source: MemorySource, recording_sink: RecordingSink
) -> AsyncIterator[GatewayFactory]:
    """``handle = await gateway_factory(processor=..., queue=...)`` runs a gateway for the test."""
    async with trio.open_nursery() as nursery:
        factory = GatewayFactory(nursery, sources=[memory_source], sink=recording_sink)
        yield factory
        ledgers = await factory.aclose()
    unbalanced = [ledger for ledger in ledgers if not ledger.balanced]
    if unbalanced:
        pytest.fail(
            "gateway shutdown ledger does not balance: "
            + "; ".join(ledger.to_json() for ledger in unbalanced)
        )
