"""WebSocket acknowledgements (subprotocol ``trio-gateway.ack.v1``), against real clients:
the ``websockets`` asyncio client (in a worker thread) and its Sans-I/O ClientProtocol over a
Trio socket where the test must control every read."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from helpers import REPO, in_asyncio, wait_until
from test_send import running
from test_websocket import serving
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from trio_gateway._errors import ProtocolError
from trio_gateway.loadgen import send_websocket
from trio_gateway.queues import OverflowPolicy
from trio_gateway.sources.websocket import (
    ACK_SUBPROTOCOL,
    WebSocketSource,
)
from trio_gateway.testing import GatewayHandle, RecordingSink

ACKS = [Subprotocol(ACK_SUBPROTOCOL)]


def settle(acks: list[dict[str, Any]]) -> tuple[int, dict[int, str]]:
    """Check a connection's acks against the documented rules; (last acked, refused by number)."""
    acked = 0
    refused: dict[int, str] = {}
    for ack in acks:
        assert ack["acked"] > acked, acks
        after = acked
        for first, last, reason in ack.get("refused", []):
            assert after < first <= last <= ack["acked"], ack
            refused.update(dict.fromkeys(range(first, last + 1), reason))
            after = last
        acked = ack["acked"]
    return acked, refused


async def send_and_collect(url: str, messages: list[bytes]) -> tuple[list[dict[str, Any]], int]:
    """Send, then read acks until all are settled, then close; (acks, close code)."""

    async def client() -> tuple[list[dict[str, Any]], int]:
        async with connect(url, subprotocols=ACKS) as ws:
            assert ws.subprotocol == ACK_SUBPROTOCOL
            for message in messages:
                await ws.send(message)
            acks: list[dict[str, Any]] = []
            while not acks or acks[-1]["acked"] < len(messages):
                acks.append(json.loads(await ws.recv()))
            await ws.close()
            assert ws.close_code is not None
            return acks, ws.close_code

    return await in_asyncio(client)


# -- negotiation ----------------------------------------------------------------------------


async def test_without_the_subprotocol_nothing_changes() -> None:
    async with serving() as run:

        async def client(subprotocols: list[Subprotocol] | None) -> str | None:
            async with connect(run.url, subprotocols=subprotocols) as ws:
                for i in range(200):
                    await ws.send(b"%d" % i)
                await ws.close()
                # The server sent nothing but its close frame: recv has no message to give.
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1000
                return ws.subprotocol

        assert await in_asyncio(lambda: client(None)) is None
        # A client offering only other subprotocols is served as before, none selected.
        assert await in_asyncio(lambda: client([Subprotocol("chat")])) is None
        assert run.payloads() == [b"%d" % i for i in range(200)] * 2


async def test_acks_false_does_not_select_it() -> None:
    async with serving(acks=False) as run:

        async def client() -> str | None:
            async with connect(run.url, subprotocols=ACKS) as ws:
                await ws.send(b"x")
                return ws.subprotocol

        assert await in_asyncio(client) is None
        with trio.fail_after(5):
            await wait_until(lambda: run.ingress.counters.received == 1)


# -- what the acks say -----------------------------------------------------------------------


async def test_block_every_message_acked_once_in_order() -> None:
    """A small queue drained slowly: reading stops and resumes; every message is acked once,
    after it is in the queue."""
    async with serving(capacity=50, policy="block") as run:
        messages = [b"m%05d" % i for i in range(3000)]
        drained: list[bytes] = []

        async def drain() -> None:
            while len(drained) < len(messages):
                drained.extend(await run.queue.get_batch(20))
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            acks, code = await send_and_collect(run.url, messages)
        assert code == 1000
        assert drained == messages
        acked, refused = settle(acks)
        assert (acked, refused) == (len(messages), {})
        # One ack per read at most, coalesced: far fewer acks than messages.
        assert 1 <= len(acks) < len(messages)
        assert run.ingress.counters.received == len(messages)


async def test_the_last_ack_comes_before_the_close_frame() -> None:
    """A message over the limit closes 1009: the ack before the close covers exactly the
    messages before it."""
    async with serving(max_message_size=100) as run:

        async def client() -> tuple[list[dict[str, Any]], int | None]:
            async with connect(run.url, subprotocols=ACKS) as ws:
                for i in range(5):
                    await ws.send(b"ok%d" % i)
                await ws.send(b"x" * 101)
                acks = []
                try:
                    while True:
                        acks.append(json.loads(await ws.recv()))
                except ConnectionClosed:
                    return acks, ws.close_code

        acks, code = await in_asyncio(client)
        assert code == 1009
        assert settle(acks) == (5, {})
        assert run.payloads() == [b"ok%d" % i for i in range(5)]


