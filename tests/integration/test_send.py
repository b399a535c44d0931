"""``send``: the load client for HTTP, WebSocket and gRPC against real gateways.

Most tests run the client functions against an in-process gateway (real sockets on port 0, a
RecordingSink) and compare the client's summary with the gateway's own ledger: what the client
calls accepted is what the gateway counted as received, what it calls rejected is what the
gateway refused. ``send`` against a ``serve`` subprocess: tests/e2e/test_send_cli.py.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from helpers import wait_until

from trio_gateway import Gateway, RingBuffer
from trio_gateway._cli import main
from trio_gateway._errors import TransportError
from trio_gateway.loadgen import (
    SendSummary,
    make_payload,
    resolve_token,
    send_grpc,
    send_http,
    send_websocket,
)
from trio_gateway.queues import OverflowPolicy
from trio_gateway.sources import Source
from trio_gateway.sources.grpc import GrpcSource
from trio_gateway.sources.http import HttpSource
from trio_gateway.sources.websocket import WebSocketSource
from trio_gateway.testing import GatewayHandle, RecordingSink, open_gateway

TOKEN = "s3cret-token"


@asynccontextmanager
async def running(
    source: Source,
    *,
    capacity: int = 100_000,
    policy: OverflowPolicy = "block",
    stalled: bool = False,
) -> AsyncIterator[tuple[GatewayHandle, RecordingSink]]:
    """A gateway with one source; ``stalled``: the sink does not deliver until the block ends."""
    sink = RecordingSink()
    if stalled:
        sink.stall()
    gateway = Gateway(
        sources=[source],
        sink=sink,
        queue=RingBuffer(capacity, policy=policy),
        batch_size=64,
        grace_period=1,
        drain_timeout=5,
    )
    with trio.fail_after(25):
        async with open_gateway(gateway) as handle:
            yield handle, sink
            sink.recover()


def expected(count: int, size: int) -> list[bytes]:
    return sorted(make_payload(size, i) for i in range(count))


def assert_accounted(summary: SendSummary, count: int) -> None:
    """Every message ends in exactly one bucket."""
    assert summary.messages == count
    assert summary.accepted is not None
    assert summary.accepted + summary.rejected_count == count, summary


# -- HTTP --------------------------------------------------------------------------------------


async def test_http_one_per_request_and_ndjson_batches() -> None:
    source = HttpSource()
    async with running(source) as (handle, sink):
        url = "http://127.0.0.1:%d/ingest" % handle.address()[1]
        one = await send_http(url, count=300, size=40, concurrency=3)
        batched = await send_http(url, count=1000, size=18, ndjson=64, concurrency=2)
    assert one.accepted == 300 and not one.rejected and one.all_accepted
    assert one.bytes == 300 * 40
    assert batched.accepted == 1000 and batched.all_accepted
    payloads = sink.payloads
    assert sorted(p for p in payloads if len(p) == 40) == expected(300, 40)
    assert sorted(p for p in payloads if len(p) == 18) == expected(1000, 18)
    assert handle.ledger.received == 1300
    # Keep-alive: 300 + 16 requests on 3 + 2 connections.
    assert handle.gateway.source_counters[0].connections_total == 5


async def test_http_token_missing_is_rejected_401_then_env_token_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = HttpSource(token=TOKEN)
    async with running(source) as (handle, sink):
        url = "http://127.0.0.1:%d/ingest" % handle.address()[1]
        refused = await send_http(url, count=20, size=30)
        monkeypatch.setenv("SEND_TEST_TOKEN", TOKEN)
        allowed = await send_http(
            url, count=20, size=30, token=resolve_token("env:SEND_TEST_TOKEN")
        )
    assert refused.accepted == 0 and refused.rejected == {"401": 20}
    assert not refused.all_accepted
    assert handle.ledger.rejected["unauthorized"] == 20
    assert allowed.accepted == 20 and allowed.all_accepted
    assert len(sink.payloads) == handle.ledger.received == 20


async def test_http_full_queue_drop_newest_503_matches_the_ledger() -> None:
    source = HttpSource()
    async with running(source, capacity=50, policy="drop_newest", stalled=True) as (handle, _):
        url = "http://127.0.0.1:%d/ingest" % handle.address()[1]
        # Batches of 7: the pump holds whole batches (a multiple of 7) in the stalled sink and
        # the queue takes 50 more, so one batch is cut at the boundary: a 503 whose body says
        # how many lines went in (50 % 7 == 1), and the client counts exactly those.
        batched = await send_http(url, count=140, size=18, ndjson=7)
        progress = Progress()
        single = await send_http(url, count=100, size=18, progress=progress)
    assert progress.total == 100
    ledger = handle.ledger
    for summary, count in ((single, 100), (batched, 140)):
        assert_accounted(summary, count)
        assert set(summary.rejected) == {"503"}
        assert not summary.all_accepted
    assert batched.accepted is not None and batched.accepted % 7 == 1
    assert single.accepted == 0  # the queue stayed full
    assert batched.accepted == ledger.received
    assert single.rejected["503"] + batched.rejected["503"] == ledger.rejected["queue_full"]


async def test_http_retries_send_again_what_a_503_refused() -> None:
    # Retry-After: 0, so that the test does not wait; without the header the client waits 1 s.
    source = HttpSource(queue_wait=0.01, retry_after=0)
    async with running(source, capacity=10, stalled=True) as (handle, sink):
        url = "http://127.0.0.1:%d/ingest" % handle.address()[1]

        async def recover_later() -> None:
            await wait_until(lambda: handle.ledger.rejected.get("queue_full", 0) > 0, what="a 503")
            sink.recover()

        # The queue fills, then every batch is refused (503) until the sink recovers; the
        # refused lines are sent again, after the ones each 503 says it queued.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(recover_later)
            summary = await send_http(url, count=100, size=18, ndjson=4, retries=1000)
    assert_accounted(summary, 100)
    assert summary.all_accepted and summary.resent > 0
    assert "resent" in summary.line()
    # Every message in the sink once; every refusal the client resent is one the gateway counted.
    assert sorted(sink.payloads) == expected(100, 18)
    assert handle.ledger.rejected["queue_full"] == summary.resent


async def test_http_oversize_is_413_on_fresh_connections() -> None:
    source = HttpSource(max_message_size=100)
    async with running(source) as (handle, _):
        url = "http://127.0.0.1:%d/ingest" % handle.address()[1]
        summary = await send_http(url, count=5, size=200)
    # The gateway answers before reading the body and closes: the client reconnects each time.
    assert summary.rejected == {"413": 5} and summary.accepted == 0
    assert handle.ledger.rejected["oversize"] == 5


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_and_wss_with_a_private_ca(ca: trustme.CA, tmp_path: Path) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running(HttpSource(ssl_context=server)) as (handle, sink):
        url = "https://127.0.0.1:%d/ingest" % handle.address()[1]
        summary = await send_http(url, count=50, size=25, concurrency=2, cafile=str(ca_file))
        # Without the private CA the certificate cannot be verified: one error, no summary.
        with pytest.raises(TransportError, match="TLS handshake"):
            await send_http(url, count=1, size=25)
    assert summary.accepted == 50 and summary.all_accepted
    assert sorted(sink.payloads) == expected(50, 25)
    async with running(WebSocketSource(ssl_context=server)) as (handle, sink):
        url = "wss://127.0.0.1:%d/" % handle.address()[1]
        summary = await send_websocket(url, count=500, size=25, concurrency=2, cafile=str(ca_file))
    assert summary.accepted == 500 and summary.all_accepted
    assert sorted(sink.payloads) == expected(500, 25)


# -- WebSocket ---------------------------------------------------------------------------------


class Progress:
    """A progress callback that adds up what it was told."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, n: int) -> None:
        assert n > 0
        self.total += n


