"""The WebSocket sinks over real sockets with trio-websocket on the other end: the client
sink reconnecting after the server drops it, and the broadcast sink serving clients by topic."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import wait_until
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from trio_gateway import Batch, Gateway, Origin, RetryPolicy, SinkUnavailable
from trio_gateway.sinks import WebSocketBroadcastSink, WebSocketSink, _wsbroadcast
from trio_gateway.testing import MemorySource


@asynccontextmanager
async def broadcasting(sink: WebSocketBroadcastSink) -> AsyncIterator[tuple[MemorySource, str]]:
    """A gateway from a memory source to ``sink``, running: its source and the sink's URL."""
    source = MemorySource()
    gateway = Gateway(sources=[source], sink=sink, services=[sink])
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        yield source, f"ws://127.0.0.1:{sink.bound[1]}/"  # type: ignore[index]
        gateway.shutdown()


async def test_the_client_sink_delivers_in_order_and_reconnects() -> None:
    received: list[bytes] = []
    drop_after = 100

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                received.append(await ws.get_message())  # type: ignore[arg-type]
                if len(received) == drop_after:
                    await ws.aclose()  # the first connection ends after 100 messages
                    return
        except ConnectionClosed:
            pass  # the sink closed at shutdown

    source = MemorySource()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        sink = WebSocketSink(f"ws://127.0.0.1:{server.port}/in")
        gateway = Gateway(sources=[source], sink=sink, services=[sink], batch_size=50,
                          retry=RetryPolicy(initial=0.01, maximum=0.05))  # fmt: skip
        with trio.fail_after(20):
            await nursery.start(gateway.run)
            for i in range(0, 300, 10):
                await source.send_many([b"m%d" % k for k in range(i, i + 10)])
            await wait_until(lambda: b"m299" in received)
            gateway.shutdown()
        nursery.cancel_scope.cancel()
    assert sink.connects >= 2
    # At-least-once: a batch cut by the close may come twice, never a message missing.
    assert set(received) == {b"m%d" % k for k in range(300)}
    assert gateway.ledger.delivered == 300 and gateway.ledger.balanced


async def test_open_fails_when_nothing_listens() -> None:
    with pytest.raises(SinkUnavailable, match="connection refused"):
        await WebSocketSink("ws://127.0.0.1:1/x", connect_timeout=2).open()