async def test_a_closed_queue_refuses_the_rest_as_gateway_stopping() -> None:
    """Under block the reader waits for room; when the queue closes instead, what was waiting
    and what follows is refused, and the ledger has it abandoned."""
    async with serving(capacity=5, policy="block") as run:

        async def client() -> list[dict[str, Any]]:
            async with connect(run.url, subprotocols=ACKS) as ws:
                for i in range(1, 11):
                    await ws.send(b"%d" % i)
                acks = []
                while not acks or acks[-1]["acked"] < 10:
                    acks.append(json.loads(await ws.recv()))
                return acks

        async with trio.open_nursery() as nursery:
            result: list[list[dict[str, Any]]] = []

            async def run_client() -> None:
                result.append(await in_asyncio(client))

            nursery.start_soon(run_client)
            await wait_until(lambda: len(run.queue) == 5)
            run.queue.close()
        assert settle(result[0]) == (10, dict.fromkeys(range(6, 11), "gateway_stopping"))
        assert run.ingress.counters.abandoned == 5


@asynccontextmanager
async def gateway(
    *, capacity: int, policy: OverflowPolicy
) -> AsyncIterator[tuple[GatewayHandle, RecordingSink, str]]:
    async with running(WebSocketSource(), capacity=capacity, policy=policy) as (handle, sink):
        host, port = handle.address()
        yield handle, sink, f"ws://{host}:{port}/"


async def test_drop_newest_acks_name_exactly_the_refused_and_the_ledger_agrees() -> None:
    async with gateway(capacity=4, policy="drop_newest") as (handle, sink, url):
        sink.stall()
        # Message 1 is taken by the pump and held by the stalled sink; messages 2-5 fill the
        # queue; 6-12 find it full, however the reads cut them.
        messages = [b"first"] + [b"m%d" % i for i in range(2, 13)]

        async def client() -> tuple[dict[int, str], list[dict[str, Any]]]:
            async with connect(url, subprotocols=ACKS) as ws:
                await ws.send(messages[0])
                acks = [json.loads(await ws.recv())]
                trio.from_thread.run(sink.wait_stalled)  # blocks this client's loop: fine
                for message in messages[1:]:
                    await ws.send(message)
                while acks[-1]["acked"] < len(messages):
                    acks.append(json.loads(await ws.recv()))
                _, first_refusals = settle(acks)
                # Then resend what was refused, as docs/websocket.md does, until all is in.
                trio.from_thread.run_sync(sink.recover)
                sent = list(messages)  # message number n is sent[n - 1]
                todo = [sent[n - 1] for n in sorted(first_refusals)]
                while todo:
                    for message in todo:
                        sent.append(message)
                        await ws.send(message)
                    before = len(acks)
                    while acks[-1]["acked"] < len(sent):
                        acks.append(json.loads(await ws.recv()))
                    _, refused = settle(acks[before:])
                    todo = [sent[n - 1] for n in sorted(refused)]
                return first_refusals, acks

        first_refusals, acks = await in_asyncio(client)
        assert first_refusals == dict.fromkeys(range(6, 13), "queue_full")
        _, refused = settle(acks)
        await sink.wait_for(12)
        # Every message exactly once (resent ones may overtake earlier resends: another read).
        assert sorted(sink.payloads) == sorted(messages)
    ledger = handle.ledger
    # Refused = rejected (the sender was told), never received or dropped.
    assert ledger.rejected["queue_full"] == len(refused) >= 7
    assert (ledger.received, ledger.delivered, sum(ledger.dropped.values())) == (12, 12, 0)
    assert ledger.balanced


async def test_drop_oldest_accepts_everything_and_drops_count_as_dropped() -> None:
    async with gateway(capacity=4, policy="drop_oldest") as (handle, sink, url):
        sink.stall()
        messages = [b"m%d" % i for i in range(1, 21)]

        async def client() -> list[dict[str, Any]]:
            async with connect(url, subprotocols=ACKS) as ws:
                await ws.send(messages[0])
                acks = [json.loads(await ws.recv())]
                trio.from_thread.run(sink.wait_stalled)
                for message in messages[1:]:
                    await ws.send(message)
                while acks[-1]["acked"] < len(messages):
                    acks.append(json.loads(await ws.recv()))
                return acks

        assert settle(await in_asyncio(client)) == (20, {})
        sink.recover()
        await sink.wait_for(5)
    ledger = handle.ledger
    assert ledger.received == 20
    assert ledger.dropped["drop_oldest"] == 15
    assert sink.payloads == [b"m1", b"m17", b"m18", b"m19", b"m20"]


def docs_client() -> Any:
    """The resending client of docs/websocket.md, as written there."""
    text = (REPO / "docs" / "websocket.md").read_text()
    block = re.search(r"```python\n(import asyncio, json\n.*?)```", text, re.S)
    assert block is not None
    namespace: dict[str, Any] = {}
    exec(compile(block[1], "docs/websocket.md", "exec"), namespace)
    return namespace["send_all_acked"]


