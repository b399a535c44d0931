"""The NATS sink's ``confirm="server"`` mode against a real nats-server: core publishes, each
round confirmed by a PONG, which a stream capturing the subject still stores (read back with
a JetStream consumer), and which core subscribers hear."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import nats
import pytest
import trio
from jetstream import NatsServer, assert_in_order_per_peer, read_stream, stream_from_clients

from trio_gateway import Batch, Gateway, Origin, SinkError, SinkUnavailable, TcpSource
from trio_gateway.sinks import NatsSink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


async def test_core_publishes_are_stored_by_the_stream_in_order_per_connection(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(
        f"{nats_server.url}/live.in?stream=LIVE&create=true", confirm="server", max_in_flight=300
    )
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=500)
    clients, per_client = 3, 2000
    await stream_from_clients(gateway, clients, per_client)
    ledger = gateway.ledger
    assert ledger.balanced and ledger.delivered == clients * per_client
    # Confirmed by the server, not acknowledged by JetStream: nothing counted as stored.
    assert (sink.published, sink.stored, sink.duplicates) == (clients * per_client, 0, 0)

    messages = await read_stream(nats_server, "LIVE", "live.in", clients * per_client)
    assert len(messages) == clients * per_client
    assert_in_order_per_peer(messages, clients, per_client)
    ids = [m.headers["Nats-Msg-Id"] for m in messages]  # a stream was named: ids for its dedup
    assert len(set(ids)) == len(ids) and ids[0] == f"{sink.sink_id}.1"
    assert "Nats-Expected-Stream" not in messages[0].headers


async def test_a_batch_retried_after_a_missing_pong_is_stored_once(
    nats_server: NatsServer,
) -> None:
    """No PONG in time: the connection is given up (a late PONG would confirm the next batch)
    and the pump's retry of the same batch carries the same ids, so the stream keeps one copy
    of whatever of the first attempt the server had read."""
    sink = NatsSink(
        f"{nats_server.url}/retry.in?stream=RETRY&create=true", confirm="server", ack_timeout=1e-6
    )
    batch = Batch([b"m%d" % i for i in range(50)], [(ORIGIN, 50)])
    with trio.fail_after(20):
        await sink.open()
        with pytest.raises(SinkError, match="no PONG"):
            await sink.send(batch)
        assert sink.failures["ack_timeout"] == 1
        sink.ack_timeout = 10.0
        await sink.send(batch)  # the pump's retry: the same batch object, the same ids
        await sink.aclose()
    assert sink.published == 50 and sink.connects == 2
    messages = await read_stream(nats_server, "RETRY", "retry.in", 50)
    assert [m.data for m in messages] == batch.payloads
    assert [m.headers["Nats-Msg-Id"] for m in messages] == [
        f"{sink.sink_id}.{i}" for i in range(1, 51)
    ]


async def test_without_a_stream_plain_publishes_reach_subscribers_and_any_stream(
    nats_server: NatsServer,
) -> None:
    """No ``stream``: no ids (no dedup to expect), and with ``origin_headers=False`` no
    headers at all (``PUB``); a stream made elsewhere still captures the subject."""
    maker = NatsSink(f"{nats_server.url}/plain.in?stream=PLAIN&create=true")
    sink = NatsSink(f"{nats_server.url}/plain.in", confirm="server", origin_headers=False)
    payloads = [b"p%d" % i for i in range(20)]
    heard: list[Any] = []

    async def subscribe(ready: trio.Event) -> None:
        async def run() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                sub = await nc.subscribe("plain.in")
                await nc.flush()
                trio.from_thread.run_sync(ready.set)
                while len(heard) < len(payloads):
                    heard.append(await sub.next_msg(timeout=10))
            finally:
                await nc.close()

        await trio.to_thread.run_sync(asyncio.run, run())

    with trio.fail_after(30):
        await maker.open()
        await maker.aclose()
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(subscribe, ready)
            await ready.wait()
            await sink.open()
            await sink.send(Batch(payloads, [(ORIGIN, len(payloads))]))
            await sink.aclose()
    assert [m.data for m in heard] == payloads and all(not m.headers for m in heard)
    stored = await read_stream(nats_server, "PLAIN", "plain.in", len(payloads))
    assert [m.data for m in stored] == payloads and all(not m.headers for m in stored)


async def test_a_stream_that_does_not_capture_the_subject_is_refused_at_open(
    nats_server: NatsServer,
) -> None:
    """Without a per-message ``Nats-Expected-Stream`` (a mismatch would be dropped without a
    word), the connection checks the stream once."""
    other = NatsSink(f"{nats_server.url}/other.in?stream=OTHER&create=true")
    with trio.fail_after(20):
        await other.open()
        await other.aclose()
        sink = NatsSink(f"{nats_server.url}/mine.in?stream=OTHER", confirm="server")
        with pytest.raises(SinkUnavailable, match=r"does not capture subject 'mine\.in'"):
            await sink.open()
        await sink.aclose()
        # The subject the stream does capture passes the check.
        captured = NatsSink(f"{nats_server.url}/other.in?stream=OTHER", confirm="server")
        await captured.open()
        await captured.send(Batch([b"x"], [(ORIGIN, 1)]))
        await captured.aclose()
    assert captured.published == 1


async def test_each_round_waits_for_its_pong_and_a_refused_publish_fails_it() -> None:
    """Against a scripted server on a socket: a round is its publishes (no reply subject, no
    headers without origin headers or a stream: ``PUB``) and a PING; nothing is counted
    before the PONG, and a ``-ERR`` before it (a publish the server refused) fails the batch."""
    origin = Origin("tcp", "t", "p", 1.0)
    rounds: list[bytes] = []
    answers = [b"PONG\r\n", b"-ERR 'Permissions Violation for Publish to \"a\"'\r\nPONG\r\n"]
    sink: NatsSink | None = None

    async def server(stream: trio.SocketStream) -> None:
        await stream.send_all(b'INFO {"headers":true,"max_payload":1024}\r\n')
        received = b""
        while b"PING\r\n" not in received:  # CONNECT, the inbox's SUB, PING
            received += await stream.receive_some()
        await stream.send_all(b"PONG\r\n")
        for answer in answers:
            received = b""
            while not received.endswith(b"PING\r\n"):
                received += await stream.receive_some()
            rounds.append(received)
            assert sink is not None and sink.published == 2 * (len(rounds) - 1)
            await stream.send_all(answer)
        await stream.receive_some()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            sink = NatsSink(f"nats://127.0.0.1:{port}/a", confirm="server", origin_headers=False)
            await sink.open()
            await sink.send(Batch([b"x", b"yz"], [(origin, 2)]))
            assert sink.published == 2
            with pytest.raises(SinkError, match="Permissions Violation"):
                await sink.send(Batch([b"x"], [(origin, 1)]))
            await sink.aclose()
            nursery.cancel_scope.cancel()
    assert rounds[0] == b"PUB a 1\r\nx\r\nPUB a 2\r\nyz\r\nPING\r\n"
    assert sink.failures["permissions"] == 1 and sink.published == 2


async def test_a_senders_id_travels_with_the_origin_and_the_stream_keeps_one_copy(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/ids.in?stream=IDS&create=true", confirm="server")
    keyed = Origin("http", "http:127.0.0.1:8080", "10.0.0.7:5000", 1700000001.5, id="order-42")
    batch = Batch([b"plain", b"keyed"], [(ORIGIN, 1), (keyed, 1)])
    with trio.fail_after(20):
        await sink.open()
        await sink.send(batch)
        await sink.send(Batch([b"keyed again"], [(keyed, 1)]))  # the sender's own retry
        await sink.aclose()
    messages = await read_stream(nats_server, "IDS", "ids.in", 2)
    assert [m.data for m in messages] == [b"plain", b"keyed"]
    headers = messages[1].headers
    assert headers["Nats-Msg-Id"] == "order-42" and headers["Gateway-Peer"] == "10.0.0.7:5000"
    assert headers["Gateway-Received-At"] == "1700000001.5"
    assert messages[0].headers["Nats-Msg-Id"] == f"{sink.sink_id}.1"


async def test_a_round_the_socket_cannot_take_is_bounded_by_its_write_timeout() -> None:
    """A round goes out in one write when the socket takes it (no wait, no cancel scope);
    what it does not take is written with ``send_all`` under the write's bound. A server
    that stops reading holds that write: past the bound, the batch fails as a lost
    connection, and the connection is given up (half a command is on the wire)."""
    handshaken = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        await stream.send_all(b'INFO {"headers":true,"max_payload":67108864}\r\n')
        received = b""
        while b"PING\r\n" not in received:
            received += await stream.receive_some()
        await stream.send_all(b"PONG\r\n")
        handshaken.set()
        await trio.sleep_forever()  # and never read again

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            sink = NatsSink(
                f"nats://127.0.0.1:{port}/a",
                confirm="server",
                ack_timeout=0.3,
                connect_timeout=0.3,
            )
            await sink.open()
            await handshaken.wait()
            start = trio.current_time()
            with pytest.raises(SinkError, match="did not finish in time"):
                await sink.send(Batch([b"x" * (32 << 20)], [(ORIGIN, 1)]))  # > socket buffers
            assert 0.25 < trio.current_time() - start < 3
            assert sink.failures["connection_lost"] == 1
            await sink.aclose()
            nursery.cancel_scope.cancel()
