"""/metrics across every transport: HTTP, WebSocket and gRPC beside TCP and UDP.

Each transport is driven by a real third-party client (httpx, trio-websocket, grpcio); the
scrape is parsed with prometheus-client's parser and must equal what each client sent and
what each refusal cost.
"""

from __future__ import annotations

import grpc
import httpx
import trio
from helpers import parse_samples, sample_value
from trio_websocket import open_websocket_url

from trio_gateway import Gateway, NullSink, TcpSource, UdpSource
from trio_gateway._proto import gateway_pb2
from trio_gateway.admin import AdminServer
from trio_gateway.loadgen import send_tcp, send_udp
from trio_gateway.sources.grpc import GrpcSource
from trio_gateway.sources.http import HttpSource
from trio_gateway.sources.websocket import WebSocketSource


def grpc_send(port: int, count: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        send = channel.unary_unary(
            "/trio_gateway.v1.Gateway/Send",
            request_serializer=gateway_pb2.Message.SerializeToString,
            response_deserializer=gateway_pb2.Ack.FromString,
        )
        for i in range(count):
            ack = send(gateway_pb2.Message(payload=b"g%04d" % i, sequence=i), timeout=5)
            assert ack.accepted


async def test_every_transport_counts_what_its_clients_sent() -> None:
    sources = [
        TcpSource(),
        UdpSource(),
        HttpSource(path="/ingest", max_message_size=1000, token="s3cret"),
        WebSocketSource(max_message_size=1000),
        GrpcSource(),
    ]
    gateway = Gateway(sources=sources, sink=NullSink(), services=[AdminServer(port=0)])
    sent = {"tcp": 3000, "udp": 100, "http": 40, "websocket": 500, "grpc": 30}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            (tcp,), (udp,), (http,), (ws,), (grpc_addr,) = bound
            await send_tcp(*tcp, count=sent["tcp"], size=20)
            await send_udp(*udp, count=sent["udp"], size=20, rate=10_000)

            auth = {"authorization": "Bearer s3cret"}
            async with httpx.AsyncClient(base_url=f"http://{http[0]}:{http[1]}") as client:
                for i in range(sent["http"]):
                    reply = await client.post("/ingest", content=b"h%04d" % i, headers=auth)
                    assert reply.status_code == 202
                too_big = await client.post("/ingest", content=b"x" * 2000, headers=auth)
                assert too_big.status_code == 413
                assert (await client.post("/ingest", content=b"no token")).status_code == 401

            async with open_websocket_url(f"ws://{ws[0]}:{ws[1]}/") as socket:
                for i in range(sent["websocket"]):
                    await socket.send_message(b"w%04d" % i)
            await trio.to_thread.run_sync(grpc_send, grpc_addr[1], sent["grpc"])

            total = sum(sent.values())
            while gateway.ledger.delivered < total:
                await trio.sleep(0.01)
            host, port = gateway.service_values[0]
            async with httpx.AsyncClient() as client:
                m = parse_samples((await client.get(f"http://{host}:{port}/metrics")).text)
            gateway.shutdown()
    for transport, n in sent.items():
        got = sample_value(m, "trio_gateway_received_messages_total", transport=transport)
        assert got == n, transport
    assert (
        sample_value(m, "trio_gateway_received_bytes_total", transport="http") == 5 * sent["http"]
    )
    assert sample_value(m, "trio_gateway_received_bytes_total", transport="websocket") == 5 * 500
    assert (
        sample_value(m, "trio_gateway_received_bytes_total", transport="grpc") == 5 * sent["grpc"]
    )
    http_rejected = {"transport": "http"}
    assert (
        sample_value(m, "trio_gateway_rejected_messages_total", reason="oversize", **http_rejected)
        == 1
    )
    assert (
        sample_value(
            m, "trio_gateway_rejected_messages_total", reason="unauthorized", **http_rejected
        )
        == 1
    )
    assert sample_value(m, "trio_gateway_connections_total", transport="websocket") == 1
    assert sample_value(m, "trio_gateway_delivered_messages_total") == total
    assert gateway.ledger.received == total