async def test_the_documented_client_resends_until_everything_is_in() -> None:
    send_all_acked = docs_client()
    async with gateway(capacity=4, policy="drop_newest") as (handle, sink, url):
        sink.stall()
        messages = [b"doc%d" % i for i in range(40)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_asyncio, lambda: send_all_acked(url, messages, 0.05))
            await sink.wait_stalled()
            with trio.fail_after(5):
                await wait_until(lambda: handle.ledger.rejected.get("queue_full", 0) > 0)
            sink.recover()
        await sink.wait_for(40)
        assert sorted(sink.payloads) == sorted(messages)
    ledger = handle.ledger
    assert ledger.received == ledger.delivered == 40
    assert ledger.rejected["queue_full"] > 0


# -- bounded when the peer does not read -----------------------------------------------------


async def raw_client(url: str) -> tuple[trio.SocketStream, ClientProtocol]:
    """A WebSocket client with a tiny receive buffer that reads only when the test says."""
    wsuri = parse_uri(url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((wsuri.host, wsuri.port))
    stream = trio.SocketStream(sock)
    protocol = ClientProtocol(wsuri, subprotocols=ACKS)
    protocol.send_request(protocol.connect())
    await stream.send_all(b"".join(protocol.data_to_send()))
    while protocol.handshake_exc is None and protocol.subprotocol is None:
        protocol.receive_data(await stream.receive_some(65536))
        protocol.events_received()
    assert protocol.subprotocol == ACK_SUBPROTOCOL
    return stream, protocol


async def test_a_peer_that_never_reads_its_acks_keeps_being_read() -> None:
    """Thousands of reads, each with its ack, and the peer reads none: the gateway reads on
    (no deadlock), and what waits for the peer is the kernel's buffers plus one coalesced ack,
    not one ack per read."""
    n = 4000
    async with serving(idle_timeout=10) as run:
        stream, protocol = await raw_client(run.url)
        for i in range(n):
            protocol.send_binary(b"%d" % i)
            await stream.send_all(b"".join(protocol.data_to_send()))
            # The source has read it, offered it and tried to send its ack.
            await trio.testing.wait_all_tasks_blocked()
        assert run.ingress.counters.received == n
        # Now read everything the gateway sent.
        protocol.send_close()
        await stream.send_all(b"".join(protocol.data_to_send()))
        acks: list[dict[str, Any]] = []
        received = 0
        while protocol.close_rcvd is None:
            data = await stream.receive_some(65536)
            assert data
            received += len(data)
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    acks.append(json.loads(event.data))
        assert settle(acks) == (n, {})
        # n reads would have made n acks (about 15 bytes each, 60 KB); the kernel's buffers
        # held what they could (about 1,500 acks with Linux's default 16 KiB send buffer),
        # the rest were folded into the ack that waited.
        print(f"{len(acks)} acks for {n} reads, {received} bytes")
        assert len(acks) < n
        await stream.aclose()


async def test_a_peer_that_stops_reading_is_dropped_after_idle_timeout() -> None:
    async with serving(idle_timeout=0.5) as run:
        stream, protocol = await raw_client(run.url)
        with trio.fail_after(10):
            # Send until the gateway gives up on this connection: its ack writes stalled.
            with pytest.raises((trio.BrokenResourceError, OSError)):
                while True:
                    for _ in range(50):
                        protocol.send_binary(b"%d" % run.ingress.counters.received)
                        await stream.send_all(b"".join(protocol.data_to_send()))
                        await trio.testing.wait_all_tasks_blocked()
                    await trio.sleep(0.01)
            await wait_until(lambda: not run.ingress.counters.connections_active)
        assert run.ingress.counters.rejected["too_slow"] == 1
        await stream.aclose()


# -- the send client ----------------------------------------------------------------------------


async def test_send_websocket_with_acks_counts_the_refused() -> None:
    async with gateway(capacity=8, policy="drop_newest") as (handle, sink, url):
        sink.stall()
        summary = await send_websocket(url, count=500, size=18, acks=True, step_timeout=10)
        rejected = handle.ledger.rejected["queue_full"]
        assert summary.rejected == {"queue_full": rejected}
        assert summary.accepted == handle.ledger.received == 500 - rejected
        assert rejected >= 500 - 8 - 1 - 64  # the queue and at most one pump batch


async def test_send_acks_needs_a_gateway_that_selects_them() -> None:
    async with serving(acks=False) as run:
        with pytest.raises(ProtocolError, match="did not select"):
            await send_websocket(run.url, count=10, size=18, acks=True, step_timeout=5)
