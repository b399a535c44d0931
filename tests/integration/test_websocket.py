"""The WebSocket source, against the real ``websockets`` client (asyncio, in a worker thread)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import helpers
import pytest
import trio
import trustme
from helpers import in_asyncio, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from trio_gateway._errors import ConfigurationError
from trio_gateway.queues import RingBuffer
from trio_gateway.sources.websocket import WebSocketSource

T = TypeVar("T")


serving = partial(helpers.serving, WebSocketSource)


async def send_all(url: str, messages: list[str | bytes], **kwargs: Any) -> int | None:
    """Send messages then close; returns the close code the server sent (None if clean)."""

    async def client() -> int | None:
        async with connect(url, **kwargs) as ws:
            try:
                for message in messages:
                    await ws.send(message)
                await ws.close()
            except ConnectionClosed:
                pass
            return ws.close_code

    return await in_asyncio(client)


async def test_text_and_binary_messages_arrive_as_bytes() -> None:
    async with serving() as run:
        messages: list[str | bytes] = ["héllo", b"\x00\x01\xff", "x" * 70_000, b""]
        assert await send_all(run.url, messages) == 1000
        assert run.payloads() == ["héllo".encode(), b"\x00\x01\xff", b"x" * 70_000, b""]
        assert run.ingress.counters.connections_total == 1


async def test_fragmented_message_is_one_message() -> None:
    async with serving() as run:
        assert await send_all(run.url, [iter(["ab", "cd", "é"])]) == 1000  # type: ignore[list-item]
        assert run.payloads() == ["abcdé".encode()]


async def test_ten_thousand_messages_over_ten_connections_exactly_once() -> None:
    async with serving() as run:

        async def client() -> None:
            async def one(c: int) -> None:
                async with connect(run.url) as ws:
                    for i in range(1000):
                        await ws.send(b"c%d-m%d-\x00\xff" % (c, i))

            await asyncio.gather(*(one(c) for c in range(10)))

        start = time.perf_counter()
        await in_asyncio(client)
        with trio.fail_after(5):
            await wait_until(lambda: not run.ingress.counters.connections_active)
        print(f"10,000 messages over 10 connections in {time.perf_counter() - start:.2f} s")
        received = run.payloads()
        expected = [b"c%d-m%d-\x00\xff" % (c, i) for c in range(10) for i in range(1000)]
        assert len(received) == 10_000
        assert sorted(received) == sorted(expected)
        for c in range(10):  # and in order within each connection
            mine = [p for p in received if p.startswith(b"c%d-" % c)]
            assert mine == [b"c%d-m%d-\x00\xff" % (c, i) for i in range(1000)]


async def test_message_too_big_closes_1009() -> None:
    async with serving(max_message_size=1000) as run:
        code = await send_all(run.url, [b"a" * 1000, b"b" * 1001, b"never"])
        assert code == 1009
        assert run.payloads() == [b"a" * 1000]
        assert run.ingress.counters.rejected["oversize"] == 1


async def test_invalid_utf8_in_text_closes_1007() -> None:
    async with serving() as run:
        code = await send_all(
            run.url,
            ["ok", b"\xff\xfe", "after"],
        )
        assert code == 1000  # binary frames need not be UTF-8

        async def client() -> int | None:
            async with connect(run.url) as ws:
                await ws.send("fine")
                await ws.send(b"bad \xc3(", text=True)  # a text frame with invalid UTF-8
                with suppress(ConnectionClosed):
                    await ws.recv()
                return ws.close_code

        assert await in_asyncio(client) == 1007
        assert run.payloads() == [b"ok", b"\xff\xfe", b"after", b"fine"]
        assert run.ingress.counters.rejected["malformed"] == 1


async def test_token_header_or_query() -> None:
    async with serving(token="s3cret") as run:
        for url, headers in [
            (run.url, None),
            (run.url, {"Authorization": "Bearer wrong"}),
            (run.url + "?token=wrong", None),
        ]:
            with pytest.raises(InvalidStatus) as info:
                await send_all(url, ["x"], additional_headers=headers)
            assert info.value.response.status_code == 401
            assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        assert await send_all(run.url, ["h"], additional_headers={"Authorization": "Bearer s3cret"})
        assert await send_all(run.url + "?token=s3cret", ["q"])
        assert run.payloads() == [b"h", b"q"]
        assert run.ingress.counters.rejected["unauthorized"] == 3


async def test_wrong_path_is_404() -> None:
    async with serving() as run:
        with pytest.raises(InvalidStatus) as info:
            await send_all(run.url + "elsewhere", ["x"])
        assert info.value.response.status_code == 404


async def test_block_policy_stops_reading_then_nothing_is_lost() -> None:
    """A full queue under block stops the reader; the client's sends back up; no loss."""
    async with serving(capacity=10, policy="block") as run:
        messages = [b"%05d" % i + b"." * 4000 for i in range(3000)]  # 12 MB: beyond TCP buffers

        async def client() -> None:
            async with connect(run.url, write_limit=16384) as ws:
                for message in messages:
                    await ws.send(message)

        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_asyncio, client)
            # Stalled: the queue is full and the source has stopped reading (it waits for room).
            await wait_until(lambda: run.queue.statistics().waiting_producers == 1)
            assert len(run.queue) == 10
            assert run.ingress.counters.received < len(messages)
            with trio.fail_after(20):
                while len(received) < len(messages):
                    received.extend(await run.queue.get_batch(1000))
        assert received == messages


