"""Connections past ``max_connections`` get a clear answer before they are closed.

Each listener holds its limit with real, working connections; a new client then gets its
transport's answer (HTTP ``503`` + ``Retry-After`` on HTTP/1.1 and HTTP/2, a WebSocket
handshake refused with ``503``, gRPC ``UNAVAILABLE`` + ``GOAWAY``; TCP: closed, as it has no
protocol to answer in), read by real clients (httpx, curl, websockets, grpcio, grpclib). It is
counted as ``too_many_connections``; the connections holding the slots go on working and
their messages arrive. A flood of 200 over-limit connections leaves every listener serving.
The refusals are bounded: at most ``max_refusals`` run at once (the rest are closed
unanswered) and each ends at its deadline, even when the peer never reads or never sends.
And on every stream listener, parametrised: a peer past the limit that sends nothing is
answered where the protocol can (closed otherwise) and counted, and once a slot frees a
well-behaved client is served.

This is the one home of the sources' ``max_connections`` tests (the admin endpoint's own limit
is in test_admin.py).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
import trio
import trustme
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from helpers import detached_ingress, in_asyncio, wait_until
from hyperframe.frame import Frame, GoAwayFrame
from test_reliability_bad_input import (
    Good,
    good_grpc,
    good_http,
    good_tcp,
    good_ws,
)
from trio_websocket import open_websocket_url
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from trio_gateway import Gateway
from trio_gateway._ledger import SourceCounters
from trio_gateway._proto import gateway_grpc, gateway_pb2
from trio_gateway.codecs import encode_grpc_message
from trio_gateway.queues import RingBuffer
from trio_gateway.sources import GrpcSource, HttpSource, Source, TcpSource, WebSocketSource
from trio_gateway.sources import _base as sources_base
from trio_gateway.sources._base import (
    MAX_REFUSALS,
    REFUSAL_TIMEOUT,
    open_tcp_listeners,
    refuse_with,
    serve_connections,
)
from trio_gateway.testing import GatewayHandle, RecordingSink, open_gateway

T = TypeVar("T")
Address = tuple[str, int]
WAIT = 10.0
"""Every test is bounded by this (trio.fail_after)."""
FLOOD = 200
"""Over-limit connections in the flood tests."""
SEND_PATH = "/trio_gateway.v1.Gateway/Send"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""grpcio channel option: its own connection (channels of a process share them otherwise)."""


# -- plumbing ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_eviction(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests here hold the limit with connections that stay silent; however slow the
    machine, none is evicted to make room (eviction has its own test, which turns it on)."""
    monkeypatch.setattr(sources_base, "EVICT_AFTER", None)


@asynccontextmanager
async def limited(*sources: Source) -> AsyncIterator[tuple[GatewayHandle, RecordingSink]]:
    """A gateway with ``sources`` into a recording sink, started and (at the end) stopped."""
    sink = RecordingSink()
    gateway = Gateway(sources=list(sources), sink=sink, grace_period=0.5)
    async with open_gateway(gateway) as handle:
        yield handle, sink


def counters(handle: GatewayHandle, index: int = 0) -> SourceCounters:
    return handle.gateway.source_counters[index]


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (a reset is a close too)."""
    received = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(received)


async def first_bytes(stream: trio.abc.Stream) -> bytes:
    """One read: what the server has sent so far, or b"" if it closed (or reset)."""
    try:
        return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:
        return b""


