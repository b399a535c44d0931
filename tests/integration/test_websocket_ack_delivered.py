"""WebSocket acks with ``ack = "delivered"``: the connection keeps being read while earlier
reads wait for their delivery (a bounded number of them), and the acks still come in order."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from helpers import wait_until
from test_websocket_acks import raw_client, settle
from websockets.client import ClientProtocol
from websockets.frames import Frame

from trio_gateway import Batch, Gateway, RingBuffer, SinkRefused, WebSocketSource
from trio_gateway.queues import Queue
from trio_gateway.sinks import Sink
from trio_gateway.sources import _flight


class GatedSink(Sink):
    """Holds every batch until ``gate`` is set; refuses payloads starting with ``bad``."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.delivered: list[bytes] = []

    async def send(self, batch: Batch) -> None:
        await self.gate.wait()
        refused = [i for i, p in enumerate(batch.payloads) if p.startswith(b"bad")]
        self.delivered += [p for i, p in enumerate(batch.payloads) if i not in refused]
        if refused:
            raise SinkRefused("refused", indices=refused, reason="test")


@asynccontextmanager
async def delivered_gateway(
    queue: Queue[bytes] | None = None, **options: Any
) -> AsyncIterator[tuple[Gateway, GatedSink, str]]:
    sink = GatedSink()
    source = WebSocketSource(port=0, max_message_size=options.pop("max_message_size", 1 << 20))
    gateway = Gateway(sources=[source], sink=sink, queue=queue, ack="delivered", **options)
    async with trio.open_nursery() as nursery:
        ((address,),) = await nursery.start(gateway.run)
        yield gateway, sink, f"ws://{address[0]}:{address[1]}/"
        gateway.shutdown()


async def send_one_by_one(
    gateway: Gateway, stream: trio.SocketStream, protocol: ClientProtocol, messages: list[bytes]
) -> None:
    """One write per message, each read by the gateway before the next is written."""
    for message in messages:
        received = gateway.ledger.received
        protocol.send_binary(message)
        await stream.send_all(b"".join(protocol.data_to_send()))
        await wait_until(lambda: gateway.ledger.received > received)  # noqa: B023


async def read_acks(
    stream: trio.SocketStream, protocol: ClientProtocol, until: int
) -> list[dict[str, Any]]:
    acks: list[dict[str, Any]] = []
    while not acks or acks[-1]["acked"] < until:
        protocol.receive_data(await stream.receive_some(65536))
        acks += [json.loads(e.data) for e in protocol.events_received() if isinstance(e, Frame)]
    return acks


async def test_reads_go_on_while_earlier_ones_wait_for_delivery_and_acks_stay_in_order() -> None:
    messages = [b"m1", b"m2", b"bad3", b"m4", b"m5"]
    with trio.fail_after(20):
        async with delivered_gateway() as (gateway, sink, url):
            stream, protocol = await raw_client(url)
            # The sink holds the first batch: before, the connection was not read again
            # until that read was delivered; now every message is read (and queued).
            await send_one_by_one(gateway, stream, protocol, messages)
            assert gateway.ledger.received == len(messages)
            assert sink.delivered == []
            # The acks owed are charged to the connection's share of the memory budget.
            held = gateway.budget.statistics().connections
            assert held >= 4 * _flight.HELD_PER_READ
            sink.gate.set()
            acks = await read_acks(stream, protocol, len(messages))
            await wait_until(lambda: gateway.budget.statistics().connections < held)
            await stream.aclose()
    assert settle(acks) == (5, {3: "not_delivered"})  # refused for good: a negative ack
    assert sink.delivered == [b"m1", b"m2", b"m4", b"m5"]


async def test_the_acks_owed_are_bounded_by_the_connections_share_of_the_budget() -> None:
    # A share of 64 KiB, of which the answers may take half (the rest is the reader's, to
    # grow its buffer): 58 one-message reads' answers (560 bytes each). A client sending one
    # message per write while the sink is stalled cannot make the gateway hold answers past
    # that (not the 4,096 reads of MAX_IN_FLIGHT): the read past it goes through alone, then
    # reading waits until the older reads are answered.
    with trio.fail_after(30):
        options: dict[str, Any] = {"max_memory": 2 << 20, "max_message_size": 1024}
        async with delivered_gateway(**options) as (gateway, sink, url):
            share = gateway.budget.statistics().connection_share
            assert share == 64 << 10
            stream, protocol = await raw_client(url)
            sent = 0
            while sent < 400:
                received = gateway.ledger.received
                protocol.send_binary(b"m%d" % sent)
                await stream.send_all(b"".join(protocol.data_to_send()))
                sent += 1
                with trio.move_on_after(0.5):
                    await wait_until(lambda: gateway.ledger.received > received)  # noqa: B023
                if gateway.ledger.received == received:
                    break  # reading waits
            reads = gateway.ledger.received
            per_read = _flight.HELD_PER_READ + _flight.HELD_PER_MESSAGE
            assert reads == share // 2 // per_read + 1
            assert gateway.budget.statistics().connections <= share
            sink.gate.set()
            acks = await read_acks(stream, protocol, sent)
            await stream.aclose()
    assert settle(acks) == (sent, {})
    assert len(sink.delivered) == sent and gateway.ledger.balanced


async def test_a_refusal_is_a_negative_ack_under_drop_oldest_too() -> None:
    # drop_oldest takes every read whole, but with ack = "delivered" what the sink refused
    # was not delivered: its ack is negative all the same.
    messages = [b"m1", b"bad2", b"m3"]
    with trio.fail_after(20):
        async with delivered_gateway(RingBuffer(100, policy="drop_oldest")) as (gw, sink, url):
            sink.gate.set()
            stream, protocol = await raw_client(url)
            await send_one_by_one(gw, stream, protocol, messages)
            acks = await read_acks(stream, protocol, len(messages))
            await stream.aclose()
    assert settle(acks) == (3, {2: "not_delivered"})
    assert sink.delivered == [b"m1", b"m3"]
    assert gw.ledger.dropped["refused"] == 1 and gw.ledger.balanced


async def test_what_awaits_delivery_per_connection_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_flight, "MAX_IN_FLIGHT", 3)
    with trio.fail_after(20):
        async with delivered_gateway() as (gateway, sink, url):
            stream, protocol = await raw_client(url)
            await send_one_by_one(gateway, stream, protocol, [b"m1", b"m2", b"m3"])
            for message in (b"m4", b"m5"):
                protocol.send_binary(message)
            await stream.send_all(b"".join(protocol.data_to_send()))
            await trio.sleep(0.2)
            assert gateway.ledger.received == 3  # three await delivery: reading waits
            sink.gate.set()
            acks = await read_acks(stream, protocol, 5)
            await stream.aclose()
    assert settle(acks) == (5, {})
    assert sink.delivered == [b"m1", b"m2", b"m3", b"m4", b"m5"]
