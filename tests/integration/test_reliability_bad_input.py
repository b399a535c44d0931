"""Bad input on every listener: a clear refusal, counted, and other clients' traffic intact.

Each case runs one misbehaving client against a real listener on port 0 while a well-behaved
client (a real third-party client where there is one: httpx, trio-websocket, grpcio) sends its
own messages on the same listener. Every case asserts three things:

1. the misbehaving client gets a clear answer (a status, a close code, a GOAWAY, or the
   connection closed at once, as the transport allows);
2. the refusal is counted under its reason in the listener's ``rejected`` counters;
3. every message of the well-behaved client arrives exactly once.

Timeouts are short here (``IDLE`` seconds) so the idle and slowloris cases take about a second;
the slowloris clients send one byte every ``TRICKLE`` seconds, well inside the idle timeout, so
only a deadline on the whole message (not on each read) can stop them.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
from trio_websocket import open_websocket_url
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from trio_gateway import Gateway
from trio_gateway._proto import gateway_pb2
from trio_gateway.codecs import encode_length_prefixed, encode_newline
from trio_gateway.sources import (
    GrpcSource,
    HttpSource,
    Source,
    TcpSource,
    UdpSource,
    WebSocketSource,
)
from trio_gateway.testing import RecordingSink, open_gateway

IDLE = 0.8
"""Idle timeout (and WebSocket handshake timeout) of every listener in these tests."""
TRICKLE = 0.1
"""Seconds between the bytes a slowloris client sends (8 bytes per idle period)."""
LIMIT = 1000
"""max_message_size of every listener in these tests."""
WAIT = 5.0
"""How long a client waits for the server's answer before the test fails."""
Address = tuple[str, int]