def check_503(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": "too many connections"}
    if response.http_version == "HTTP/1.1":
        assert response.headers["connection"] == "close"


def grpc_request(payload: bytes) -> tuple[h2.connection.H2Connection, bytes]:
    """A raw HTTP/2 client with one unary ``Send`` call: the connection and its bytes."""
    client = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", SEND_PATH),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    message = gateway_pb2.Message(payload=payload).SerializeToString()
    client.send_data(1, encode_grpc_message(message), end_stream=True)
    return client, client.data_to_send()


def grpc_answer(client: h2.connection.H2Connection, answer: bytes) -> tuple[str, str, int]:
    """(grpc-status, grpc-message, GOAWAY's last stream) of a refused call's answer."""
    headers: dict[str, str] = {}
    last_stream = -1
    for event in client.receive_data(answer):
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers.update(dict(event.headers))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.ConnectionTerminated):
            assert event.error_code == 0 and event.additional_data == b"too many connections"
            last_stream = event.last_stream_id
    return headers.get("grpc-status", ""), headers.get("grpc-message", ""), last_stream


# -- HTTP ----------------------------------------------------------------------------------------


async def curl(*args: str) -> bytes:
    done = await trio.run_process(
        ["curl", "--noproxy", "*", "-sS", "-i", "--max-time", "5", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return bytes(done.stdout)


async def test_http_past_the_limit_gets_503_from_httpx_and_curl_on_http1_and_http2(
    tmp_path: Path,
) -> None:
    with trio.fail_after(WAIT):
        async with limited(HttpSource(max_connections=1)) as (handle, sink):
            host, port = handle.address()
            url = f"http://{host}:{port}/ingest"
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(limits=limits) as held:
                assert (await held.post(url, content=b"held-1")).status_code == 202
                await wait_until(lambda: counters(handle).connections_active == 1)

                async with httpx.AsyncClient() as other:
                    refused = await other.post(url, content=b"refused")
                assert refused.http_version == "HTTP/1.1"
                check_503(refused)
                # HTTP/2 with prior knowledge: the 503 answers the first request, then GOAWAY.
                async with httpx.AsyncClient(http1=False, http2=True) as other:
                    refused = await other.post(url, content=b"refused-h2")
                assert refused.http_version == "HTTP/2"
                check_503(refused)

                answer = await curl("--data-binary", "refused-curl", url)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
                assert b"\r\nretry-after: 1\r\n" in head and b"\r\nconnection: close" in head
                assert body == b'{"error":"too many connections"}'
                # HTTP/2 bodies are read to their end before the answer (curl gives up on a
                # response that comes while it still sends): one read, then one over the
                # 64 KiB window that needs WINDOW_UPDATEs.
                big = tmp_path / "big"
                big.write_bytes(b"x" * 200_000)
                for body in ("refused", f"@{big}"):
                    answer = await curl("--http2-prior-knowledge", "--data-binary", body, url)
                    assert answer.startswith(b"HTTP/2 503")
                    assert answer.endswith(b'{"error":"too many connections"}')

                assert (await held.post(url, content=b"held-2")).status_code == 202
            await sink.wait_for(2)
    assert sink.payloads == [b"held-1", b"held-2"]
    assert handle.ledger.rejected == {"too_many_connections": 5}


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_https_past_the_limit_gets_503_after_the_tls_handshake(http2: bool) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with trio.fail_after(WAIT):
        async with limited(HttpSource(max_connections=1, ssl_context=server_context)) as (
            handle,
            sink,
        ):
            host, port = handle.address()
            url = f"https://{host}:{port}/ingest"
            async with httpx.AsyncClient(verify=client_context, http2=http2) as held:
                assert (await held.post(url, content=b"held")).status_code == 202
                await wait_until(lambda: counters(handle).connections_active == 1)
                async with httpx.AsyncClient(verify=client_context, http2=http2) as other:
                    refused = await other.post(url, content=b"refused")
                assert refused.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                check_503(refused)
            await sink.wait_for(1)
    assert sink.payloads == [b"held"]
    assert handle.ledger.rejected == {"too_many_connections": 1}


# -- WebSocket -----------------------------------------------------------------------------------


async def test_websocket_past_the_limit_gets_503_to_its_handshake() -> None:
    with trio.fail_after(WAIT):
        async with limited(WebSocketSource(max_connections=1)) as (handle, sink):
            host, port = handle.address()
            url = f"ws://{host}:{port}/"

            async def client() -> tuple[int, str | None, bytes]:
                async with connect(url) as held:
                    await held.send(b"held-1")
                    with pytest.raises(InvalidStatus) as refused:
                        async with connect(url, open_timeout=5):
                            pass
                    await held.send(b"held-2")
                response = refused.value.response
                return response.status_code, response.headers.get("Retry-After"), response.body

            status, retry_after, body = await in_asyncio(client)
            await sink.wait_for(2)
    assert (status, retry_after, body) == (503, "1", b"too many connections\n")
    assert sink.payloads == [b"held-1", b"held-2"]
    assert handle.ledger.rejected == {"too_many_connections": 1}


# -- gRPC ----------------------------------------------------------------------------------------


def grpcio_send(channel: grpc.Channel, payload: bytes) -> bool:
    send = channel.unary_unary(
        SEND_PATH,
        request_serializer=gateway_pb2.Message.SerializeToString,
        response_deserializer=gateway_pb2.Ack.FromString,
    )
    return bool(send(gateway_pb2.Message(payload=payload), timeout=5).accepted)


def grpcio_refused(port: int) -> tuple[grpc.StatusCode, str]:
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}", OWN_CONNECTION) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        grpcio_send(channel, b"refused")
    return refused.value.code(), refused.value.details()  # type: ignore[attr-defined]


async def grpclib_refused(port: int) -> tuple[Status, str | None]:
    async with Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as refused:
            await gateway_grpc.GatewayStub(channel).Send(
                gateway_pb2.Message(payload=b"refused"), timeout=5
            )
    return refused.value.status, refused.value.message


async def test_grpc_past_the_limit_is_unavailable_for_grpcio_and_grpclib() -> None:
    with trio.fail_after(WAIT):
        async with limited(GrpcSource(max_connections=1)) as (handle, sink):
            port = handle.address()[1]
            with grpc.insecure_channel(f"127.0.0.1:{port}", OWN_CONNECTION) as held:
                assert await trio.to_thread.run_sync(grpcio_send, held, b"held-1")
                await wait_until(lambda: counters(handle).connections_active == 1)

                assert await trio.to_thread.run_sync(grpcio_refused, port) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "too many connections",
                )
                assert await in_asyncio(partial(grpclib_refused, port)) == (
                    Status.UNAVAILABLE,
                    "too many connections",
                )
                assert await trio.to_thread.run_sync(grpcio_send, held, b"held-2")
            await sink.wait_for(2)
    assert sink.payloads == [b"held-1", b"held-2"]
    # one connection each: UNAVAILABLE is final, no client retried on its own
    assert handle.ledger.rejected == {"too_many_connections": 2}


