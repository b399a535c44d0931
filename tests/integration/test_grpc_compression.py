"""Compressed gRPC requests (grpc-encoding gzip and deflate): grpcio clients end to end, and a
raw HTTP/2 client for what grpcio does not send (bombs, corrupt streams, unknown encodings)."""

from __future__ import annotations

import gzip
import os
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
from grpclib.const import Cardinality, Handler
from test_grpc import GATEWAY, in_thread, serving, stream_stream, stream_unary, unary

from trio_gateway._errors import FrameTooLarge, ProtocolError
from trio_gateway._proto import gateway_pb2, model_pb2
from trio_gateway.sources.grpc import GrpcStream
from trio_gateway.sources.grpc._calls import inflate_message

GZIP = 16 + zlib.MAX_WBITS
DEFLATE = zlib.MAX_WBITS
ACCEPTED = "identity,deflate,gzip"


def deflate(data: bytes) -> bytes:
    """gRPC's "deflate": the zlib format (RFC 1950), as grpc-core writes it."""
    return zlib.compress(data)


def bomb(size: int, *, wbits: int = GZIP) -> bytes:
    """``size`` zero bytes (a multiple of 1 MiB) compressed, built without compressing them
    all: one 1 MiB block from a fresh raw deflate state, repeated, then the final block."""
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    count = size >> 20
    body = block * count + b"\x03\x00"  # a final, empty fixed-Huffman block
    if wbits == GZIP:
        crc = 0
        for _ in range(count):
            crc = zlib.crc32(chunk, crc)
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        return header + body + struct.pack("<II", crc, size & 0xFFFFFFFF)
    adler = 1
    for _ in range(count):
        adler = zlib.adler32(chunk, adler)
    return b"\x78\xda" + body + struct.pack(">I", adler)


def frame(message: bytes, *, compressed: bool = True) -> bytes:
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


def message(payload: bytes, sequence: int = 0) -> bytes:
    return gateway_pb2.Message(payload=payload, sequence=sequence).SerializeToString()


# -- inflate_message, without a socket ------------------------------------------------------


@pytest.mark.parametrize(("wbits", "compress"), [(GZIP, gzip.compress), (DEFLATE, deflate)])
def test_inflate_up_to_the_limit_and_not_a_byte_more(
    wbits: int, compress: Callable[[bytes], bytes]
) -> None:
    data = os.urandom(1000) + bytes(3000)
    assert inflate_message(compress(data), wbits, 4000) == data
    assert inflate_message(compress(data), wbits, 4001) == data
    with pytest.raises(FrameTooLarge):
        inflate_message(compress(data), wbits, 3999)
    assert inflate_message(compress(b""), wbits, 1) == b""