# -- plumbing ----------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a counter that has no event to wait on."""
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.01)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends until it closes (EOF or reset); fails if it never does."""
    received = bytearray()
    with trio.fail_after(WAIT):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # a reset is a close too
    return bytes(received)


async def trickle(stream: trio.abc.Stream, data: bytes) -> float:
    """Send ``data`` one byte at a time (slowloris) until the server hangs up.

    Returns how long the server put up with it.
    """
    started = trio.current_time()
    try:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.sleep(TRICKLE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return trio.current_time() - started


def noise(size: int, seed: int) -> bytes:
    """Deterministic random bytes."""
    return random.Random(seed).randbytes(size)


@dataclass
class Good:
    """A well-behaved client: ``send(address)`` sends ``payloads`` and checks each was taken."""

    payloads: list[bytes]
    send: Callable[[Address], Awaitable[None]]


Bad = Callable[[Address], Awaitable[None]]


async def check_case(source: Source, bad: Bad, good: Good, reason: str) -> None:
    """Run ``bad`` and ``good`` at once against ``source``; check refusal, count, delivery."""
    sink = RecordingSink()
    gateway = Gateway(sources=[source], sink=sink, grace_period=0.5)
    with trio.fail_after(20):
        async with open_gateway(gateway) as handle:
            address = handle.address()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bad, address)
                await trio.sleep(0.05)  # the bad client is connected and misbehaving
                await good.send(address)
            await wait_until(lambda: gateway.source_counters[0].rejected[reason] >= 1)
            await sink.wait_for(len(good.payloads))
    counts = Counter(sink.payloads)
    assert all(counts[p] == 1 for p in good.payloads), "a good client's message was lost"
    assert handle.ledger.balanced
    assert gateway.source_counters[0].rejected[reason] == 1, dict(
        gateway.source_counters[0].rejected
    )


# -- well-behaved clients ------------------------------------------------------------------------


def good_tcp(framing: str) -> Good:
    payloads = [b"good-tcp-%04d" % i for i in range(300)]
    encoded = encode_newline(payloads) if framing == "newline" else encode_length_prefixed(payloads)

    async def send(address: Address) -> None:
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(encoded)
            await stream.send_eof()
            assert await read_until_closed(stream) == b""

    return Good(payloads, send)


def good_udp() -> Good:
    payloads = [b"good-udp-%04d" % i for i in range(50)]

    async def send(address: Address) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            for payload in payloads:
                await sock.sendto(payload, address)

    return Good(payloads, send)


def good_http() -> Good:
    payloads = [b"good-http-%04d" % i for i in range(40)]

    async def send(address: Address) -> None:
        async with httpx.AsyncClient(base_url=f"http://{address[0]}:{address[1]}") as client:
            for payload in payloads:
                reply = await client.post("/ingest", content=payload)
                assert reply.status_code == 202, reply.text

    return Good(payloads, send)


def good_ws() -> Good:
    payloads = [b"good-ws-%04d" % i for i in range(200)]

    async def send(address: Address) -> None:
        async with open_websocket_url(f"ws://{address[0]}:{address[1]}/") as ws:
            for payload in payloads:
                await ws.send_message(payload)

    return Good(payloads, send)


def good_grpc() -> Good:
    payloads = [b"good-grpc-%04d" % i for i in range(30)]

    def unary_calls(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            send = channel.unary_unary(
                "/trio_gateway.v1.Gateway/Send",
                request_serializer=gateway_pb2.Message.SerializeToString,
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            for i, payload in enumerate(payloads):
                assert send(gateway_pb2.Message(payload=payload, sequence=i), timeout=5).accepted

    async def send(address: Address) -> None:
        await trio.to_thread.run_sync(unary_calls, address[1])

    return Good(payloads, send)


# -- TCP -----------------------------------------------------------------------------------------


def tcp_source(framing: str, **options: Any) -> TcpSource:
    return TcpSource(framing=framing, idle_timeout=IDLE, max_message_size=LIMIT, **options)


async def tcp_random_bytes_length(address: Address) -> None:
    # Random bytes read as a length prefix announce ~3.7 GB: refused before buffering.
    data = b"\xde\xad\xbe\xef" + noise(4000, 1)
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(data)
        await read_until_closed(stream)


async def tcp_oversize(address: Address, framing: str) -> None:
    data = (
        b"x" * (LIMIT + 1) + b"\n"
        if framing == "newline"
        else encode_length_prefixed([b"x" * (LIMIT + 1)])
    )
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(data)
        await read_until_closed(stream)


async def tcp_truncated(address: Address) -> None:
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(struct.pack(">I", 100) + b"only ten b")
        await stream.send_eof()
        await read_until_closed(stream)


async def tcp_idle(address: Address) -> None:
    async with await trio.open_tcp_stream(*address) as stream:
        started = trio.current_time()
        await read_until_closed(stream)
        assert IDLE * 0.9 <= trio.current_time() - started < IDLE + 2


async def tcp_slowloris(address: Address, framing: str) -> None:
    frame = b"s" * 60 + b"\n" if framing == "newline" else encode_length_prefixed([b"s" * 60])
    async with await trio.open_tcp_stream(*address) as stream:
        lasted = await trickle(stream, frame)
        assert lasted < IDLE + 1.5, "the slow frame was not cut off"


TCP_CASES = [
    ("length", "random-bytes", tcp_random_bytes_length, "oversize"),
    ("newline", "oversize", lambda a: tcp_oversize(a, "newline"), "oversize"),
    ("length", "oversize", lambda a: tcp_oversize(a, "length"), "oversize"),
    ("length", "truncated", tcp_truncated, "truncated"),
    ("newline", "idle", tcp_idle, "idle_timeout"),
    ("length", "idle", tcp_idle, "idle_timeout"),
    ("newline", "slowloris", lambda a: tcp_slowloris(a, "newline"), "too_slow"),
    ("length", "slowloris", lambda a: tcp_slowloris(a, "length"), "too_slow"),
]


@pytest.mark.parametrize(
    ("framing", "bad", "reason"),
    [(f, b, r) for f, _, b, r in TCP_CASES],
    ids=[f"{f}-{name}" for f, name, _, _ in TCP_CASES],
)
async def test_tcp(framing: str, bad: Bad, reason: str) -> None:
    await check_case(tcp_source(framing), bad, good_tcp(framing), reason)


async def test_tcp_newline_random_bytes_are_messages_not_errors() -> None:
    """Newline framing carries any bytes: random input is split into messages and delivered."""
    data = noise(5000, 2).replace(b"\n", b"")[:900] + b"\n"
    sink = RecordingSink()
    async with open_gateway(Gateway(sources=[tcp_source("newline")], sink=sink)) as handle:
        async with await trio.open_tcp_stream(*handle.address()) as stream:
            await stream.send_all(data)
        with trio.fail_after(5):
            await sink.wait_for(1)
    assert sink.payloads == [data[:-1]]


async def test_tcp_slow_but_whole_frames_are_not_cut_off() -> None:
    """The slowloris deadline is per frame: a client sending whole frames slowly stays."""
    sink = RecordingSink()
    source = tcp_source("newline")
    async with open_gateway(Gateway(sources=[source], sink=sink)) as handle:
        async with await trio.open_tcp_stream(*handle.address()) as stream:
            for i in range(4):  # 4 x 0.4 s = 1.6 s, twice the idle timeout
                await stream.send_all(b"slow %d\n" % i)
                await trio.sleep(IDLE / 2)
            await stream.send_eof()
            await read_until_closed(stream)
        with trio.fail_after(5):
            await sink.wait_for(4)
    assert handle.ledger.rejected == {}


# -- UDP -----------------------------------------------------------------------------------------


async def udp_oversize(address: Address) -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.sendto(b"u" * (LIMIT + 1), address)  # UDP has no answer: counted, dropped


async def test_udp_oversize_is_dropped_and_counted() -> None:
    await check_case(UdpSource(max_message_size=LIMIT), udp_oversize, good_udp(), "oversize")


# -- HTTP ----------------------------------------------------------------------------------------


def http_source(**options: Any) -> HttpSource:
    return HttpSource(idle_timeout=IDLE, max_message_size=LIMIT, **options)


def http_status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:100]
    return int(reply[9:12])


async def http_exchange(address: Address, request: bytes, *, eof: bool = False) -> bytes:
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(request)
        if eof:
            await stream.send_eof()
        return await read_until_closed(stream)


def http_expect(request: bytes, status: int, *, eof: bool = False) -> Bad:
    async def bad(address: Address) -> None:
        reply = await http_exchange(address, request, eof=eof)
        assert http_status(reply) == status, reply

    return bad


async def http_idle(address: Address) -> None:
    assert await http_exchange(address, b"") == b""


async def http_slowloris(address: Address) -> None:
    head = b"POST /ingest HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\n\r\nhello"
    async with await trio.open_tcp_stream(*address) as stream:
        reply = bytearray()

        async def read() -> None:
            reply.extend(await read_until_closed(stream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            lasted = await trickle(stream, head)
        assert lasted < IDLE + 1.5
        assert http_status(bytes(reply)) == 408


async def http_slow_body(address: Address) -> None:
    head = b"POST /ingest HTTP/1.1\r\nHost: gateway\r\nContent-Length: 200\r\n\r\n"
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(head)
        reply = bytearray()

        async def read() -> None:
            reply.extend(await read_until_closed(stream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            lasted = await trickle(stream, b"b" * 200)
        assert lasted < IDLE + 1.5
        assert http_status(bytes(reply)) == 408


POST = b"POST /ingest HTTP/1.1\r\nHost: gateway\r\n"
HTTP_CASES = [
    ("random-bytes", http_expect(b"\x01" + noise(3000, 3), 400), "malformed"),
    (
        "content-length-and-transfer-encoding",
        http_expect(
            POST
            + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        "malformed",
    ),
    (
        "conflicting-content-lengths",
        http_expect(POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
        "malformed",
    ),
    (
        "truncated-body",
        http_expect(POST + b"Content-Length: 100\r\n\r\nonly ten b", 400, eof=True),
        "malformed",
    ),
    (
        "oversize-by-content-length",
        http_expect(POST + b"Content-Length: %d\r\n\r\n" % (LIMIT + 1), 413),
        "oversize",
    ),
    (
        "oversize-chunked",
        http_expect(
            POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (LIMIT + 1) + b"c" * (LIMIT + 1),
            413,
        ),
        "oversize",
    ),
    (
        "head-over-the-header-limit",
        http_expect(POST + b"X-Big: " + b"h" * 20_000, 431),
        "malformed",
    ),
    ("idle", http_idle, "idle_timeout"),
    ("slowloris-head", http_slowloris, "too_slow"),
    ("slow-body", http_slow_body, "too_slow"),
]


@pytest.mark.parametrize(
    ("bad", "reason"), [(b, r) for _, b, r in HTTP_CASES], ids=[n for n, _, _ in HTTP_CASES]
)
async def test_http(bad: Bad, reason: str) -> None:
    await check_case(http_source(), bad, good_http(), reason)


# -- WebSocket -----------------------------------------------------------------------------------


def ws_source(**options: Any) -> WebSocketSource:
    return WebSocketSource(
        idle_timeout=IDLE, handshake_timeout=IDLE, max_message_size=LIMIT, **options
    )


class RawWebSocket:
    """A WebSocket client from the ``websockets`` Sans-I/O layer over a raw trio stream, so a
    test can send frames no polite client would."""

    def __init__(self, stream: trio.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol

    @classmethod
    async def connect(cls, address: Address) -> RawWebSocket:
        protocol = ClientProtocol(parse_uri(f"ws://{address[0]}:{address[1]}/"))
        protocol.send_request(protocol.connect())
        stream = await trio.open_tcp_stream(*address)
        self = cls(stream, protocol)
        await self.flush()
        with trio.fail_after(5):
            while not any(isinstance(e, Response) for e in await self.receive()):
                pass
        return self

    async def flush(self) -> None:
        await self.stream.send_all(b"".join(self.protocol.data_to_send()))

    async def receive(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        return self.protocol.events_received()

    async def close_code(self) -> int:
        """Read until the server closes; the code of its close frame (1006 if it sent none)."""
        with trio.fail_after(WAIT):
            try:
                while data := await self.stream.receive_some(65536):
                    self.protocol.receive_data(data)
            except trio.BrokenResourceError:
                pass
        await self.stream.aclose()
        close = self.protocol.close_rcvd
        return 1006 if close is None else close.code


def ws_frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame, serialized by websockets' own frame code."""
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