async def test_grpc_over_tls_past_the_limit_is_unavailable_after_the_handshake() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())

    def refused(port: int) -> tuple[grpc.StatusCode, str]:
        target = f"127.0.0.1:{port}"
        with (
            grpc.secure_channel(target, credentials, OWN_CONNECTION) as channel,
            pytest.raises(grpc.RpcError) as refusal,
        ):
            grpcio_send(channel, b"refused")
        return refusal.value.code(), refusal.value.details()  # type: ignore[attr-defined]

    with trio.fail_after(WAIT):
        async with limited(GrpcSource(max_connections=1, ssl_context=server_context)) as (
            handle,
            sink,
        ):
            port = handle.address()[1]
            target = f"127.0.0.1:{port}"
            with grpc.secure_channel(target, credentials, OWN_CONNECTION) as held:
                assert await trio.to_thread.run_sync(grpcio_send, held, b"held-1")
                await wait_until(lambda: counters(handle).connections_active == 1)
                assert await trio.to_thread.run_sync(refused, port) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "too many connections",
                )
                assert await trio.to_thread.run_sync(grpcio_send, held, b"held-2")
            await sink.wait_for(2)
    assert sink.payloads == [b"held-1", b"held-2"]
    assert handle.ledger.rejected == {"too_many_connections": 1}


