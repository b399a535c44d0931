"""Over the memory budget, each transport refuses in its own protocol and counts
``over_budget``: HTTP ``503`` + ``Retry-After`` (on HTTP/2 on that stream, the connection going
on), WebSocket close ``1013``, TCP stops reading (the kernel's window pushes back) and goes on
once there is room. Real sockets, port 0."""

from __future__ import annotations

import os
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import helpers
import httpx
import pytest
import trio
from helpers import WS_HANDSHAKE, wait_until, ws_client_frame

import trio_gateway._budget
from trio_gateway import GrpcSource, HttpSource, TcpSource
from trio_gateway._budget import MemoryBudget
from trio_gateway._proto import gateway_pb2
from trio_gateway.sources._http2 import OVER_BUDGET
from trio_gateway.sources.websocket import WebSocketSource

MiB = 1 << 20


def full_budget() -> MemoryBudget:
    """A 64 MiB budget whose held pool is all taken (as by a large batch the sink holds)."""
    budget = MemoryBudget(64 * MiB)
    budget.charge(budget.pool)
    return budget


async def test_tcp_stops_reading_over_the_budget_and_resumes_when_room_frees() -> None:
    async with helpers.serving(TcpSource) as run:
        budget = run.ingress.budget = full_budget()
        stream = await trio.open_tcp_stream(*run.source.bound[0])
        await stream.send_all(b"one\ntwo\n")
        counters = run.ingress.counters
        await wait_until(lambda: counters.rejected["over_budget"] == 1)
        assert counters.received == 0 and budget.statistics().waiting == 1
        budget.release(budget.pool)  # the batch was delivered
        await wait_until(lambda: counters.received == 2)
        assert run.payloads() == [b"one", b"two"]
        await stream.aclose()


async def test_idle_tcp_connections_hold_at_most_half_of_the_budget() -> None:
    """Once half the pool is taken, a TCP connection charges a read's worth only once its
    peer has sent something, so connections that sit idle (far more than the pool has reads
    for) leave the rest of the budget to those that send: nothing is refused, an HTTP-sized
    body still fits, and a sender is served at once."""
    async with helpers.serving(TcpSource, max_connections=200) as run:
        budget = run.ingress.budget = MemoryBudget(64 * MiB)  # pool: 64 reads of 512 KiB
        address = run.source.bound[0]
        idle = [await trio.open_tcp_stream(*address) for _ in range(100)]
        counters = run.ingress.counters
        await wait_until(lambda: counters.connections_active == len(idle))
        read = 2 * run.source.read_size
        assert budget.held <= budget.pool // 2 + read and counters.rejected["over_budget"] == 0
        assert budget.connection().hold_nowait(budget.connection_share)
        await idle[0].send_all(b"spoke\n")
        await wait_until(lambda: counters.received == 1)
        assert run.payloads() == [b"spoke"] and counters.rejected["over_budget"] == 0
        for stream in idle:
            await stream.aclose()