async def test_idle_timeout_closes_1001() -> None:
    async with serving(idle_timeout=0.2) as run:

        async def client() -> tuple[int | None, float]:
            async with connect(run.url) as ws:
                start = time.monotonic()
                with suppress(ConnectionClosed):
                    await ws.recv()
                return ws.close_code, time.monotonic() - start

        code, waited = await in_asyncio(client)
        assert code == 1001
        assert waited >= 0.15
        assert run.ingress.counters.rejected["idle_timeout"] == 1


async def test_shutdown_sends_going_away() -> None:
    async with serving(grace_period=2.0) as run:
        connected = trio.Event()
        token = trio.lowlevel.current_trio_token()

        async def client() -> int | None:
            async with connect(run.url) as ws:
                await ws.send("before")
                trio.from_thread.run_sync(connected.set, trio_token=token)
                with suppress(ConnectionClosed):
                    await ws.recv()
                return ws.close_code

        async with trio.open_nursery() as nursery:
            result: list[int | None] = []

            async def run_client() -> None:
                result.append(await in_asyncio(client))

            nursery.start_soon(run_client)
            await connected.wait()
            with trio.fail_after(5):
                await wait_until(lambda: len(run.queue) > 0)
            run.stop()
        assert result == [1001]
        assert run.payloads() == [b"before"]


def masked_frame(payload: bytes) -> bytes:
    """A client's (masked) binary frame."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x82, 0x80 | len(payload))) + mask + masked


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "fin"])
@pytest.mark.parametrize("mid_frame", [False, True], ids=["between-frames", "mid-frame"])
async def test_abrupt_client_close_is_counted_as_a_closed_connection(
    reset: bool, mid_frame: bool
) -> None:
    """A client that vanishes without a close frame ends its connection only: the messages
    before are kept, a frame it cut short is ``truncated``, and nothing is ``internal_error``
    (issue 16: a reset used to escape the handler as an exception group)."""
    async with serving() as run:
        host, port = run.source.bound[0]
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with trio.fail_after(5):
            assert b" 101 " in await stream.receive_some(4096)
        data = masked_frame(b"one") + masked_frame(b"two")
        if mid_frame:
            data += masked_frame(b"three")[:4]
        await stream.send_all(data)
        counters = run.ingress.counters
        with trio.fail_after(5):
            await wait_until(lambda: counters.received == 2)
        if reset:  # SO_LINGER 0: close() sends a reset
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
        with trio.fail_after(5):
            await wait_until(lambda: counters.connections_active == 0)
        assert run.payloads() == [b"one", b"two"]
        expected = {"truncated": 1} if mid_frame else {}
        assert dict(counters.rejected) == expected


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls(ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with serving(certfile=str(certfile), keyfile=str(keyfile)) as run:
        assert run.url.startswith("wss://")
        assert await send_all(run.url, ["over tls", b"\x00"], ssl=client_context) == 1000
        assert run.payloads() == [b"over tls", b"\x00"]


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        WebSocketSource(certfile=str(tmp_path / "nope.pem"))
    assert info.value.key == "tls.certfile"
    with pytest.raises(ConfigurationError) as info:
        WebSocketSource(path="x")
    assert info.value.key == "websocket.path"


async def test_through_the_gateway_into_a_file(tmp_path: Path) -> None:
    from trio_gateway._gateway import Gateway
    from trio_gateway.sinks import FileSink, decode_jsonl_record

    out = tmp_path / "out.jsonl"
    gateway = Gateway(sources=[WebSocketSource()], sink=FileSink(out), queue=RingBuffer(100_000))
    expected = [b"c%d-m%d-\x00\xff" % (c, i) for c in range(10) for i in range(1000)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            host, port = bound[0][0]

            async def client() -> None:
                async def one(c: int) -> None:
                    async with connect(f"ws://{host}:{port}/") as ws:
                        for i in range(1000):
                            await ws.send(b"c%d-m%d-\x00\xff" % (c, i))

                await asyncio.gather(*(one(c) for c in range(10)))

            await in_asyncio(client)
            gateway.shutdown()
    with out.open("rb") as file:
        records = [decode_jsonl_record(line) for line in file]
    assert sorted(payload for payload, _ in records) == sorted(expected)
    assert records[0][1]["transport"] == "websocket"
    assert gateway.ledger.delivered == 10_000
    assert gateway.ledger.balanced
