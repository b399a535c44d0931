"""Testing with real sockets: a TCP listener on port 0 beside the recording sink."""

from __future__ import annotations

import pytest
import trio

from trio_gateway import Gateway, TcpSource
from trio_gateway.testing import RecordingSink, open_gateway

pytestmark = pytest.mark.trio


async def test_a_tcp_client_reaches_the_sink() -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink)  # port 0: the OS picks one

    with trio.fail_after(10):
        async with open_gateway(gateway) as handle:
            stream = await trio.open_tcp_stream(*handle.address())
            async with stream:
                await stream.send_all(b"one\ntwo\n")
            await sink.wait_for(2)

    assert sink.payloads == [b"one", b"two"]
    assert handle.ledger.delivered == 2