# -- a flood, on every listener ------------------------------------------------------------------


@dataclass
class Transport:
    """How to hold a slot with a real client, and what an over-limit peer sends and gets."""

    source: Callable[[int], Source]
    hold: Callable[[AsyncExitStack, Address], Awaitable[Callable[[bytes], Awaitable[None]]]]
    opening: Callable[[], tuple[Any, bytes]]
    answered: Callable[[Any, bytes], bool]
    """Whether a peer's answer is the refusal (b"" is a close without one)."""


async def hold_tcp(stack: AsyncExitStack, address: Address) -> Callable[[bytes], Awaitable[None]]:
    stream = await stack.enter_async_context(await trio.open_tcp_stream(*address))

    async def send(payload: bytes) -> None:
        await stream.send_all(payload + b"\n")

    return send


async def hold_http(stack: AsyncExitStack, address: Address) -> Callable[[bytes], Awaitable[None]]:
    client = await stack.enter_async_context(
        httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
    )

    async def send(payload: bytes) -> None:
        url = f"http://{address[0]}:{address[1]}/ingest"
        assert (await client.post(url, content=payload)).status_code == 202

    await send(b"hello")
    return send


async def hold_ws(stack: AsyncExitStack, address: Address) -> Callable[[bytes], Awaitable[None]]:
    ws = await stack.enter_async_context(open_websocket_url(f"ws://{address[0]}:{address[1]}/"))
    return ws.send_message


async def hold_grpc(stack: AsyncExitStack, address: Address) -> Callable[[bytes], Awaitable[None]]:
    channel = stack.enter_context(
        grpc.insecure_channel(f"{address[0]}:{address[1]}", OWN_CONNECTION)
    )

    async def send(payload: bytes) -> None:
        assert await trio.to_thread.run_sync(grpcio_send, channel, payload)

    await send(b"hello")
    return send


HTTP_REQUEST = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nflood"
WS_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
HTTP_503 = b"HTTP/1.1 503 Service Unavailable\r\n"

TRANSPORTS = {
    "tcp": Transport(
        lambda n: TcpSource(max_connections=n),
        hold_tcp,
        lambda: (None, b"flood\n"),
        lambda _, answer: False,  # no protocol to answer in: the close is all there is
    ),
    "http": Transport(
        lambda n: HttpSource(max_connections=n),
        hold_http,
        lambda: (None, HTTP_REQUEST),
        lambda _, answer: answer.startswith(HTTP_503) and b"too many connections" in answer,
    ),
    "websocket": Transport(
        lambda n: WebSocketSource(max_connections=n),
        hold_ws,
        lambda: (None, WS_HANDSHAKE),
        lambda _, answer: answer.startswith(HTTP_503) and b"too many connections" in answer,
    ),
    "grpc": Transport(
        lambda n: GrpcSource(max_connections=n),
        hold_grpc,
        lambda: grpc_request(b"flood"),
        lambda client, answer: grpc_answer(client, answer) == ("14", "too many connections", 1),
    ),
}


