"""``ack = "delivered"``: an HTTP 202 or a gRPC Ack only once the sink confirmed the message,
many clients sharing one confirmation, and a negative answer for what fails for good."""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
import trio
from helpers import wait_until

from trio_gateway import (
    Batch,
    ConfigurationError,
    Gateway,
    GrpcSource,
    HttpSource,
    RingBuffer,
    SinkRefused,
    TcpSource,
)
from trio_gateway._proto import gateway_pb2
from trio_gateway.sinks import Sink
from trio_gateway.sources import _flight


class GatedSink(Sink):
    """Holds every batch until ``open_gate`` is set; refuses payloads starting with ``bad``."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.batches: list[list[bytes]] = []

    async def send(self, batch: Batch) -> None:
        await self.gate.wait()
        self.batches.append(list(batch.payloads))
        refused = [i for i, p in enumerate(batch.payloads) if p.startswith(b"bad")]
        if refused:
            raise SinkRefused("refused", indices=refused, reason="test")


async def test_202_waits_for_the_sink_and_many_clients_share_one_confirmation() -> None:
    sink = GatedSink()
    gateway = Gateway(sources=[HttpSource(port=0)], sink=sink, ack="delivered")
    answers: dict[int, int] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            url = f"http://{address[0]}:{address[1]}/ingest"
            async with httpx.AsyncClient() as client:

                async def post(i: int) -> None:
                    response = await client.post(url, content=b"m%d" % i)
                    answers[i] = response.status_code

                async with trio.open_nursery() as clients:
                    for i in range(20):
                        clients.start_soon(post, i)
                    while gateway.ledger.received < 20:
                        await trio.sleep(0.01)
                    await trio.sleep(0.1)
                    assert answers == {}  # received, queued, taken: not confirmed yet
                    sink.gate.set()
            gateway.shutdown()
    assert answers == dict.fromkeys(range(20), 202)
    assert sorted(p for b in sink.batches for p in b) == sorted(b"m%d" % i for i in range(20))
    assert len(sink.batches) < 20  # group commit: one confirmation answers many requests


async def test_a_message_refused_for_good_gets_a_negative_answer() -> None:
    sink = GatedSink()
    sink.gate.set()
    gateway = Gateway(sources=[HttpSource(port=0)], sink=sink, ack="delivered")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            url = f"http://{address[0]}:{address[1]}/ingest"
            async with httpx.AsyncClient() as client:
                assert (await client.post(url, content=b"good")).status_code == 202
                refused = await client.post(url, content=b"bad one")
            gateway.shutdown()
    # Received and not delivered: not the full queue's answer (the sender is told which).
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert refused.json() == {"accepted": 0, "rejected": 1, "error": "not delivered"}
    assert gateway.ledger.dropped["refused"] == 1
    assert gateway.ledger.balanced


async def test_a_unary_grpc_call_refused_for_good_is_unavailable_not_delivered() -> None:
    sink = GatedSink()
    sink.gate.set()
    gateway = Gateway(sources=[GrpcSource(port=0)], sink=sink, ack="delivered")

    def send(target: str, payload: bytes) -> grpc.StatusCode:
        with grpc.insecure_channel(target) as channel:
            unary = channel.unary_unary(
                "/trio_gateway.v1.Gateway/Send",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            try:
                unary(gateway_pb2.Message(payload=payload, sequence=1), timeout=10)
            except grpc.RpcError as exc:
                assert "not delivered" in exc.details()
                return exc.code()
            return grpc.StatusCode.OK

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            target = f"{address[0]}:{address[1]}"
            assert await trio.to_thread.run_sync(send, target, b"good") == grpc.StatusCode.OK
            # UNAVAILABLE, which a client retries, not the full queue's RESOURCE_EXHAUSTED.
            status = await trio.to_thread.run_sync(send, target, b"bad one")
            gateway.shutdown()
    assert status == grpc.StatusCode.UNAVAILABLE
    assert gateway.ledger.dropped["refused"] == 1 and gateway.ledger.delivered == 1
    assert gateway.ledger.balanced


def test_delivered_is_refused_where_the_transport_cannot_answer() -> None:
    with pytest.raises(ConfigurationError, match=r"tcp\.ack"):
        Gateway(sources=[TcpSource(port=0)], sink=GatedSink(), ack="delivered")


async def test_grpc_bidi_acks_wait_for_the_sink_and_refusals_are_negative() -> None:
    sink = GatedSink()
    gateway = Gateway(sources=[GrpcSource(port=0)], sink=sink, ack="delivered")
    payloads = [b"bad-%d" % i if i % 5 == 4 else b"ok-%d" % i for i in range(50)]

    def call(target: str) -> list[Any]:
        with grpc.insecure_channel(target) as channel:
            acked = channel.stream_stream(
                "/trio_gateway.v1.Gateway/StreamAcked",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            messages = (gateway_pb2.Message(payload=p, sequence=i) for i, p in enumerate(payloads))
            return list(acked(messages, timeout=10))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            target = f"{address[0]}:{address[1]}"
            async with trio.open_nursery() as client:
                results: list[list[Any]] = []
                client.start_soon(
                    lambda: trio.to_thread.run_sync(lambda: results.append(call(target)))
                )
                while gateway.ledger.received < 1:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)
                assert not sink.batches  # nothing confirmed, nothing answered yet
                sink.gate.set()
            gateway.shutdown()
    (acks,) = results
    assert [a.sequence for a in acks] == list(range(50))
    # No refused message is acknowledged; what is acknowledged was delivered. (A message
    # after a refused one in the same read is refused too: the sender sends it again.)
    accepted = {a.sequence for a in acks if a.accepted}
    assert {0, 1, 2, 3} <= accepted and not accepted & set(range(4, 50, 5))
    delivered = {int(p.split(b"-")[1]) for batch in sink.batches for p in batch}
    assert accepted <= delivered
    assert gateway.ledger.delivered == 40 and gateway.ledger.dropped["refused"] == 10


class RefusesFirstBatch(Sink):
    """Refuses every message of the first batch it is sent; delivers the others."""

    name = "refuses-first"

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    async def send(self, batch: Batch) -> None:
        self.batches.append(list(batch.payloads))
        if len(self.batches) == 1:
            raise SinkRefused("refused", indices=range(len(batch)), reason="test")


async def test_a_failure_settled_while_a_batch_waits_for_room_is_a_negative_answer() -> None:
    # An NDJSON batch of 10 into a queue of 4 (block): 4 go in, the offer waits for room; the
    # sink refuses that first batch while the rest is still being put. Those 4 failed: the
    # client must not be told all 10 were delivered.
    sink = RefusesFirstBatch()
    gateway = Gateway(
        sources=[HttpSource(port=0, queue_wait=10.0)],
        sink=sink,
        queue=RingBuffer(4),
        ack="delivered",
        batch_size=4,
    )
    body = b"".join(b'{"n":%d}\n' % i for i in range(10))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            url = f"http://{address[0]}:{address[1]}/ingest"
            async with httpx.AsyncClient() as client:
                response = await client.post(
                    url, content=body, headers={"content-type": "application/x-ndjson"}
                )
            gateway.shutdown()
    assert response.status_code == 503
    # The first 4 failed: nothing is acknowledged, and the answer says they were received.
    assert response.json() == {"accepted": 0, "rejected": 10, "error": "not delivered"}
    assert sink.batches[0] == [b'{"n":%d}' % i for i in range(4)]
    assert gateway.ledger.dropped["refused"] == 4 and gateway.ledger.delivered == 6
    assert gateway.ledger.balanced


class BidiClient:
    """A grpcio ``StreamAcked`` call in a thread, whose messages the test releases one at a
    time (:meth:`send`), so that each is a read of its own."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.acks: list[Any] = []

    def run(self) -> None:
        def messages() -> Iterator[Any]:
            while (message := self.requests.get()) is not None:
                yield message

        with grpc.insecure_channel(self.target) as channel:
            acked = channel.stream_stream(
                "/trio_gateway.v1.Gateway/StreamAcked",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            self.acks = list(acked(messages(), timeout=15))

    async def send(self, gateway: Gateway, payloads: list[bytes], first: int = 0) -> None:
        """Each message read by the gateway before the next is released."""
        for sequence, payload in enumerate(payloads, first):
            received = gateway.ledger.received
            self.requests.put(gateway_pb2.Message(payload=payload, sequence=sequence))
            await wait_until(lambda: gateway.ledger.received > received)  # noqa: B023


@asynccontextmanager
async def bidi_gateway(**options: Any) -> AsyncIterator[tuple[Gateway, GatedSink, BidiClient]]:
    sink = GatedSink()
    source = GrpcSource(port=0, max_message_size=options.pop("max_message_size", 4 << 20))
    gateway = Gateway(sources=[source], sink=sink, ack="delivered", **options)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            client = BidiClient(f"{address[0]}:{address[1]}")
            async with trio.open_nursery() as clients:
                clients.start_soon(trio.to_thread.run_sync, client.run)
                yield gateway, sink, client
                client.requests.put(None)  # the client is done
            gateway.shutdown()


async def test_grpc_bidi_reads_go_on_while_earlier_ones_wait_for_delivery() -> None:
    payloads = [b"ok-0", b"ok-1", b"bad-2", b"ok-3", b"ok-4"]
    async with bidi_gateway() as (gateway, sink, client):
        # The sink holds the first batch: before, the stream was not read again until that
        # read was delivered; now every message is read (and queued) meanwhile.
        await client.send(gateway, payloads)
        assert gateway.ledger.received == 5 and not sink.batches
        held = gateway.budget.statistics().connections
        assert held >= 4 * _flight.HELD_PER_READ  # the acks owed are charged to the budget
        sink.gate.set()
    assert [a.sequence for a in client.acks] == list(range(5))  # in order
    assert [a.accepted for a in client.acks] == [True, True, False, True, True]
    assert client.acks[2].reason == "not_delivered"  # refused for good: a negative ack
    assert gateway.budget.statistics().connections == 0
    assert gateway.ledger.delivered == 4 and gateway.ledger.dropped["refused"] == 1
    assert gateway.ledger.balanced


async def test_what_a_grpc_bidi_stream_holds_in_flight_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_flight, "MAX_IN_FLIGHT", 3)
    async with bidi_gateway() as (gateway, sink, client):
        await client.send(gateway, [b"m0", b"m1", b"m2"])
        for sequence in (3, 4):
            client.requests.put(gateway_pb2.Message(payload=b"m%d" % sequence, sequence=sequence))
        await trio.sleep(0.2)
        assert gateway.ledger.received == 3  # three await delivery: reading waits
        sink.gate.set()
    assert [(a.sequence, a.accepted) for a in client.acks] == [(s, True) for s in range(5)]
    assert gateway.ledger.delivered == 5 and gateway.ledger.balanced