async def test_broadcast_to_clients_by_topic() -> None:
    sink = WebSocketBroadcastSink(topic="room", client_queue=100)
    source = MemorySource()
    gateway = Gateway(sources=[source], sink=sink, services=[sink])
    heard: dict[str, list[str]] = {"a": [], "b": [], "": []}

    async def client(path: str, count: int) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{sink.bound[1]}/{path}") as ws:  # type: ignore[index]
            for _ in range(count):
                message = await ws.get_message()
                assert isinstance(message, bytes)  # payloads go out as binary messages
                heard[path].append(message.decode())

    messages = [json.dumps({"room": room, "n": n}).encode() for n in range(5) for room in "ab"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            async with trio.open_nursery() as clients:
                clients.start_soon(client, "a", 5)
                clients.start_soon(client, "b", 5)
                clients.start_soon(client, "", 11)
                await wait_until(lambda: sink.clients == 3)
                await source.send_many([*messages, b"no room"])
            gateway.shutdown()
    assert heard["a"] == [m.decode() for m in messages if b'"a"' in m]
    assert heard["b"] == [m.decode() for m in messages if b'"b"' in m]
    assert heard[""] == [m.decode() for m in messages] + ["no room"]
    assert (sink.sent, sink.dropped, sink.unheard) == (21, 0, 0)


async def test_broadcast_frames_every_size_answers_pings_and_closes_cleanly() -> None:
    """Every message waiting for a client goes out in one write: the frames must still be
    right at each header size (7-, 16- and 64-bit lengths), and the client's pings and close
    are answered between them."""
    sink = WebSocketBroadcastSink(client_queue=100)
    messages = [bytes([n]) * size for n, size in enumerate((0, 1, 125, 126, 65535, 65536, 200_000))]
    with trio.fail_after(20):
        async with broadcasting(sink) as (source, url):
            async with open_websocket_url(url, max_message_size=1 << 20) as ws:
                await wait_until(lambda: sink.clients == 1)
                await source.send_many(messages)
                assert [await ws.get_message() for _ in messages] == messages
                await ws.send_message("a client's own message is read and dropped")
                with trio.fail_after(5):
                    await ws.ping(b"still there?")
            assert ws.closed is not None and ws.closed.code == 1000
            await wait_until(lambda: sink.clients == 0)
    assert (sink.sent, sink.dropped, sink.unheard) == (len(messages), 0, 0)


async def test_broadcast_refuses_clients_past_the_limit_and_closes_on_oversize() -> None:
    sink = WebSocketBroadcastSink(max_clients=1, max_message_size=1000)
    gateway = Gateway(sources=[MemorySource()], sink=sink, services=[sink])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            url = f"ws://127.0.0.1:{sink.bound[1]}/room"  # type: ignore[index]
            async with open_websocket_url(url) as ws:
                await wait_until(lambda: sink.clients == 1)
                with pytest.raises(HandshakeError) as refused:
                    async with open_websocket_url(url):
                        pass
                assert isinstance(refused.value, ConnectionRejected)
                assert refused.value.status_code == 503
                await ws.send_message(b"x" * 1001)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1009  # message too big
            await wait_until(lambda: sink.clients == 0)
            gateway.shutdown()


async def test_broadcast_with_no_clients_reads_no_topic_and_counts_them_unheard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No client connected (a relay's gateway without clients of its own): nothing to route,
    so no payload is decoded for its topic, and every message counts as unheard."""
    sink = WebSocketBroadcastSink(topic="room")

    def decoded(*args: object) -> None:
        raise AssertionError("a topic was read with nobody to hear it")

    monkeypatch.setattr(sink, "_topic", decoded)
    origin = Origin("nats", "nats:127.0.0.1:4222/chat", "chat", 1.0)
    await sink.send(Batch([b'{"room": "a"}', b"not json", b"{}"], [(origin, 3)]))
    assert (sink.sent, sink.dropped, sink.unheard) == (0, 0, 3)


async def test_broadcast_drops_what_finds_a_client_queue_full_for_that_client_only() -> None:
    """A batch larger than a client's queue: the first ``client_queue`` messages are queued
    for it, the rest dropped and counted for it alone; a client of another topic is not
    affected."""
    sink = WebSocketBroadcastSink(topic="room", client_queue=3)
    source = MemorySource()
    gateway = Gateway(sources=[source], sink=sink, services=[sink])
    heard: dict[str, list[bytes]] = {"a": [], "b": []}
    messages = [json.dumps({"room": "a", "n": n}).encode() for n in range(5)]
    messages.append(json.dumps({"room": "b", "n": 5}).encode())

    async def client(path: str, count: int) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{sink.bound[1]}/{path}") as ws:  # type: ignore[index]
            while len(heard[path]) < count:
                heard[path].append(await ws.get_message())  # type: ignore[arg-type]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            async with trio.open_nursery() as clients:
                clients.start_soon(client, "a", 3)
                clients.start_soon(client, "b", 1)
                await wait_until(lambda: sink.clients == 2)
                await source.send_many(messages)  # one batch
            gateway.shutdown()
    assert heard == {"a": messages[:3], "b": messages[5:]}
    assert (sink.sent, sink.dropped, sink.unheard) == (4, 2, 0)


@pytest.mark.parametrize(
    ("payload", "topic"),
    [
        (b'{"room": "a", "text": "hi"}', "a"),
        ('{"room": "a"}'.encode("utf-16"), "a"),  # json.loads reads UTF-16 and -32 bytes
        ('{"room": "a"}'.encode("utf-32"), "a"),
        (b'\xef\xbb\xbf{"room": "a"}', "a"),  # and a UTF-8 byte order mark
        (b'{"room": 2.0}', "2"),
        (b'{"room": {"nested": 1}}', None),
        (b"not json", None),
        (b'{"room": "a"} trailing', None),
    ],
)
def test_the_topic_is_the_field_as_json_reads_the_bytes(payload: bytes, topic: str | None) -> None:
    sink = WebSocketBroadcastSink(topic="room")
    assert sink._topic(payload, Origin("nats", "nats:x", "chat", 1.0)) == topic


async def test_broadcast_writes_that_the_socket_takes_in_part_go_on_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer writes straight to the socket and goes on with ``send_all`` for what the
    kernel did not take: frames arrive whole and in order whatever the split (here every
    write takes at most 1,000 bytes, and every third none at all)."""
    calls = 0

    def partial_write(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise BlockingIOError
        return os.write(fd, data[:1000])

    monkeypatch.setattr(_wsbroadcast, "_write_fd", partial_write)
    sink = WebSocketBroadcastSink(client_queue=1000)
    messages = [bytes([n % 256]) * size for n, size in enumerate([5, 125, 126, 3000, 70_000] * 8)]
    with trio.fail_after(20):
        async with (
            broadcasting(sink) as (source, url),
            open_websocket_url(url, max_message_size=1 << 20) as ws,
        ):
            await wait_until(lambda: sink.clients == 1)
            for i in range(0, len(messages), 5):
                await source.send_many(messages[i : i + 5])
            assert [await ws.get_message() for _ in messages] == messages
    assert calls >= 3 and (sink.sent, sink.dropped) == (len(messages), 0)


async def test_broadcast_client_whose_socket_fails_is_dropped_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that fails (the client reset its connection) ends that client's connection,
    not the sink: the next client is served."""
    failing = True

    def write(fd: int, data: bytes) -> int:
        if failing:
            raise ConnectionResetError(104, "Connection reset by peer")
        return os.write(fd, data)

    monkeypatch.setattr(_wsbroadcast, "_write_fd", write)
    sink = WebSocketBroadcastSink()
    with trio.fail_after(20):
        async with broadcasting(sink) as (source, url):
            async with open_websocket_url(url):
                await wait_until(lambda: sink.clients == 1)
                await source.send_many([b"lost"])
                await wait_until(lambda: sink.clients == 0)
            failing = False
            async with open_websocket_url(url) as ws:
                await wait_until(lambda: sink.clients == 1)
                await source.send_many([b"heard"])
                assert await ws.get_message() == b"heard"


async def test_broadcast_survives_a_client_that_resets_while_it_is_sent_to() -> None:
    """A client that resets its connection while messages are being written to it (its
    writer's send fails inside the connection's nursery) ends that connection alone: the
    sink goes on serving the next client."""
    sink = WebSocketBroadcastSink(client_queue=10_000)
    with trio.fail_after(20):
        async with broadcasting(sink) as (source, url):
            address = ("127.0.0.1", sink.bound[1])  # type: ignore[index]
            rude = trio.socket.socket()
            await rude.connect(address)
            await rude.send(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await wait_until(lambda: sink.clients == 1)
            # Never read: the sink's writes fill the socket buffers, then the reset.
            await source.send_many([b"x" * 60_000] * 200)
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rude.close()
            await source.send_many([b"x" * 60_000] * 50)
            await wait_until(lambda: sink.clients == 0)
            async with open_websocket_url(url) as ws:
                await wait_until(lambda: sink.clients == 1)
                await source.send_many([b"still serving"])
                assert await ws.get_message() == b"still serving"