@pytest.mark.parametrize("name", list(TRANSPORTS))
async def test_a_flood_past_the_limit_is_answered_and_the_gateway_keeps_serving(
    name: str,
) -> None:
    """Two real clients hold the limit; 200 more connect at once, each sending the start of
    a call. Each gets the refusal or (past the refusals running at once) a bare close, none
    waits; every one is counted; the two held connections go on and their messages arrive."""
    transport = TRANSPORTS[name]
    answers: list[tuple[bool, bytes]] = []

    async def peer(address: Address) -> None:
        client, opening = transport.opening()
        async with await trio.open_tcp_stream(*address) as stream:
            try:
                await stream.send_all(opening)
            except trio.BrokenResourceError:
                pass  # closed (reset) before it could send: it was not answered
            answer = await read_until_closed(stream)
        answers.append((transport.answered(client, answer), answer))

    hellos = [b"hello"] * 2 if name in ("http", "grpc") else []  # hold() checks the slot works
    expected = sorted([*hellos, b"held-0", b"held-1"])
    with trio.fail_after(WAIT):
        async with limited(transport.source(2)) as (handle, sink), AsyncExitStack() as stack:
            address = handle.address()
            held = [await transport.hold(stack, address) for _ in range(2)]
            await wait_until(lambda: counters(handle).connections_active == 2)
            async with trio.open_nursery() as nursery:
                for _ in range(FLOOD):
                    nursery.start_soon(peer, address)
            assert counters(handle).connections_active == 2
            for i, send in enumerate(held):
                await send(b"held-%d" % i)
            await sink.wait_for(len(expected))
    assert len(answers) == FLOOD
    answered = sum(ok for ok, _ in answers)
    assert all(answer == b"" for ok, answer in answers if not ok), "neither answer nor close"
    if name == "tcp":
        assert answered == 0
    else:
        # The first MAX_REFUSALS always get a refusal task; more do as refusals finish.
        assert answered >= MAX_REFUSALS
    assert handle.ledger.rejected == {"too_many_connections": FLOOD}
    assert sorted(sink.payloads) == expected


# -- the bounds ----------------------------------------------------------------------------------


async def test_refusals_run_at_most_max_refusals_at_once_and_free_their_slots() -> None:
    """serve_connections with real sockets: 40 over-limit peers that never read and never
    leave. Only ``max_refusals`` (8) are answered and held; the other 32 are closed at once
    (nothing sent); all 40 are counted; the connection within the limit is still served.
    When the 8 leave, their refusals end and a new peer is answered again."""
    queue: RingBuffer[bytes] = RingBuffer(10)
    ingress, stopping = detached_ingress(queue, "tcp", grace_period=0.5)
    source_counters = ingress.counters
    listeners = await open_tcp_listeners("127.0.0.1", 0)
    address = listeners[0].socket.getsockname()[:2]

    async def echo(stream: trio.abc.Stream) -> None:
        while data := await stream.receive_some(1024):
            await stream.send_all(data)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_connections,
                    echo,
                    listeners,
                    ingress,
                    max_connections=1,
                    refuse=refuse_with(b"busy\n"),
                    max_refusals=8,
                    refusal_timeout=WAIT,  # nothing ends by its deadline here
                )
            )
            held = await trio.open_tcp_stream(*address)
            await wait_until(lambda: source_counters.connections_active == 1)
            peers = []
            for _ in range(40):
                peers.append(await trio.open_tcp_stream(*address))
            await wait_until(lambda: source_counters.rejected["too_many_connections"] == 40)
            answers = [await first_bytes(peer) for peer in peers]
            assert answers.count(b"busy\n") == 8
            assert answers.count(b"") == 32
            await held.send_all(b"still served")
            assert await held.receive_some(1024) == b"still served"
            for peer in peers:
                await peer.aclose()
            late = await trio.open_tcp_stream(*address)
            assert await first_bytes(late) == b"busy\n"
            await late.aclose()
            await held.aclose()
            stopping.set()
    assert source_counters.rejected == {"too_many_connections": 41}