def ws_expect(send: bytes, code: int, *, eof: bool = False) -> Bad:
    async def bad(address: Address) -> None:
        ws = await RawWebSocket.connect(address)
        await ws.stream.send_all(send)
        if eof:
            await ws.stream.send_eof()
        assert await ws.close_code() == code

    return bad


async def ws_random_handshake(address: Address) -> None:
    reply = await http_exchange(address, b"\x01" + noise(2000, 4) + b"\r\n\r\n")
    assert http_status(reply) == 400


async def ws_idle_before_handshake(address: Address) -> None:
    assert await http_exchange(address, b"") == b""


async def ws_slowloris_handshake(address: Address) -> None:
    protocol = ClientProtocol(parse_uri(f"ws://{address[0]}:{address[1]}/"))
    protocol.send_request(protocol.connect())
    async with await trio.open_tcp_stream(*address) as stream:
        lasted = await trickle(stream, b"".join(protocol.data_to_send()))
        assert lasted < IDLE + 1.5


async def ws_slowloris_frame(address: Address) -> None:
    ws = await RawWebSocket.connect(address)
    lasted = await trickle(ws.stream, ws_frame(Opcode.BINARY, b"w" * 60))
    assert lasted < IDLE + 1.5
    assert await ws.close_code() == 1008