async def test_websocket_messages_and_clean_close() -> None:
    source = WebSocketSource(token=TOKEN)
    progress = Progress()
    async with running(source) as (handle, sink):
        url = "ws://127.0.0.1:%d/" % handle.address()[1]
        summary = await send_websocket(
            url, count=3000, size=50, concurrency=2, token=TOKEN, progress=progress
        )
    assert summary.accepted == 3000 and summary.all_accepted
    assert progress.total == 3000
    assert sorted(sink.payloads) == expected(3000, 50)
    assert handle.ledger.received == 3000


async def test_websocket_token_missing_401_rejects_the_run() -> None:
    source = WebSocketSource(token=TOKEN)
    async with running(source) as (handle, sink):
        url = "ws://127.0.0.1:%d/" % handle.address()[1]
        # 20 kB messages: 13 to a write, so the refusal stops a run of many writes.
        progress = Progress()
        summary = await send_websocket(
            url, count=100, size=20_000, concurrency=2, progress=progress
        )
    assert summary.rejected == {"401": 100} and summary.accepted == 0
    assert progress.total == 100
    assert handle.ledger.rejected["unauthorized"] >= 1
    assert sink.payloads == []


async def test_websocket_message_too_big_is_close_1009() -> None:
    source = WebSocketSource(max_message_size=100)
    async with running(source) as (handle, _):
        url = "ws://127.0.0.1:%d/" % handle.address()[1]
        summary = await send_websocket(url, count=10, size=200)
    assert summary.rejected == {"close 1009": 10} and summary.accepted == 0
    assert handle.ledger.rejected["oversize"] == 1


