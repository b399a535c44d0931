"""GrpcSource inside a real Gateway: grpclib's asyncio client end to end, graceful drain,
raw HTTP/2 behaviour (pings, idle timeout, bad bytes, connection limit), generated code."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import trio
from helpers import REPO, read_payloads, refuses_connections, wait_until

from trio_gateway._gateway import Gateway
from trio_gateway._proto import gateway_pb2
from trio_gateway.sinks import FileSink
from trio_gateway.sources.grpc import GrpcSource


@asynccontextmanager
async def gateway_with(source: GrpcSource, out: Path, **options: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(sources=[source], sink=FileSink(out), grace_period=2, **options)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            yield gateway
            gateway.shutdown()


async def test_grpclib_asyncio_client_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    source = GrpcSource()
    async with gateway_with(source, out):
        command = [sys.executable, "tests/grpc_clients/grpclib_client.py", str(source.bound[0][1])]
        done = await trio.run_process(command, cwd=REPO, capture_stdout=True, capture_stderr=True)
        report = json.loads(done.stdout)
    assert report["unary"] == [True, 1]
    assert report["stream"] == [10_000, 0]
    assert report["bidi"] == [[i, True] for i in range(100)]
    assert report["talk"] is True
    assert report["health"] == 1  # SERVING
    assert report["oversize"] == "RESOURCE_EXHAUSTED"
    expected = [
        b"u" * 81920,
        *(b"s%d" % i for i in range(10_000)),
        *(b"b%d" % i for i in range(100)),
        b"talk-unary",
        b"talk-1",
        b"talk-2",
    ]
    assert read_payloads(out) == expected
    assert source.bound[0][0] == "127.0.0.1"
    with out.open() as file:
        first = json.loads(file.readline())
    assert first["transport"] == "grpc" and first["peer"].startswith("127.0.0.1:")


async def test_binary_payloads_arrive_byte_exact(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    source = GrpcSource()
    payloads = [bytes([i % 256]) * i + b"\xff\x00\xfe" for i in range(0, 3000, 7)]
    async with gateway_with(source, out) as gateway:

        def call() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{source.bound[0][1]}") as channel:
                stream = channel.stream_unary(
                    "/trio_gateway.v1.Gateway/Stream",
                    request_serializer=gateway_pb2.Message.SerializeToString,
                    response_deserializer=gateway_pb2.Ack.FromString,
                )
                stream((gateway_pb2.Message(payload=p) for p in payloads), timeout=10)

        await trio.to_thread.run_sync(call)
    assert read_payloads(out) == payloads
    assert gateway.ledger.balanced and gateway.ledger.delivered == len(payloads)


async def test_shutdown_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    """Draining sends GOAWAY: the open stream completes, new connections are refused."""
    out = tmp_path / "out.jsonl"
    source = GrpcSource()
    first_sent, finish = threading.Event(), threading.Event()
    result: list[Any] = []
    async with gateway_with(source, out) as gateway:
        target = f"127.0.0.1:{source.bound[0][1]}"

        def call() -> None:
            def messages() -> Iterator[gateway_pb2.Message]:
                yield gateway_pb2.Message(payload=b"before", sequence=0)
                first_sent.set()
                finish.wait(5)
                yield gateway_pb2.Message(payload=b"after", sequence=1)

            with grpc.insecure_channel(target) as channel:
                stream = channel.stream_unary(
                    "/trio_gateway.v1.Gateway/Stream",
                    request_serializer=gateway_pb2.Message.SerializeToString,
                    response_deserializer=gateway_pb2.Ack.FromString,
                )
                result.append(stream(messages(), timeout=10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, call)
            await trio.to_thread.run_sync(first_sent.wait, 5)
            while gateway.ledger.received < 1:
                await trio.sleep(0.01)
            gateway.shutdown()
            # the listener closes at once; the call in flight goes on
            await wait_until(lambda: refuses_connections(("127.0.0.1", source.bound[0][1])))
            finish.set()
    assert result[0].accepted_count == 2
    assert read_payloads(out) == [b"before", b"after"]
    assert gateway.ledger.balanced


# -- raw HTTP/2 -----------------------------------------------------------------------------------


class RawClient:
    """An h2 client connection over a trio stream, for what gRPC clients do not let us do."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def next_events(self) -> list[h2.events.Event] | None:
        data = await self.stream.receive_some(65536)
        if not data:
            return None
        events = self.h2.receive_data(data)
        await self.flush()
        return events


async def test_keepalive_pings_are_answered(tmp_path: Path) -> None:
    source = GrpcSource()
    async with gateway_with(source, tmp_path / "out.jsonl"):
        client = await RawClient.connect(source.bound[0][1])
        client.h2.ping(b"12345678")
        await client.flush()
        acked = False
        with trio.fail_after(5):
            while not acked:
                events = await client.next_events()
                assert events is not None
                acked = any(
                    isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"12345678"
                    for e in events
                )
        await client.stream.aclose()


async def test_idle_connection_gets_goaway_and_is_closed(tmp_path: Path) -> None:
    source = GrpcSource(idle_timeout=0.2)
    async with gateway_with(source, tmp_path / "out.jsonl") as gateway:
        client = await RawClient.connect(source.bound[0][1])
        seen: list[h2.events.Event] = []
        with trio.fail_after(5):
            while (events := await client.next_events()) is not None:
                seen.extend(events)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)
        await client.stream.aclose()
        assert gateway.ledger.rejected.get("idle_timeout") == 1


async def test_bytes_that_are_not_http2_close_the_connection(tmp_path: Path) -> None:
    source = GrpcSource()
    async with gateway_with(source, tmp_path / "out.jsonl") as gateway:
        stream = await trio.open_tcp_stream("127.0.0.1", source.bound[0][1])
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while await stream.receive_some(65536):
                pass
        await stream.aclose()
        assert gateway.ledger.rejected.get("malformed") == 1