async def test_http_answers_503_with_retry_after_over_the_budget() -> None:
    async with helpers.serving(HttpSource) as run:
        budget = run.ingress.budget = full_budget()
        host, port = run.source.bound[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            refused = await client.post("/ingest", content=b"x" * 1000)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"] == "over the memory budget"
            budget.release(budget.pool)
            accepted = await client.post("/ingest", content=b"x" * 1000)
            assert accepted.status_code == 202
        counters = run.ingress.counters
        assert counters.rejected["over_budget"] == 1 and counters.received == 1
        assert budget.held == 0  # the body's charge went with the request


async def test_http_body_charge_is_per_connection_so_one_peer_cannot_take_it_all() -> None:
    """A connection may hold at most 1/16 of the pool: a body declared larger than half of a
    share (chunks and the joined body) is refused, while small ones pass."""
    async with helpers.serving(HttpSource, max_message_size=4 * MiB) as run:
        run.ingress.budget = MemoryBudget(64 * MiB)  # share: 2 MiB
        host, port = run.source.bound[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            big = await client.post("/ingest", content=b"x" * (MiB + 1))
            small = await client.post("/ingest", content=b"x" * 1000)
        assert (big.status_code, small.status_code) == (503, 202)


async def test_a_stalled_body_is_cut_to_make_room_for_a_good_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bodies that never finish fill the pool: a good request is still answered ``202``, the
    connection that has held longest cut to make room for it (``over_budget_evicted``), the
    younger stall left alone."""
    monkeypatch.setattr(trio_gateway._budget, "EVICT_HOLDER_AFTER", 0.0)  # not a second
    async with helpers.serving(HttpSource) as run:
        budget = run.ingress.budget = MemoryBudget(64 * MiB)
        budget.charge(budget.pool - 2 * MiB)  # a batch in hand: room for two 1 MiB bodies
        host, port = run.source.bound[0]
        head = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nstart"
        stalled = []
        for _ in range(2):
            stalled.append(await trio.open_tcp_stream(host, port))
            await stalled[-1].send_all(head % (MiB // 2))  # charged twice: chunks and joined
            await wait_until(lambda: budget.held == budget.pool - 2 * MiB + MiB * len(stalled))
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            accepted = await client.post("/ingest", content=b"x" * 1000)
        assert accepted.status_code == 202
        with trio.fail_after(5):
            assert await stalled[0].receive_some(1000) == b""  # cut: closed
        counters = run.ingress.counters
        assert counters.rejected["over_budget_evicted"] == 1 and counters.received == 1
        assert counters.rejected["over_budget"] == 0
        await wait_until(lambda: counters.connections_active == 1)  # httpx's close seen too
        assert budget.connections_held == MiB  # the younger stall's
        for stream in stalled:
            await stream.aclose()


async def test_http2_answers_503_on_the_stream_over_the_budget_and_goes_on() -> None:
    """h2c (httpx, prior knowledge): refused by its Content-Length at its head while the pool
    is full, then accepted on the same connection once there is room."""
    async with helpers.serving(HttpSource) as run:
        budget = run.ingress.budget = full_budget()
        async with httpx.AsyncClient(http1=False, http2=True) as client:
            refused = await client.post(run.url, content=b"x" * 1000)
            assert refused.http_version == "HTTP/2"
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"] == "over the memory budget"
            budget.release(budget.pool)
            accepted = await client.post(run.url, content=b"x" * 1000)
            assert accepted.status_code == 202
        counters = run.ingress.counters
        assert counters.rejected["over_budget"] == 1 and counters.received == 1
        assert counters.connections_total == 1
        assert budget.held == 0  # the body's charge went with the request


async def test_http2_charges_a_partial_body_and_refuses_what_has_no_room() -> None:
    """A body without Content-Length is charged as its DATA comes: held while partial, given
    back once queued. Past what the budget has room for, ``503`` on that stream before the
    body ends (by its DATA), or before it is sent (by its Content-Length); the connection
    goes on."""
    async with helpers.serving(HttpSource) as run:
        budget = run.ingress.budget = MemoryBudget(64 * MiB)
        client = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        client.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
        headers.append((":authority", "x"))
        answers: dict[int, str] = {}
        host, port = run.source.bound[0]
        async with await trio.open_tcp_stream(host, port) as stream:

            async def answer(stream_id: int) -> str:
                await stream.send_all(client.data_to_send())
                with trio.fail_after(5):
                    while stream_id not in answers:
                        for event in client.receive_data(await stream.receive_some(65536)):
                            if isinstance(event, h2.events.ResponseReceived):
                                answers[event.stream_id] = dict(event.headers)[":status"]
                        await stream.send_all(client.data_to_send())
                return answers[stream_id]

            client.send_headers(1, headers)
            client.send_data(1, b"a" * 5_000)
            client.send_data(1, b"a" * 5_000)
            await stream.send_all(client.data_to_send())
            await wait_until(lambda: budget.held == 10_000)  # the partial body, charged
            client.send_data(1, b"b" * 5_000, end_stream=True)
            assert await answer(1) == "202"
            assert budget.held == 0
            budget.charge(budget.pool - 10_000)  # room for 10,000 bytes more
            client.send_headers(3, headers)
            client.send_data(3, b"c" * 6_000)
            client.send_data(3, b"d" * 6_000)  # not the end: refused as it comes
            assert await answer(3) == "503"
            client.send_headers(5, [*headers, ("content-length", "100000")])
            assert await answer(5) == "503"  # at its head, no DATA sent
            client.send_headers(7, headers)
            client.send_data(7, b"small", end_stream=True)
            assert await answer(7) == "202"
        counters = run.ingress.counters
        assert counters.rejected["over_budget"] == 2 and counters.received == 2
        assert run.payloads() == [b"a" * 10_000 + b"b" * 5_000, b"small"]
        await wait_until(lambda: counters.connections_active == 0)
        assert budget.held == budget.pool - 10_000  # the connection's share was released


@pytest.mark.parametrize("max_memory", [2 * MiB, 128 * 1024], ids=["share-64k", "share-4k"])
async def test_a_fast_websocket_sender_is_not_refused_for_its_own_receive_buffer(
    max_memory: int,
) -> None:
    # The receive buffer grows while the sender stays ahead (to 1 MiB); it is charged to the
    # connection's share, so it must stay within it: a quarter of the share at most. Before,
    # a share under 1 MiB closed a fast sender 1013, and one under the 16 KiB first buffer
    # refused every connection at its first message.
    async with helpers.serving(WebSocketSource, max_message_size=1024) as run:
        budget = run.ingress.budget = MemoryBudget(max_memory)
        host, port = run.source.bound[0]
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(WS_HANDSHAKE)
        with trio.fail_after(5):
            assert b" 101 " in await stream.receive_some(4096)
        frames = b"".join(ws_client_frame(b"%04d" % i + b"x" * 996) for i in range(2000))
        for start in range(0, len(frames), 256 * 1024):  # 2 MB, as fast as the socket takes it
            await stream.send_all(frames[start : start + 256 * 1024])
        counters = run.ingress.counters
        await wait_until(lambda: counters.received == 2000)
        assert counters.rejected["over_budget"] == 0
        assert budget.peak <= budget.connection_share
        await stream.aclose()
    assert [p[:4] for p in run.payloads()] == [b"%04d" % i for i in range(2000)]


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole", "fragments"])
async def test_websocket_closes_1013_over_the_budget(fragmented: bool) -> None:
    async with helpers.serving(WebSocketSource) as run:
        budget = run.ingress.budget = MemoryBudget(64 * MiB)  # share: 2 MiB
        host, port = run.source.bound[0]
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(WS_HANDSHAKE)
        with trio.fail_after(5):
            assert b" 101 " in await stream.receive_some(4096)
        await stream.send_all(ws_client_frame(b"first"))
        counters = run.ingress.counters
        await wait_until(lambda: counters.received == 1)
        if fragmented:
            # Fragments of one message pile up on the connection, within max_message_size
            # (1 MiB), until they would pass what the budget has left.
            charged = budget.pool - 512 * 1024
            budget.charge(charged)
            piece = os.urandom(60_000)
            await stream.send_all(ws_client_frame(piece, fin=False))
            for _ in range(12):
                await stream.send_all(ws_client_frame(piece, opcode=0x0, fin=False))
        else:
            # A connection keeps what it holds (small messages go on); a large message makes
            # its receive buffer grow, and that growth has no room.
            charged = budget.pool
            budget.charge(charged)
            await stream.send_all(ws_client_frame(os.urandom(200_000)))
        answer = b""
        with trio.fail_after(5):
            while b"\x88" not in answer[:1]:
                answer += await stream.receive_some(4096)
        assert answer[2:4] == (1013).to_bytes(2, "big")  # close: try again later
        await wait_until(lambda: counters.rejected["over_budget"] == 1)
        assert counters.received == 1
        await wait_until(lambda: counters.connections_active == 0)
        assert budget.held == charged  # the connection's share was released
        await stream.aclose()


class Http2Client:
    """An h2 client on a socket, for what it reads back: answers and the GOAWAY."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.ended: set[int] = set()
        self.goaway: h2.events.ConnectionTerminated | None = None

    async def send(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def read_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not done():
                data = await self.stream.receive_some(65536)
                assert data, "closed before that"
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        self.ended.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = event
                await self.send()  # its SETTINGS ack, WINDOW_UPDATEs


async def cut_for_a_new_request(budget: MemoryBudget, http: helpers.ServedSource) -> None:
    """Fill the held pool, then make an HTTP/1.1 request that needs room: the connection that
    has held bytes longest is cut (``over_budget_evicted``) for it."""
    batch = budget.pool - budget.held  # as if the sink held a batch that large
    budget.charge(batch)
    async with httpx.AsyncClient() as client:
        assert (await client.post(http.url, content=b"good")).status_code == 202
    budget.release(batch)


def assert_told_why(client: Http2Client, last_stream_id: int) -> None:
    goaway = client.goaway
    assert goaway is not None, "closed without a GOAWAY"
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.last_stream_id == last_stream_id
    assert goaway.additional_data == OVER_BUDGET
    assert b"over_budget_evicted" in OVER_BUDGET


async def test_a_budget_cut_http2_connection_is_told_why_in_a_goaway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trio_gateway._budget, "EVICT_HOLDER_AFTER", 0.0)  # not a second
    async with helpers.serving(HttpSource) as run:
        budget = run.ingress.budget = MemoryBudget(64 * MiB)
        headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
        headers.append((":authority", "x"))
        async with await trio.open_tcp_stream(*run.source.bound[0]) as stream:
            client = Http2Client(stream)
            client.h2.send_headers(1, headers)
            client.h2.send_data(1, b"whole", end_stream=True)
            await client.send()
            await client.read_until(lambda: 1 in client.ended)
            client.h2.send_headers(3, headers)
            client.h2.send_data(3, b"stalled" * 1000)  # a body that never ends
            await client.send()
            await wait_until(lambda: budget.connections_held == 7000)
            await cut_for_a_new_request(budget, run)
            await client.read_until(lambda: client.goaway is not None)
            assert_told_why(client, last_stream_id=3)
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass  # then closed
        counters = run.ingress.counters
        assert counters.rejected["over_budget_evicted"] == 1 and counters.received == 2
        assert run.payloads() == [b"whole", b"good"]
        await wait_until(lambda: budget.held == 0)


async def test_a_budget_cut_grpc_connection_is_told_why_in_a_goaway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trio_gateway._budget, "EVICT_HOLDER_AFTER", 0.0)
    budget = MemoryBudget(64 * MiB)
    async with helpers.serving(GrpcSource) as grpc, helpers.serving(HttpSource) as http:
        grpc.ingress.budget = http.ingress.budget = budget
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x")]
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
        send = [(":path", "/trio_gateway.v1.Gateway/Send"), *headers]
        message = gateway_pb2.Message(payload=b"whole").SerializeToString()
        async with await trio.open_tcp_stream(*grpc.source.bound[0]) as stream:
            client = Http2Client(stream)
            client.h2.send_headers(1, send)
            client.h2.send_data(1, len(message).to_bytes(5, "big") + message, end_stream=True)
            await client.send()
            await client.read_until(lambda: 1 in client.ended)
            client.h2.send_headers(3, send)
            # A message of 100,000 bytes of which 30,000 come: partial, held.
            client.h2.send_data(3, (100_000).to_bytes(5, "big") + b"x" * 30_000)
            await client.send()
            await wait_until(lambda: budget.connections_held >= 30_000)
            await cut_for_a_new_request(budget, http)
            await client.read_until(lambda: client.goaway is not None)
            assert_told_why(client, last_stream_id=3)
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass
        assert grpc.ingress.counters.rejected["over_budget_evicted"] == 1
        assert grpc.payloads() == [b"whole"] and http.payloads() == [b"good"]
        await wait_until(lambda: budget.held == 0)