# -- gRPC --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "count"), [("unary", 200), ("stream", 20_000), ("bidi", 5000)])
async def test_grpc_modes_deliver_everything(mode: str, count: int) -> None:
    source = GrpcSource(token=TOKEN)
    async with running(source) as (handle, sink):
        host, port = handle.address()
        progress = Progress()
        summary = await send_grpc(
            host,
            port,
            count=count,
            size=30,
            mode=mode,
            concurrency=2,
            token=TOKEN,
            progress=progress,
        )
    assert summary.accepted == count and summary.all_accepted, summary
    assert progress.total == count
    assert sorted(sink.payloads) == expected(count, 30)
    assert handle.ledger.received == count


@pytest.mark.parametrize("mode", ["unary", "stream", "bidi"])
async def test_grpc_token_missing_is_unauthenticated(mode: str) -> None:
    source = GrpcSource(token=TOKEN)
    async with running(source) as (handle, sink):
        host, port = handle.address()
        # 20 kB messages: 13 to a write, so the refusal ends a call of several writes and
        # the messages not sent yet are counted under the same status.
        progress = Progress()
        summary = await send_grpc(host, port, count=40, size=20_000, mode=mode, progress=progress)
    assert summary.rejected == {"UNAUTHENTICATED": 40} and summary.accepted == 0
    assert progress.total == 40
    assert handle.ledger.rejected["unauthorized"] >= 1
    assert sink.payloads == []


async def test_grpc_full_queue_unary_and_bidi_refusals_match_the_ledger() -> None:
    source = GrpcSource(queue_timeout=0)
    async with running(source, capacity=40, policy="drop_newest", stalled=True) as (handle, _):
        host, port = handle.address()
        unary = await send_grpc(host, port, count=150, size=18, mode="unary")
        bidi = await send_grpc(host, port, count=300, size=18, mode="bidi")
    ledger = handle.ledger
    assert_accounted(unary, 150)
    assert_accounted(bidi, 300)
    assert set(unary.rejected) == {"RESOURCE_EXHAUSTED"}
    assert bidi.accepted == 0 and bidi.rejected == {"queue_full": 300}  # the queue was full
    assert unary.accepted == ledger.received
    assert unary.rejected_count + bidi.rejected_count == ledger.rejected["queue_full"]


async def test_grpc_stream_reports_the_final_ack_counts() -> None:
    source = GrpcSource()
    async with running(source, capacity=100, policy="drop_newest", stalled=True) as (handle, _):
        host, port = handle.address()
        summary = await send_grpc(host, port, count=2000, size=18, mode="stream")
    # Stream offers without waiting: the queue's policy drops what does not fit, and the final
    # Ack counts it as rejected; the gateway counts the same messages as dropped.
    assert_accounted(summary, 2000)
    assert summary.rejected.keys() == {"dropped"}
    assert summary.rejected["dropped"] == handle.ledger.dropped["drop_newest"]
    assert summary.accepted == handle.ledger.received - handle.ledger.dropped["drop_newest"]


async def test_grpc_over_tls_with_a_private_ca(ca: trustme.CA) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with running(GrpcSource(ssl_context=server)) as (handle, sink):
        host, port = handle.address()
        summary = await send_grpc(host, port, count=300, size=18, mode="bidi", ssl_context=client)
    assert summary.accepted == 300
    assert sorted(sink.payloads) == expected(300, 18)


async def test_connection_refused_is_one_transport_error() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(TransportError, match="connection refused: is the gRPC listener"):
            await send_grpc("127.0.0.1", port, count=1, size=1)
        with pytest.raises(TransportError, match="connection refused: is the HTTP listener"):
            await send_http(f"http://127.0.0.1:{port}/", count=1, size=1)


@pytest.mark.parametrize("client", ["http", "ws", "unary", "stream", "bidi"])
async def test_a_dropped_connection_is_one_transport_error(client: str) -> None:
    """A peer that reads the first bytes and hangs up: an error, not a summary."""

    async def hang_up(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(TransportError, match=r"127\.0\.0\.1"):
            if client == "http":
                await send_http(f"http://127.0.0.1:{port}/", count=10, size=20)
            elif client == "ws":
                await send_websocket(f"ws://127.0.0.1:{port}/", count=10, size=20)
            else:
                await send_grpc("127.0.0.1", port, count=10, size=20, mode=client)
        nursery.cancel_scope.cancel()


# -- the command line --------------------------------------------------------------------------


def test_cli_connection_refused_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["send", "--http", f"http://127.0.0.1:{port}/", "--count", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "connection refused: is the HTTP listener enabled on" in err[0], err
