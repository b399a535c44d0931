"""The NATS source against a real nats-server: a core subscription (wildcards, the subject as
the origin's peer, a queue group, slow_consumer past max_pending) and a durable JetStream
consumer (fetched under backpressure, acked once queued or, with ack="delivered", once
delivered: a failed batch delivered again), both through a server restart, status messages,
credentials and TLS; published to with nats-py from an asyncio loop in a thread."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import nats
import pytest
import trio
from helpers import wait_until
from jetstream import NatsServer
from nats.js.api import ConsumerConfig

from trio_gateway import ConfigurationError, Gateway, Pipeline, RetryPolicy, TransportError
from trio_gateway._config import SourceConfig, build_source
from trio_gateway.sources import NatsSource
from trio_gateway.sources import _nats_pull as nats_pull
from trio_gateway.sources import nats as nats_source
from trio_gateway.testing import RecordingSink, serve_source


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


async def orders_gateway(
    nats_server: NatsServer, count: int, batch: int
) -> tuple[list[tuple[str, bytes]], NatsSource, RecordingSink, Gateway]:
    """``count`` orders published to the ORDERS stream, and a gateway to read them through
    its durable consumer ``gateway``: (what was sent, the source, the sink, the gateway)."""
    sent = [("orders.in", b"order %d" % i) for i in range(count)]
    await publish(nats_server.url, sent, stream="ORDERS")
    source = NatsSource(
        f"{nats_server.url}/orders.in", stream="ORDERS", consumer="gateway", batch=batch
    )
    sink = RecordingSink()
    return sent, source, sink, Gateway(sources=[source], sink=sink)


async def test_a_jetstream_consumer_is_acked_once_queued(nats_server: NatsServer) -> None:
    sent, source, sink, gateway = await orders_gateway(nats_server, 500, batch=100)
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


async def test_a_consumer_deleted_under_the_source_comes_back_where_it_was(
    nats_server: NatsServer,
) -> None:
    # An operator deletes the durable consumer while the gateway reads it. The source sets it
    # up again from the first message it has not acknowledged: not from the stream's first
    # (which delivered everything again), and without losing what came meanwhile.
    first, source, sink, gateway = await orders_gateway(nats_server, 20, batch=10)

    async def delete_and_publish(messages: list[tuple[str, bytes]]) -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.delete_consumer("ORDERS", "gateway")
        for subject, data in messages:
            await js.publish(subject, data)
        await nc.close()

    then = [("orders.in", b"later %d" % i) for i in range(5)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: sink.count == 20 and source.acked == 20)
            await trio.to_thread.run_sync(asyncio.run, delete_and_publish(then))
            await wait_until(lambda: sink.count >= 25 and source.acked >= 25)
            await trio.sleep(0.3)  # anything delivered again would come now
            gateway.shutdown()
    assert sink.payloads == [data for _, data in first + then]
    assert source.statuses[409] >= 1  # the pull was told: Consumer Deleted


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

    def failed() -> int:
        """The first batch's size: 5 messages, or fewer when the pump took it before the
        rest of the pull's messages were queued (under load)."""
        return gateway.ledger.dropped["sink_failed"]

    def delivered() -> int:
        return len(sent) if ack == "delivered" else len(sent) - failed()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(
                lambda: failed() and source.acked == len(sent) and sink.count == delivered()
            )
            # Nothing pending or waiting for an ack: nothing more will come.
            state = await trio.to_thread.run_sync(asyncio.run, _consumer_state(nats_server.url))
            assert state == (0, 0)
            gateway.shutdown()
    assert 1 <= failed() <= 5
    assert len(set(sink.payloads)) == sink.count == delivered()  # each once
    if ack == "delivered":
        assert set(sink.payloads) == {data for _, data in sent}
        assert source.nacked == failed()
    else:
        assert source.nacked == 0
        assert sink.payloads == [data for _, data in sent[failed() :]]


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


# -- the source's own NATS client: buffers, reconnections, status messages, credentials ----


async def test_past_max_pending_the_newest_are_refused_as_slow_consumer(
    nats_server: NatsServer,
) -> None:
    """The queue full (block, nobody taking) and the source's buffer full: what comes next is
    refused and counted, and what was taken is the oldest, in order, once the queue drains.
    (What a later read brings, once the offering task made room, is taken again.)"""
    source = NatsSource(f"{nats_server.url}/slow.>", batch=5, max_pending=20)
    sent = [("slow.a", b"m%d" % i) for i in range(100)]
    got: list[bytes] = []
    with trio.fail_after(20):
        async with serve_source(source, capacity=10, policy="block") as served:
            await publish(nats_server.url, sent)
            counters = served.counters
            # Every message seen (queued or in hand, refused, or in the source's buffer)
            # before the queue drains: one still on its way would find room then.
            await wait_until(
                lambda: (
                    counters.received + counters.rejected["slow_consumer"] + len(source._pending)
                    == len(sent)
                )
            )
            while len(got) < len(sent) - counters.rejected["slow_consumer"]:
                got += served.payloads()
                await trio.sleep(0.01)
    refused = counters.rejected["slow_consumer"]
    # Kept: at least the buffer; at most the buffer, the queue and one batch in hand.
    assert 100 - 20 - 10 - 5 <= refused <= 100 - 20
    payloads = [data for _, data in sent]
    assert got[:20] == payloads[:20]  # the oldest kept, the newest refused
    taken = [payloads.index(data) for data in got]
    assert taken == sorted(set(taken))  # in order, each once
    assert counters.received == len(got)


