"""The NATS source against a real nats-server: a core subscription (wildcards, the subject as
the origin's peer) and a durable JetStream consumer (fetched under backpressure, acked once
queued or, with ack="delivered", once delivered: a failed batch delivered again), published to
with nats-py from an asyncio loop in a thread."""

from __future__ import annotations

import asyncio

import nats
import pytest
import trio
from helpers import wait_until
from jetstream import NatsServer

from trio_gateway import ConfigurationError, Gateway, Pipeline, RetryPolicy, TransportError
from trio_gateway._config import SourceConfig, build_source
from trio_gateway.sources import NatsSource
from trio_gateway.testing import RecordingSink


async def publish(url: str, messages: list[tuple[str, bytes]], *, stream: str = "") -> None:
    async def main() -> None:
        nc = await nats.connect(url)
        if stream:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[messages[0][0]])
            for subject, data in messages:
                await js.publish(subject, data)
        else:
            for subject, data in messages:
                await nc.publish(subject, data)
        await nc.flush()
        await nc.close()

    await trio.to_thread.run_sync(asyncio.run, main())


async def test_a_subject_with_wildcards_feeds_the_gateway(nats_server: NatsServer) -> None:
    source = NatsSource(f"{nats_server.url}/chat.>", batch=64)
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    sent = [(f"chat.room{i % 3}", b"hello %d" % i) for i in range(300)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            assert address == ("127.0.0.1", nats_server.port)
            await publish(nats_server.url, sent)
            await wait_until(lambda: sink.count == len(sent))
            gateway.shutdown()
    assert sink.payloads == [data for _, data in sent]  # one connection: in order
    assert [o.peer for o in sink.origins] == [subject for subject, _ in sent]
    first = sink.origins[0]
    assert (
        first.transport == "nats" and first.listener == f"nats:127.0.0.1:{nats_server.port}/chat.>"
    )
    assert gateway.ledger.balanced and gateway.ledger.delivered == len(sent)


async def test_a_jetstream_consumer_is_acked_once_queued(nats_server: NatsServer) -> None:
    sent = [("orders.in", b"order %d" % i) for i in range(500)]
    await publish(nats_server.url, sent, stream="ORDERS")
    source = NatsSource(
        f"{nats_server.url}/orders.in", stream="ORDERS", consumer="gateway", batch=100
    )
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: sink.count == len(sent) and source.acked == len(sent))
            gateway.shutdown()
    assert sink.payloads == [data for _, data in sent]

    async def pending() -> tuple[int, int]:
        nc = await nats.connect(nats_server.url)
        info = await nc.jetstream().consumer_info("ORDERS", "gateway")
        await nc.close()
        return info.num_pending, info.num_ack_pending

    assert await trio.to_thread.run_sync(asyncio.run, pending()) == (0, 0)


async def test_an_unreachable_server_fails_at_start() -> None:
    gateway = Gateway(sources=[NatsSource("nats://127.0.0.1:1/x", connect_timeout=0.3)],
                      sink=RecordingSink())  # fmt: skip
    with trio.fail_after(20), pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
    assert caught.group_contains(TransportError, match="cannot subscribe", depth=None)


def test_configured_from_a_sources_table() -> None:
    source = build_source(
        SourceConfig("nats", "127.0.0.1", 0, {"url": "nats://h:4223/a.b", "batch": 10})
    )
    assert isinstance(source, NatsSource) and source.label == "nats:h:4223/a.b"
    with pytest.raises(ConfigurationError, match=r"sources\.url"):
        build_source(SourceConfig("nats", "127.0.0.1", 0, {}))
    with pytest.raises(ConfigurationError, match="stream and consumer"):
        NatsSource("nats://h/a", stream="S")


async def _consumer_state(url: str) -> tuple[int, int]:
    nc = await nats.connect(url)
    info = await nc.jetstream().consumer_info("ORDERS", "gateway")
    await nc.close()
    return info.num_pending, info.num_ack_pending


@pytest.mark.parametrize("ack", ["delivered", "queued"])
async def test_acks_after_delivery_get_a_failed_batch_delivered_again(
    nats_server: NatsServer, ack: str
) -> None:
    """The sink fails the first batch for good (one attempt): under ``ack="delivered"`` its
    messages are nak'ed and JetStream delivers them again, and the delivered ones are not;
    acked once queued, the failed batch is lost (which is why the mode exists)."""
    sent = [("orders.in", b"order %d" % i) for i in range(10)]
    await publish(nats_server.url, sent, stream="ORDERS")
    source = NatsSource(
        f"{nats_server.url}/orders.in",
        stream="ORDERS",
        consumer="gateway",
        batch=5,
        redelivery_delay=0,
    )
    sink = RecordingSink()
    sink.fail(1)
    gateway = Gateway(
        sources=[source], sink=sink, ack=ack, retry=RetryPolicy(max_attempts=1), batch_size=5
    )
    delivered = len(sent) if ack == "delivered" else len(sent) - 5
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: source.acked == len(sent) and sink.count == delivered)
            # Nothing pending or waiting for an ack: nothing more will come.
            state = await trio.to_thread.run_sync(asyncio.run, _consumer_state(nats_server.url))
            assert state == (0, 0)
            gateway.shutdown()
    assert len(set(sink.payloads)) == sink.count == delivered  # each once
    if ack == "delivered":
        assert set(sink.payloads) == {data for _, data in sent}
        assert source.nacked == 5
    else:
        assert source.nacked == 0
        assert sink.payloads == [data for _, data in sent[5:]]


async def test_acks_after_delivery_need_a_jetstream_consumer(nats_server: NatsServer) -> None:
    gateway = Gateway(
        sources=[NatsSource(f"{nats_server.url}/chat.>")], sink=RecordingSink(), ack="delivered"
    )
    with trio.fail_after(20), pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
    assert caught.group_contains(ConfigurationError, match="JetStream consumer", depth=None)


def test_acks_after_delivery_need_a_pipeline_of_one_sink() -> None:
    source = NatsSource("nats://127.0.0.1:4222/a", stream="S", consumer="c")
    with pytest.raises(ConfigurationError, match="one sink"):
        Pipeline(
            "p", sources=[source], sinks=[RecordingSink("a"), RecordingSink("b")], ack="delivered"
        )
    Pipeline("p", sources=[source], sinks=[RecordingSink()], ack="delivered")