async def test_peers_that_never_send_or_never_leave_are_closed_at_the_refusal_deadline() -> None:
    """With the sources' own refusal (deadline REFUSAL_TIMEOUT). An HTTP peer that never
    sends is closed without a word, a gRPC one gets the server preface and a GOAWAY just
    before the deadline. An HTTP peer that sends its request and then goes on sending and
    never closes gets its 503 and the half-close at once, then the full close at the
    deadline (its next send is reset). None holds its refusal past the deadline."""
    with trio.fail_after(WAIT):
        async with limited(HttpSource(max_connections=1), GrpcSource(max_connections=1)) as (
            handle,
            _,
        ):
            http, grpc_address = handle.address(0), handle.address(1)
            holders = [await trio.open_tcp_stream(*http), await trio.open_tcp_stream(*grpc_address)]
            await wait_until(lambda: counters(handle, 0).connections_active == 1)
            await wait_until(lambda: counters(handle, 1).connections_active == 1)
            results: dict[str, tuple[bytes, float]] = {}

            async def silent(name: str, address: Address) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    start = trio.current_time()
                    answer = await read_until_closed(stream)
                    results[name] = answer, trio.current_time() - start

            async def chatty(name: str, address: Address) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    start = trio.current_time()
                    await stream.send_all(HTTP_REQUEST)
                    answer = await read_until_closed(stream)  # up to the half-close
                    with pytest.raises(trio.BrokenResourceError):
                        while True:  # the server reads (and drops) this until the deadline
                            await stream.send_all(b"more")
                            await trio.sleep(0.02)
                    results[name] = answer, trio.current_time() - start

            async with trio.open_nursery() as nursery:
                nursery.start_soon(silent, "http-silent", http)
                nursery.start_soon(silent, "grpc-silent", grpc_address)
                nursery.start_soon(chatty, "http-chatty", http)
            for holder in holders:
                await holder.aclose()
    assert results["http-silent"][0] == b""
    assert results["grpc-silent"][0].endswith(b"too many connections")  # the GOAWAY
    assert results["http-chatty"][0].startswith(HTTP_503)
    for answer, took in results.values():
        # held until the deadline (the peer did not leave), and not (much) longer
        assert REFUSAL_TIMEOUT * 0.8 <= took < REFUSAL_TIMEOUT + 2, (answer, took)


# -- hostile HTTP/2 on a refused connection -------------------------------------------------------


def split_frames(data: bytes) -> list[Frame]:
    """The HTTP/2 frames in ``data`` (the server's side of a connection)."""
    frames = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def hostile_client(behaviour: str) -> bytes:
    """What a misbehaving HTTP/2 client sends on a connection the server refuses."""
    if behaviour == "garbage":  # the preface, then a SETTINGS frame of 5 bytes
        return (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + bytes(5)
        )
    client = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/ingest")]
    headers += [(":authority", "x"), ("content-type", "application/grpc")]
    if behaviour == "zero-window":  # the answer's body can never be sent
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send_headers(1, headers, end_stream=behaviour == "zero-window")
    if behaviour == "cancelled":
        client.reset_stream(1)
    elif behaviour == "goaway":
        client.send_data(1, b"x" * 10)
        client.close_connection()
    return client.data_to_send()


@pytest.mark.parametrize("behaviour", ["garbage", "cancelled", "goaway", "zero-window"])
async def test_hostile_http2_on_a_refused_connection_is_closed_and_harms_nothing(
    behaviour: str,
) -> None:
    """Bytes that are not HTTP/2, a call cancelled at once, the client's own GOAWAY, a zero
    flow-control window: on both HTTP/2 listeners the refused connection ends with a GOAWAY
    within the refusal deadline, counted as too_many_connections and nothing else (no
    internal_error); the held connections are untouched."""
    with trio.fail_after(WAIT):
        async with limited(HttpSource(max_connections=1), GrpcSource(max_connections=1)) as (
            handle,
            _,
        ):
            addresses = [handle.address(0), handle.address(1)]
            holders = [await trio.open_tcp_stream(*address) for address in addresses]
            for index in (0, 1):
                await wait_until(lambda i=index: counters(handle, i).connections_active == 1)
            goaways: list[GoAwayFrame] = []

            async def peer(address: Address) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    await stream.send_all(hostile_client(behaviour))
                    answer = await read_until_closed(stream)
                goaways.extend(f for f in split_frames(answer) if isinstance(f, GoAwayFrame))

            async with trio.open_nursery() as nursery:
                for address in addresses:
                    nursery.start_soon(peer, address)
            for index in (0, 1):
                assert counters(handle, index).connections_active == 1
            for holder in holders:
                await holder.aclose()
    assert len(goaways) == 2
    for goaway in goaways:
        if behaviour == "garbage":
            assert goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
        else:
            assert goaway.error_code == 0 and goaway.additional_data == b"too many connections"
    assert handle.ledger.rejected == {"too_many_connections": 2}


