"""The gRPC listener charges the gateway's memory budget: a connection's partial messages count
against its share (a sixteenth of what is not the queue's), and the call that would take it
past gets RESOURCE_EXHAUSTED, counted ``over_budget``, while other clients are served."""

from __future__ import annotations

from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import trio
from helpers import wait_until

from trio_gateway._gateway import Gateway
from trio_gateway._proto import gateway_pb2
from trio_gateway.sinks import FileSink
from trio_gateway.sources.grpc import GrpcSource

KiB, MiB = 1 << 10, 1 << 20
STREAM = "/trio_gateway.v1.Gateway/Stream"
PARTIAL = 60_000
"""Bytes of each hostile message sent, of the 64 KiB its prefix announces."""


class Hoarder:
    """A raw h2 client that opens calls and sends most of one large message on each."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.statuses: dict[int, str] = {}
        """grpc-status by stream id, from the server's trailers."""

    @classmethod
    async def connect(cls, port: int) -> Hoarder:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        client.h2.initiate_connection()
        await client.flush()
        while client.h2.outbound_flow_control_window == 65535:  # the server's window update
            await client.receive()
        return client

    async def flush(self) -> None:
        await self.stream.send_all(self.h2.data_to_send())

    async def receive(self) -> None:
        data = await self.stream.receive_some(65536)
        assert data, "the server closed the connection"
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                headers = dict(event.headers)
                if "grpc-status" in headers:
                    self.statuses[event.stream_id] = headers["grpc-status"]  # type: ignore[assignment]
        await self.flush()

    async def hoard(self, calls: int) -> None:
        """Open ``calls`` calls, each with a message announced at 64 KiB and never finished."""
        prefix = b"\x00" + (64 * KiB).to_bytes(4, "big")
        for index in range(calls):
            stream_id = 1 + 2 * index
            self.h2.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", STREAM),
                    (":authority", "x"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            # the window is half the share, but the bytes of a partial message are
            # acknowledged at once: wait for them to be, then send the next
            while self.h2.local_flow_control_window(stream_id) < len(prefix) + PARTIAL:
                await self.flush()
                await self.receive()
            self.h2.send_data(stream_id, prefix + b"h" * PARTIAL)
        await self.flush()


def good_send(port: int) -> grpc.StatusCode:
    """One unary ``Send`` from grpcio, on a connection of its own: its status."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        send = channel.unary_unary(
            "/trio_gateway.v1.Gateway/Send",
            request_serializer=gateway_pb2.Message.SerializeToString,
            response_deserializer=gateway_pb2.Ack.FromString,
        )
        try:
            send(gateway_pb2.Message(payload=b"good"), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


async def test_partial_messages_are_charged_to_the_memory_budget(tmp_path: Path) -> None:
    # 8 MiB: the queue takes 4, a connection may hold 256 KiB (4 such messages, not 5); the
    # listener's own connection budget (32 MiB) would let all of them in
    source = GrpcSource(max_message_size=64 * KiB)
    gateway = Gateway(sources=[source], sink=FileSink(tmp_path / "out.jsonl"), max_memory=8 * MiB)
    budget = gateway.budget
    assert budget.connection_share == 256 * KiB
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            port = source.bound[0][1]
            hoarders = [await Hoarder.connect(port) for _ in range(3)]
            # complete messages are held back by flow control within half the share
            assert hoarders[0].h2.outbound_flow_control_window == 128 * KiB
            for hoarder in hoarders:
                await hoarder.hoard(5)
            for hoarder in hoarders:  # the fifth call, which asked for more, is refused
                while not hoarder.statuses:
                    await hoarder.receive()
                assert hoarder.statuses == {9: "8"}  # RESOURCE_EXHAUSTED
            assert gateway.ledger.rejected.get("over_budget") == 3
            # four partial messages per connection, still held and charged
            assert 3 * 4 * PARTIAL <= budget.held <= 3 * budget.connection_share
            served = await trio.to_thread.run_sync(good_send, port)
            assert served == grpc.StatusCode.OK  # another client is served
            budget.charge(budget.pool)  # the whole pool taken (as by the sink's batch)
            refused = await trio.to_thread.run_sync(good_send, port)
            assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert gateway.ledger.rejected.get("over_budget") == 4
            budget.release(budget.pool)
            for hoarder in hoarders:
                await hoarder.stream.aclose()
            await wait_until(lambda: budget.held == 0)  # released with their connections
            gateway.shutdown()
    assert gateway.ledger.received == 1 and gateway.ledger.balanced