async def test_the_acks_a_grpc_stream_owes_take_at_most_half_of_its_share() -> None:
    # A share of 64 KiB: the answers of 58 one-message reads (560 bytes each) fill half of
    # it; the read past that goes through alone and then the stream waits (its window
    # closes). Before, the answers took the whole share (118 reads), leaving the calls' own
    # messages none of it.
    async with bidi_gateway(max_memory=2 << 20, max_message_size=1024) as (gw, sink, client):
        share = gw.budget.statistics().connection_share
        assert share == 64 << 10
        sent = 0
        while sent < 200:
            received = gw.ledger.received
            client.requests.put(gateway_pb2.Message(payload=b"m%d" % sent, sequence=sent))
            sent += 1
            with trio.move_on_after(0.5):
                await wait_until(lambda: gw.ledger.received > received)  # noqa: B023
            if gw.ledger.received == received:
                break  # reading waits
        per_read = _flight.HELD_PER_READ + _flight.HELD_PER_MESSAGE
        assert gw.ledger.received == share // 2 // per_read + 1
        assert gw.ledger.rejected.get("over_budget", 0) == 0
        sink.gate.set()
    assert [(a.sequence, a.accepted) for a in client.acks] == [(s, True) for s in range(sent)]
    assert gw.ledger.delivered == sent and gw.ledger.balanced