async def ws_garbage_behind_the_handshake(address: Address) -> None:
    """A valid request with a broken frame right behind it (found by the fuzz test: it used to
    trip an assertion in websockets and take the whole gateway down)."""
    protocol = ClientProtocol(parse_uri(f"ws://{address[0]}:{address[1]}/"))
    protocol.send_request(protocol.connect())
    request = b"".join(protocol.data_to_send())
    assert http_status(await http_exchange(address, request + b"\x8f\x00")) == 400


WS_CASES = [
    ("random-bytes-as-handshake", ws_random_handshake, "malformed"),
    ("garbage-behind-the-handshake", ws_garbage_behind_the_handshake, "malformed"),
    ("random-bytes-as-frames", ws_expect(b"\x0f" + noise(2000, 5), 1002), "malformed"),
    (
        "unmasked-client-frame",
        ws_expect(Frame(Opcode.BINARY, b"x").serialize(mask=False, extensions=[]), 1002),
        "malformed",
    ),
    ("oversize", ws_expect(ws_frame(Opcode.BINARY, b"o" * (LIMIT + 1)), 1009), "oversize"),
    (
        "oversize-in-fragments",
        ws_expect(
            ws_frame(Opcode.BINARY, b"f" * 600, fin=False) + ws_frame(Opcode.CONT, b"f" * 600),
            1009,
        ),
        "oversize",
    ),
    ("invalid-utf8-text", ws_expect(ws_frame(Opcode.TEXT, b"bad \xc3("), 1007), "malformed"),
    (
        "truncated-frame",
        ws_expect(ws_frame(Opcode.BINARY, b"t" * 100)[:20], 1006, eof=True),
        "truncated",
    ),
    ("idle-before-handshake", ws_idle_before_handshake, "idle_timeout"),
    ("idle-after-handshake", ws_expect(b"", 1001), "idle_timeout"),
    ("slowloris-handshake", ws_slowloris_handshake, "too_slow"),
    ("slowloris-frame", ws_slowloris_frame, "too_slow"),
]