# -- every stream listener: refused, counted, and the others served ---------------------------

LIMITED: dict[str, Callable[[int], Source]] = {
    "tcp": lambda n: TcpSource(max_connections=n),
    "http": lambda n: HttpSource(max_connections=n),
    "websocket": lambda n: WebSocketSource(max_connections=n),
    "grpc": lambda n: GrpcSource(max_connections=n),
}
GOOD: dict[str, Callable[[], Good]] = {
    "tcp": lambda: good_tcp("newline"),
    "http": good_http,
    "websocket": good_ws,
    "grpc": good_grpc,
}


def goaway_before_any_call(answer: bytes) -> bool:
    """The server's SETTINGS, then a GOAWAY that refuses every stream (last stream 0, no
    error) saying why, and nothing else."""
    frames = split_frames(answer)
    goaways = [frame for frame in frames if isinstance(frame, GoAwayFrame)]
    return len(goaways) == 1 and (
        goaways[0].last_stream_id,
        goaways[0].error_code,
        goaways[0].additional_data,
    ) == (0, 0, b"too many connections")


# What a connection past the limit that sends nothing gets (real clients: the tests above).
REFUSED: dict[str, Callable[[bytes], bool]] = {
    "tcp": lambda answer: answer == b"",  # no protocol to answer in
    "http": lambda answer: answer == b"",  # no request, nothing to answer
    "websocket": lambda answer: answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"),
    "grpc": goaway_before_any_call,
}


@pytest.mark.parametrize("transport", list(LIMITED))
async def test_connections_past_the_limit_are_refused_and_the_others_served(
    transport: str,
) -> None:
    """Fill every slot, knock once more (answered where the protocol can, closed, counted),
    then free one slot: a well-behaved client is served, and the connections that held slots
    were never touched."""
    slots = 3
    sink = RecordingSink()
    gateway = Gateway(sources=[LIMITED[transport](slots)], sink=sink, grace_period=0.5)
    good = GOOD[transport]()
    with trio.fail_after(20):
        async with open_gateway(gateway) as handle:
            address = handle.address()
            holders = [await trio.open_tcp_stream(*address) for _ in range(slots)]
            counters = gateway.source_counters[0]
            await wait_until(lambda: counters.connections_active == slots)
            for _ in range(2):
                extra = await trio.open_tcp_stream(*address)
                await extra.send_eof()  # says nothing: answered where the protocol can, closed
                assert REFUSED[transport](await read_until_closed(extra))
                await extra.aclose()
            assert counters.rejected["too_many_connections"] == 2
            assert counters.connections_active == slots
            await holders.pop().aclose()
            await wait_until(lambda: counters.connections_active == slots - 1)
            await good.send(address)
            await sink.wait_for(len(good.payloads))
            for holder in holders:
                await holder.aclose()
    assert sorted(sink.payloads) == sorted(good.payloads)


EVICT_AFTER = 0.5