async def test_a_queue_group_shares_the_messages(nats_server: NatsServer) -> None:
    first = NatsSource(f"{nats_server.url}/jobs.*", queue_group="workers")
    second = NatsSource(f"{nats_server.url}/jobs.*", queue_group="workers")
    sink = RecordingSink()
    gateway = Gateway(sources=[first, second], sink=sink)
    sent = [("jobs.x", b"job %d" % i) for i in range(200)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await publish(nats_server.url, sent)
            await wait_until(lambda: sink.count == len(sent))
            gateway.shutdown()
    # Each once (without the group, each source would get every message).
    assert sorted(sink.payloads) == sorted(data for _, data in sent)
    assert gateway.ledger.received == len(sent)


async def test_a_subscription_comes_back_after_the_server_restarts(
    nats_server: NatsServer,
) -> None:
    source = NatsSource(f"{nats_server.url}/chat.>", reconnect_wait=0.05)
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    before = [("chat.a", b"before %d" % i) for i in range(10)]
    after = [("chat.a", b"after %d" % i) for i in range(10)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await publish(nats_server.url, before)
            await wait_until(lambda: sink.count == len(before))
            await trio.to_thread.run_sync(nats_server.kill)
            await trio.to_thread.run_sync(nats_server.start)
            await wait_until(lambda: source.connects == 2)  # subscribed again
            await publish(nats_server.url, after)
            await wait_until(lambda: sink.count == len(before) + len(after))
            gateway.shutdown()
    assert sink.payloads == [data for _, data in before + after]
    assert gateway.ledger.balanced


async def test_a_pull_consumer_resumes_after_the_server_restarts(
    nats_server: NatsServer,
) -> None:
    """The stream and the consumer are on disk: after the restart the source pulls again and
    gets what was published meanwhile, each message once, every one acked. (A clean stop:
    after a SIGKILL, JetStream may have lost the newest acks and deliver those again.)"""
    before = [("orders.in", b"before %d" % i) for i in range(50)]
    after = [("orders.in", b"after %d" % i) for i in range(50)]
    await publish(nats_server.url, before, stream="ORDERS")
    source = NatsSource(
        f"{nats_server.url}/orders.in",
        stream="ORDERS",
        consumer="gateway",
        batch=20,
        reconnect_wait=0.05,
    )
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: source.acked == len(before))
            await trio.to_thread.run_sync(nats_server.stop)
            await trio.to_thread.run_sync(nats_server.start)
            await wait_until(lambda: source.connects == 2)
            await publish(nats_server.url, after, stream="ORDERS")
            await wait_until(lambda: source.acked == len(before) + len(after))
            state = await trio.to_thread.run_sync(asyncio.run, _consumer_state(nats_server.url))
            gateway.shutdown()
    assert sink.payloads == [data for _, data in before + after]
    assert state == (0, 0)


async def test_a_pull_that_expires_is_asked_again_and_heartbeats_are_heard(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """408 (the pull expired) and 100 (its idle heartbeat) end or keep a pull; a 409 for a
    batch over the consumer's limit makes the source ask for that limit instead."""
    monkeypatch.setattr(nats_pull, "PULL_EXPIRES", 0.4)
    monkeypatch.setattr(nats_pull, "PULL_HEARTBEAT", 0.1)
    await publish(nats_server.url, [("orders.in", b"first")], stream="ORDERS")

    async def limited_consumer() -> None:  # at most 3 messages per pull
        nc = await nats.connect(nats_server.url)
        config = {"durable_name": "gateway", "ack_policy": "explicit", "max_batch": 3}
        await nc.request(
            "$JS.API.CONSUMER.DURABLE.CREATE.ORDERS.gateway",
            json.dumps({"stream_name": "ORDERS", "config": config}).encode(),
        )
        await nc.close()

    await trio.to_thread.run_sync(asyncio.run, limited_consumer())
    source = NatsSource(
        f"{nats_server.url}/orders.in", stream="ORDERS", consumer="gateway", batch=10
    )
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    sent = [("orders.in", b"order %d" % i) for i in range(10)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: source.statuses[409] >= 1 and source.batch == 3)
            await wait_until(lambda: sink.count == 1)
            await wait_until(lambda: source.statuses[408] >= 2 and source.statuses[100] >= 1)
            await publish(nats_server.url, sent, stream="ORDERS")
            await wait_until(lambda: source.acked == 1 + len(sent))
            gateway.shutdown()
    assert sink.payloads == [b"first"] + [data for _, data in sent]


async def test_credentials_in_the_url_as_for_the_sink(password_server: NatsServer) -> None:
    address = password_server.url.removeprefix("nats://")
    wrong = Gateway(sources=[NatsSource(f"nats://alice:nope@{address}/a")], sink=RecordingSink())
    with trio.fail_after(20), pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(wrong.run)
    assert caught.group_contains(TransportError, match="Authorization Violation", depth=None)
    sink = RecordingSink()
    gateway = Gateway(sources=[NatsSource(f"nats://alice:s3cret@{address}/a")], sink=sink)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await publish(f"nats://alice:s3cret@{address}", [("a", b"hello")])
            await wait_until(lambda: sink.count == 1)
            gateway.shutdown()


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pem = str(tmp_path / "server.pem")
    server = NatsServer(tmp_path, args=("--tls", "--tlscert", pem, "--tlskey", pem))
    await trio.to_thread.run_sync(server.start)
    try:
        address = server.url.removeprefix("nats://")
        source = NatsSource(f"tls://{address}/secret?ca={tmp_path}/ca.pem")
        sink = RecordingSink()
        gateway = Gateway(sources=[source], sink=sink)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)
                await _publish_tls(server.url, str(tmp_path / "ca.pem"))
                await wait_until(lambda: sink.count == 1)
                gateway.shutdown()
        assert sink.payloads == [b"over TLS"]
        with pytest.raises(ExceptionGroup) as caught:  # no CA given: the server is unknown
            async with trio.open_nursery() as nursery:
                untrusted = NatsSource(f"nats://{address}/secret?tls=true")
                await nursery.start(Gateway(sources=[untrusted], sink=RecordingSink()).run)
        assert caught.group_contains(TransportError, match="CERTIFICATE_VERIFY_FAILED", depth=None)
    finally:
        server.stop()


async def _publish_tls(url: str, ca: str) -> None:
    import ssl

    async def main() -> None:
        nc = await nats.connect(url, tls=ssl.create_default_context(cafile=ca))
        await nc.publish("secret", b"over TLS")
        await nc.flush()
        await nc.close()

    await trio.to_thread.run_sync(asyncio.run, main())


async def test_messages_held_longer_than_ack_wait_are_marked_in_progress(
    nats_server: NatsServer,
) -> None:
    """Under ack="delivered" a batch waits for the sink: past the consumer's ack_wait
    JetStream would deliver it again, unless the source says it is in progress (+WPI)."""
    await publish(
        nats_server.url, [("orders.in", b"slow %d" % i) for i in range(3)], stream="ORDERS"
    )

    async def consumer(ack_wait: float) -> tuple[int, int]:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        if ack_wait:
            config = ConsumerConfig(durable_name="gateway", ack_wait=ack_wait)
            await js.add_consumer("ORDERS", config)
        info = await js.consumer_info("ORDERS", "gateway")
        await nc.close()
        return info.num_redelivered, info.num_ack_pending

    await trio.to_thread.run_sync(asyncio.run, consumer(1.0))
    source = NatsSource(f"{nats_server.url}/orders.in", stream="ORDERS", consumer="gateway")
    sink = RecordingSink(latency=1.4)
    gateway = Gateway(sources=[source], sink=sink, ack="delivered")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await wait_until(lambda: source.acked == 3)
            state = await trio.to_thread.run_sync(asyncio.run, consumer(0))
            gateway.shutdown()
    assert sink.payloads == [b"slow 0", b"slow 1", b"slow 2"]
    assert state == (0, 0)  # nothing delivered twice, nothing waiting for an ack


async def test_a_server_gone_silent_is_pinged_and_left(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that stops answering (SIGSTOP: its socket stays open) gets a PING after the
    quiet interval; no PONG within connect_timeout, and the source connects again."""
    monkeypatch.setattr(nats_source, "_PING_INTERVAL", 0.2)
    source = NatsSource(f"{nats_server.url}/quiet.>", connect_timeout=0.4, reconnect_wait=0.05)
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    assert nats_server.proc is not None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            nats_server.proc.send_signal(signal.SIGSTOP)
            try:
                await wait_until(lambda: "no answer to a PING" in caplog.text)
            finally:
                nats_server.proc.send_signal(signal.SIGCONT)
            await wait_until(lambda: source.connects == 2)
            await publish(nats_server.url, [("quiet.a", b"still here")])
            await wait_until(lambda: sink.count == 1)
            gateway.shutdown()