@pytest.mark.parametrize(
    ("bad", "reason"), [(b, r) for _, b, r in WS_CASES], ids=[n for n, _, _ in WS_CASES]
)
async def test_websocket(bad: Bad, reason: str) -> None:
    await check_case(ws_source(), bad, good_ws(), reason)


# -- gRPC ----------------------------------------------------------------------------------------

GATEWAY = "/trio_gateway.v1.Gateway/"


def grpc_source(**options: Any) -> GrpcSource:
    return GrpcSource(idle_timeout=IDLE, max_message_size=LIMIT, **options)


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


class RawH2:
    """An HTTP/2 client connection from ``h2`` over a raw trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.initiate_connection()

    @classmethod
    async def connect(cls, address: Address) -> RawH2:
        return cls(await trio.open_tcp_stream(*address))

    def start_call(self, method: str) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", GATEWAY + method),
                (":authority", "gateway"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        return stream_id

    def pending(self) -> bytes:
        return self.h2.data_to_send()

    async def flush(self) -> None:
        await self.stream.send_all(self.pending())

    async def events_until_closed(self) -> list[h2.events.Event]:
        events: list[h2.events.Event] = []
        with trio.fail_after(WAIT):
            try:
                while data := await self.stream.receive_some(65536):
                    events.extend(self.h2.receive_data(data))
                    await self.stream.send_all(self.pending())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.stream.aclose()
        return events

    async def trailers(self, stream_id: int) -> dict[str, str]:
        with trio.fail_after(WAIT):
            while True:
                data = await self.stream.receive_some(65536)
                assert data, "closed before the call's trailers"
                for event in self.h2.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        headers = dict(event.headers)
                        if event.stream_id == stream_id and "grpc-status" in headers:
                            return headers
                await self.stream.send_all(self.pending())


def goaway(events: list[h2.events.Event]) -> h2.events.ConnectionTerminated:
    ends = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ends, f"no GOAWAY in {events}"
    return ends[-1]


async def grpc_random_bytes(address: Address) -> None:
    """Random bytes where the HTTP/2 preface belongs: GOAWAY(PROTOCOL_ERROR) at once."""
    client = await RawH2.connect(address)
    await client.stream.send_all(noise(2000, 6))
    end = goaway(await client.events_until_closed())
    assert end.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def grpc_random_frames(address: Address) -> None:
    """A valid preface, then random bytes: the first random frame header announces a frame
    over the 1 MiB SETTINGS_MAX_FRAME_SIZE, refused from its header at once."""
    client = await RawH2.connect(address)
    await client.stream.send_all(client.pending() + noise(2000, 6))
    end = goaway(await client.events_until_closed())
    assert end.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


async def grpc_overlong_frame(address: Address) -> None:
    """A frame header announcing 16 MiB, then its body: refused from the header (over the 1 MiB
    SETTINGS_MAX_FRAME_SIZE), so none of the body is buffered."""
    client = await RawH2.connect(address)
    # length 0xFFFFFF (16 MiB - 1), type DATA, no flags, stream 1
    header = b"\xff\xff\xff\x00\x00\x00\x00\x00\x01"
    await client.stream.send_all(client.pending() + header)
    try:
        for _ in range(12):  # 3 MiB: past the 1 MiB frame limit
            await client.stream.send_all(b"\x00" * (256 * 1024))
    except trio.BrokenResourceError:
        pass
    end = goaway(await client.events_until_closed())
    assert end.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


async def grpc_truncated(address: Address) -> None:
    client = await RawH2.connect(address)
    call = client.start_call("Stream")
    client.h2.send_data(call, grpc_message(VALID) + grpc_message(b"t" * 100)[:20], end_stream=True)
    await client.flush()
    trailers = await client.trailers(call)
    assert trailers["grpc-status"] == "13", trailers  # INTERNAL, as grpc-java and grpc-go answer
    await client.stream.aclose()


async def grpc_idle(address: Address) -> None:
    client = await RawH2.connect(address)
    await client.flush()
    assert goaway(await client.events_until_closed()).error_code == h2.errors.ErrorCodes.NO_ERROR


async def grpc_slowloris_data(address: Address) -> None:
    client = await RawH2.connect(address)
    call = client.start_call("Stream")
    await client.flush()
    client.h2.send_data(call, grpc_message(b"s" * 60))
    frame = client.pending()
    lasted = await trickle(client.stream, frame)
    assert lasted < IDLE + 1.5
    end = goaway(await client.events_until_closed())
    assert end.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def grpc_slowloris_headers(address: Address) -> None:
    client = await RawH2.connect(address)
    client.start_call("Send")
    lasted = await trickle(client.stream, client.pending())
    assert lasted < IDLE + 1.5


def grpc_call_expecting(method: str, requests: list[bytes], code: grpc.StatusCode) -> Bad:
    """A grpcio call with raw (possibly invalid) request bytes; asserts the status code."""

    def call(port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            options: dict[str, Any] = {"request_serializer": bytes}
            try:
                if method == "Send":
                    channel.unary_unary(GATEWAY + method, **options)(requests[0], timeout=5)
                elif method == "Stream":
                    channel.stream_unary(GATEWAY + method, **options)(iter(requests), timeout=5)
                else:
                    list(
                        channel.stream_stream(GATEWAY + method, **options)(
                            iter(requests), timeout=5
                        )
                    )
            except grpc.RpcError as exc:
                assert exc.code() == code, exc
            else:
                raise AssertionError("the call succeeded")

    async def bad(address: Address) -> None:
        await trio.to_thread.run_sync(call, address[1])

    return bad


VALID = gateway_pb2.Message(payload=b"valid", sequence=1).SerializeToString()
BROKEN = b"\xff\xff"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GRPC_CASES = [
    ("random-bytes", grpc_random_bytes, "malformed"),
    ("random-frames", grpc_random_frames, "oversize"),
    ("overlong-frame", grpc_overlong_frame, "oversize"),
    ("invalid-protobuf-unary", grpc_call_expecting("Send", [BROKEN], INVALID), "malformed"),
    (
        "invalid-protobuf-client-stream",
        grpc_call_expecting("Stream", [VALID, BROKEN], INVALID),
        "malformed",
    ),
    (
        "invalid-protobuf-bidi",
        grpc_call_expecting("StreamAcked", [VALID, BROKEN], INVALID),
        "malformed",
    ),
    (
        "oversize",
        grpc_call_expecting(
            "Send",
            [gateway_pb2.Message(payload=b"o" * LIMIT).SerializeToString()],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        "oversize",
    ),
    ("truncated-message", grpc_truncated, "truncated"),
    ("idle", grpc_idle, "idle_timeout"),
    ("slowloris-headers", grpc_slowloris_headers, "too_slow"),
    ("slowloris-data", grpc_slowloris_data, "too_slow"),
]


@pytest.mark.parametrize(
    ("bad", "reason"), [(b, r) for _, b, r in GRPC_CASES], ids=[n for n, _, _ in GRPC_CASES]
)
async def test_grpc(bad: Bad, reason: str) -> None:
    await check_case(grpc_source(), bad, good_grpc(), reason)


# -- a handler that fails ------------------------------------------------------------------------


async def test_a_failing_connection_handler_ends_only_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The safety net in serve_connections: a handler that raises (a bug, or a library tripped
    up by a peer) ends that connection, is counted as internal_error and logged; the gateway
    and the other clients go on."""
    real = WebSocketSource._refusal

    def refusal(self: WebSocketSource, request: Any) -> tuple[int, str] | None:
        if request.path == "/explode":
            raise RuntimeError("a bug in the handshake")
        return real(self, request)

    monkeypatch.setattr(WebSocketSource, "_refusal", refusal)

    async def bad(address: Address) -> None:
        protocol = ClientProtocol(parse_uri(f"ws://{address[0]}:{address[1]}/explode"))
        protocol.send_request(protocol.connect())
        assert await http_exchange(address, b"".join(protocol.data_to_send())) == b""

    await check_case(ws_source(), bad, good_ws(), "internal_error")