@pytest.mark.parametrize("transport", list(LIMITED))
async def test_at_the_limit_the_longest_silent_connection_makes_room(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lockout: every slot is held by a connection that sends nothing; once they have been
    silent ``EVICT_AFTER`` seconds, a newcomer takes the slot of the longest-silent one (closed,
    counted ``evicted``) and a well-behaved client is served at once, not after the idle
    timeout."""
    monkeypatch.setattr(sources_base, "EVICT_AFTER", EVICT_AFTER)
    slots = 3
    sink = RecordingSink()
    gateway = Gateway(sources=[LIMITED[transport](slots)], sink=sink, grace_period=0.5)
    good = GOOD[transport]()
    with trio.fail_after(20):
        async with open_gateway(gateway) as handle:
            address = handle.address()
            holders = []
            for _ in range(slots):
                holders.append(await trio.open_tcp_stream(*address))
                await trio.sleep(0.05)  # so that "longest silent" is the first
            counters = gateway.source_counters[0]
            await wait_until(lambda: counters.connections_active == slots)
            await trio.sleep(EVICT_AFTER)
            await good.send(address)
            await sink.wait_for(len(good.payloads))
            assert counters.rejected["evicted"] >= 1
            assert counters.rejected["too_many_connections"] == 0
            with trio.fail_after(5):  # the longest-silent holder is closed (gRPC: after its
                await read_until_closed(holders[0])  # preface; the others: with nothing)
            for holder in holders:
                await holder.aclose()
    assert sorted(sink.payloads) == sorted(good.payloads)


async def test_at_the_limit_a_connection_that_never_spoke_makes_room_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that has sent nothing since it connected gives its slot up once it has been
    mute ``EVICT_MUTE_AFTER`` seconds, without waiting ``EVICT_AFTER``: a flood of idle
    connections cannot get newcomers refused for its first seconds. A connection that has
    spoken keeps its slot, however long ago."""
    monkeypatch.setattr(sources_base, "EVICT_AFTER", 60.0)
    slots = 3
    sink = RecordingSink()
    gateway = Gateway(sources=[TcpSource(max_connections=slots)], sink=sink, grace_period=0.5)
    good = GOOD["tcp"]()
    with trio.fail_after(WAIT):
        async with open_gateway(gateway) as handle:
            address = handle.address()
            spoken = await trio.open_tcp_stream(*address)
            await spoken.send_all(b"spoke\n")
            await sink.wait_for(1)
            mute = []
            for _ in range(slots - 1):
                mute.append(await trio.open_tcp_stream(*address))
                await trio.sleep(0.05)  # so that "mute for longest" is the first
            counters = gateway.source_counters[0]
            await wait_until(lambda: counters.connections_active == slots)
            await trio.sleep(sources_base.EVICT_MUTE_AFTER)
            await good.send(address)
            await sink.wait_for(1 + len(good.payloads))
            assert counters.rejected["evicted"] == 1
            assert counters.rejected["too_many_connections"] == 0
            assert await read_until_closed(mute[0]) == b""  # the first mute one went
            await spoken.send_all(b"still here\n")
            await sink.wait_for(2 + len(good.payloads))
            for stream in [spoken, *mute]:
                await stream.aclose()
    assert sorted(sink.payloads) == sorted([b"spoke", b"still here", *good.payloads])


async def test_in_a_flood_at_the_limit_a_client_that_spoke_goes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood arrives at once while every slot is held: the listener takes it whole, the
    client whose request is there goes first (the slot of a mute holder), and the flood's
    idle connections wait for their first bytes, then are refused without evicting anyone."""
    monkeypatch.setattr(sources_base, "EVICT_AFTER", 60.0)
    slots, flood = 4, 50
    sink = RecordingSink()
    gateway = Gateway(sources=[TcpSource(max_connections=slots)], sink=sink, grace_period=0.5)
    with trio.fail_after(WAIT):
        async with open_gateway(gateway) as handle:
            address = handle.address()
            holders = [await trio.open_tcp_stream(*address) for _ in range(slots)]
            counters = gateway.source_counters[0]
            await wait_until(lambda: counters.connections_active == slots)
            await trio.sleep(sources_base.EVICT_MUTE_AFTER)
            # No await from here to the good client's request: the gateway sees it all at once.
            idle = [socket.create_connection(address) for _ in range(flood)]
            good = socket.create_connection(address)
            good.sendall(b"first in\n")
            await sink.wait_for(1)
            await wait_until(lambda: counters.rejected["too_many_connections"] == flood)
            assert counters.rejected["evicted"] == 1
            assert counters.connections_active == slots
            for sock in [*idle, good]:
                sock.close()
            for holder in holders:
                await holder.aclose()
    assert sink.payloads == [b"first in"]