@pytest.mark.parametrize("wbits", [GZIP, DEFLATE])
def test_a_bomb_is_refused_at_the_limit_with_memory_bounded(wbits: int) -> None:
    compressed = bomb(1 << 30, wbits=wbits)  # 1 GiB of zeros in about 1 MiB
    assert len(compressed) < 1_100_000
    limit = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            inflate_message(compressed, wbits, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # zlib's output blocks joined into one bytes object (2x the limit at most), plus the
    # input left unconsumed; not the gigabyte
    assert peak < 2 * limit + len(compressed) + (256 << 10)
    # the same stream, inflated whole, is what the bomb claims to be
    assert len(zlib.decompressobj(wbits).decompress(bomb(4 << 20, wbits=wbits))) == 4 << 20


@pytest.mark.parametrize(("wbits", "compress"), [(GZIP, gzip.compress), (DEFLATE, deflate)])
def test_inflate_refuses_corrupt_truncated_and_trailing_data(
    wbits: int, compress: Callable[[bytes], bytes]
) -> None:
    good = compress(random.Random(1).randbytes(200) + b"hello " * 100)
    with pytest.raises(ProtocolError, match="corrupt"):
        inflate_message(good[:4] + b"\xff" * 20 + good[24:], wbits, 1 << 20)
    with pytest.raises(ProtocolError, match="truncated"):
        inflate_message(good[:-3], wbits, 1 << 20)
    with pytest.raises(ProtocolError, match="after the end"):
        inflate_message(good + b"junk", wbits, 1 << 20)
    with pytest.raises(ProtocolError):
        inflate_message(compress(b"x") if wbits == DEFLATE else deflate(b"x"), GZIP, 100)
    with pytest.raises(ProtocolError):
        inflate_message(b"", wbits, 100)


# -- grpcio ---------------------------------------------------------------------------------


PAYLOADS = [
    b"a" * 81920,  # compresses well: sent with the flag set
    os.urandom(3000),  # does not: grpc-core may send it plain on the same call
    b"",
    bytes(range(256)) * 40,
]


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
@pytest.mark.parametrize("per", ["channel", "call"])
async def test_grpcio_compressed_calls_arrive_byte_exact(
    algorithm: grpc.Compression, per: str
) -> None:
    stream_payloads = [b"s%d-" % i + b"z" * (i % 500) for i in range(500)]
    bidi_payloads = [b"b%d-" % i + b"q" * 2000 for i in range(50)]
    async with serving() as served:

        def call() -> tuple[list[bool], Any, list[int]]:
            on_channel = algorithm if per == "channel" else None
            on_call = {"compression": algorithm} if per == "call" else {}
            with grpc.insecure_channel(served.target, compression=on_channel) as channel:
                send = unary(channel, GATEWAY + "Send", gateway_pb2.Ack)
                sent = [
                    send(gateway_pb2.Message(payload=p), timeout=10, **on_call).accepted
                    for p in PAYLOADS
                ]
                stream = stream_unary(channel, GATEWAY + "Stream", gateway_pb2.Ack)
                ack = stream(
                    (gateway_pb2.Message(payload=p) for p in stream_payloads),
                    timeout=10,
                    **on_call,
                )
                bidi = stream_stream(channel, GATEWAY + "StreamAcked", gateway_pb2.Ack)
                acks = bidi(
                    (
                        gateway_pb2.Message(payload=p, sequence=i)
                        for i, p in enumerate(bidi_payloads)
                    ),
                    timeout=10,
                    **on_call,
                )
                return sent, ack, [a.sequence for a in acks if a.accepted]

        sent, ack, bidi_acked = await in_thread(call)
        assert sent == [True] * len(PAYLOADS)
        assert ack.accepted_count == len(stream_payloads) and ack.rejected_count == 0
        assert bidi_acked == list(range(len(bidi_payloads)))
        assert served.payloads() == PAYLOADS + stream_payloads + bidi_payloads
        assert served.ingress.counters.rejected == {}


# -- a raw HTTP/2 client --------------------------------------------------------------------


@dataclass
class Response:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: bool = False

    @property
    def status(self) -> int:
        fields = self.trailers or self.headers
        return int(fields["grpc-status"])


async def call_raw(
    port: int, path: str, body: bytes, *, encoding: str | None = "gzip", end: bool = True
) -> Response:
    """One call on a fresh connection: ``body`` (framed messages) in one DATA frame."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
    conn.increment_flow_control_window(1 << 24)
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", f"127.0.0.1:{port}"),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    conn.send_headers(1, headers)
    view = memoryview(body)
    while view:  # frames the server's SETTINGS would allow; 16 KiB before they arrive
        size = min(len(view), conn.max_outbound_frame_size, conn.local_flow_control_window(1))
        conn.send_data(1, view[:size].tobytes())
        view = view[size:]
        await stream.send_all(conn.data_to_send())
        if view and size == 0:
            await _pump(stream, conn, Response())
    if end:
        conn.end_stream(1)
    await stream.send_all(conn.data_to_send())
    response = Response()
    with trio.fail_after(10):
        while not await _pump(stream, conn, response):
            pass
    await stream.aclose()
    return response


async def _pump(
    stream: trio.SocketStream, conn: h2.connection.H2Connection, into: Response
) -> bool:
    """Read once and fold the events for stream 1 into ``into``; True once the call is over."""
    data = await stream.receive_some(65536)
    if not data:
        return True
    over = False
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            into.headers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.TrailersReceived):
            into.trailers = dict(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            into.data += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            over = True
        elif isinstance(event, h2.events.StreamReset):
            into.reset = over = True
    await stream.send_all(conn.data_to_send())
    return over


async def test_raw_gzip_and_deflate_calls_and_the_advertised_encodings() -> None:
    async with serving() as served:
        body = frame(gzip.compress(message(b"g" * 5000)))
        gz = await call_raw(served.port, GATEWAY + "Send", body)
        body = frame(deflate(message(b"d" * 5000)))
        df = await call_raw(served.port, GATEWAY + "Send", body, encoding="deflate")
        body = frame(message(b"plain"), compressed=False)
        plain = await call_raw(served.port, GATEWAY + "Send", body)
        identity = await call_raw(served.port, GATEWAY + "Send", body, encoding=None)
        for response in (gz, df, plain, identity):
            assert response.status == 0
            assert response.headers["grpc-accept-encoding"] == ACCEPTED
            assert "grpc-encoding" not in response.headers  # replies go uncompressed
            assert gateway_pb2.Ack.FromString(response.data[5:]).accepted
            assert response.data[0] == 0
        assert served.payloads() == [b"g" * 5000, b"d" * 5000, b"plain", b"plain"]


async def test_bomb_is_resource_exhausted_and_counted_oversize() -> None:
    async with serving() as served:
        compressed = bomb(1 << 30)  # under the 4 MiB framing limit, 1 GiB inflated
        body = frame(gzip.compress(message(b"first"))) + frame(compressed)
        tracemalloc.start()
        try:
            response = await call_raw(served.port, GATEWAY + "Stream", body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert response.status == 8  # RESOURCE_EXHAUSTED
        assert "inflates past the limit" in response.trailers.get(
            "grpc-message", response.headers.get("grpc-message", "")
        )
        # about 10 MiB measured: zlib's output (up to twice the 4 MiB limit while its blocks
        # are joined), the 1 MiB message and its copies in h2 and the decoder; not 1 GiB
        assert peak < 4 * (4 << 20)
        assert served.ingress.counters.rejected == {"oversize": 1}
        assert served.payloads() == [b"first"]  # the message before the bomb got in


async def test_corrupt_stream_is_internal_and_counted_malformed() -> None:
    async with serving() as served:
        good = gzip.compress(message(b"x" * 1000))
        corrupt = good[:12] + bytes(len(good) - 20) + good[-8:]
        response = await call_raw(served.port, GATEWAY + "Send", frame(corrupt))
        assert response.status == 13  # INTERNAL
        truncated = await call_raw(served.port, GATEWAY + "Send", frame(good[:-4]))
        assert truncated.status == 13
        wrong_format = await call_raw(
            served.port, GATEWAY + "Send", frame(good), encoding="deflate"
        )
        assert wrong_format.status == 13
        assert served.ingress.counters.rejected == {"malformed": 3}
        assert served.payloads() == []


async def test_unknown_encoding_is_unimplemented_with_the_accepted_ones() -> None:
    async with serving() as served:
        response = await call_raw(served.port, GATEWAY + "Send", frame(b"?"), encoding="br")
        assert response.status == 12  # UNIMPLEMENTED
        assert response.headers["grpc-accept-encoding"] == ACCEPTED
        assert "br" in response.headers["grpc-message"]
        assert ACCEPTED in response.headers["grpc-message"]
        assert served.payloads() == []


@pytest.mark.parametrize("encoding", [None, "identity"])
async def test_compressed_flag_without_an_encoding_is_internal(encoding: str | None) -> None:
    async with serving() as served:
        body = frame(gzip.compress(message(b"x")))
        response = await call_raw(served.port, GATEWAY + "Send", body, encoding=encoding)
        assert response.status == 13  # INTERNAL
        assert served.payloads() == []


class _Batches:
    """A client-streaming service that records the bytes of every batch it is handed."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.payloads: list[bytes] = []

    async def collect(self, stream: GrpcStream) -> None:
        while batch := await stream.recv_batch():
            self.sizes.append(sum(map(len, batch)))
            self.payloads.extend(batch)
        await stream.send_message(model_pb2.Empty())

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/test.Batches/Collect": Handler(
                self.collect, Cardinality.STREAM_UNARY, model_pb2.Request, model_pb2.Empty
            )
        }


async def test_a_batch_holds_about_a_window_of_inflated_bytes() -> None:
    """40 messages of 256 KiB that arrive compressed in one 12 KB frame are handed over in
    batches of about the stream window (1 MiB), not all 10 MiB at once."""
    batches = _Batches()
    piece = bytes(256 << 10)
    packed = gzip.compress(piece, mtime=0)  # one value: the header holds the time otherwise
    body = frame(packed, compressed=False)  # flag 0: plain, even on gzip calls
    body += b"".join(frame(packed) for _ in range(40))
    async with serving(services=[batches]) as served:
        response = await call_raw(served.port, "/test.Batches/Collect", body)
    assert response.status == 0
    assert batches.payloads == [packed] + [piece] * 40
    assert len(batches.sizes) >= 8
    assert max(batches.sizes) <= (1 << 20) + len(piece)
