"""``send`` when something is wrong: one error naming the likely cause, or, when the gateway
goes away mid-run, the summary of what happened until then.

Real sockets on port 0 against in-process gateways (or a bound port nobody listens on). The
command-line forms of these (exit status, one line, no traceback) are in test_send.py and
tests/e2e/test_cli.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trustme
from hyperframe.frame import GoAwayFrame, PingFrame
from test_send import running

from trio_gateway import Gateway, RingBuffer, TcpSource, TransportError, UdpSource
from trio_gateway._proto import gateway_pb2
from trio_gateway.loadgen import FIRST_ANSWER_TIMEOUT, LOST, SendSummary, send
from trio_gateway.loadgen._h2 import grpc_frame
from trio_gateway.sources import Source
from trio_gateway.sources.grpc import GrpcSource
from trio_gateway.sources.http import HttpSource
from trio_gateway.sources.websocket import WebSocketSource
from trio_gateway.testing import RecordingSink, start_gateway

LISTENERS: dict[str, Callable[..., Source]] = {
    "tcp": TcpSource,
    "udp": UdpSource,
    "http": HttpSource,
    "ws": WebSocketSource,
    "grpc": GrpcSource,
}


def target(transport: str, port: int, *, secure: bool = False, path: str = "") -> str:
    if transport == "http":
        return f"http{'s' if secure else ''}://127.0.0.1:{port}{path or '/ingest'}"
    if transport == "ws":
        return f"ws{'s' if secure else ''}://127.0.0.1:{port}{path or '/'}"
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    """A server context and the file of the private CA that signed its certificate."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return server, str(path)


# -- one line naming the cause ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "listener"),
    [("tcp", "TCP"), ("http", "HTTP"), ("ws", "WebSocket"), ("grpc", "gRPC")],
)
async def test_connection_refused_asks_whether_that_listener_is_enabled(
    transport: str, listener: str
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        expected = f"connection refused: is the {listener} listener enabled on 127.0.0.1:{port}?"
        with pytest.raises(TransportError) as caught:
            await send(transport, target(transport, port), count=3, size=18)
    assert str(caught.value) == expected


@pytest.mark.parametrize("transport", ["http", "ws", "grpc"])
async def test_plaintext_to_a_tls_listener_is_a_tls_mismatch(
    transport: str, tls: tuple[ssl.SSLContext, str]
) -> None:
    """The TLS listener drops the plaintext hello without a word; the client asks it for a
    TLS handshake on a second connection to tell that from any other silent close."""
    hint = {"http": "an https:// URL", "ws": "a wss:// URL", "grpc": "--tls"}[transport]
    async with running(LISTENERS[transport](ssl_context=tls[0])) as (handle, _):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError) as caught:
            await send(transport, target(transport, port), count=3, size=18)
    assert str(caught.value).startswith(f"TLS mismatch: 127.0.0.1:{port} speaks TLS: use {hint}")


@pytest.mark.parametrize("transport", ["http", "ws", "grpc"])
async def test_tls_to_a_plaintext_listener_is_a_tls_mismatch(
    transport: str, tls: tuple[ssl.SSLContext, str]
) -> None:
    async with running(LISTENERS[transport]()) as (handle, _):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError) as caught:
            await send(
                transport, target(transport, port, secure=True), count=3, size=18, cafile=tls[1]
            )
    assert str(caught.value).startswith(f"TLS mismatch: 127.0.0.1:{port} does not speak TLS")


@pytest.mark.slow
async def test_http_to_a_tcp_listener_says_wrong_transport_without_waiting_the_timeout() -> None:
    """A TCP listener reads the request as lines and never answers: the first answer on a
    connection has FIRST_ANSWER_TIMEOUT, not the 30 s step timeout."""
    async with running(TcpSource()) as (handle, _):
        port = handle.address()[1]
        started = trio.current_time()
        with trio.fail_after(FIRST_ANSWER_TIMEOUT + 10), pytest.raises(TransportError) as caught:
            await send("http", target("http", port), count=3, size=18, step_timeout=30)
        waited = trio.current_time() - started
    assert f"no HTTP answer within {FIRST_ANSWER_TIMEOUT:g} s: wrong transport?" in str(
        caught.value
    )
    assert waited < FIRST_ANSWER_TIMEOUT + 5


@pytest.mark.parametrize(("transport", "protocol"), [("ws", "WebSocket"), ("grpc", "HTTP/2")])
async def test_silence_from_a_tcp_listener_is_wrong_transport(
    transport: str, protocol: str
) -> None:
    async with running(TcpSource()) as (handle, _):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError) as caught:
            await send(transport, target(transport, port), count=3, size=18, step_timeout=1)
    assert f"no {protocol} answer within 1 s: wrong transport?" in str(caught.value)


@pytest.mark.parametrize(
    ("transport", "listener", "says"),
    [
        ("http", "grpc", "not an HTTP answer: wrong transport?"),
        ("ws", "grpc", "not a WebSocket answer: wrong transport?"),
        ("grpc", "ws", "not an HTTP/2 answer: wrong transport?"),
        ("grpc", "http", "answered HTTP 404 (application/json, not gRPC): wrong transport?"),
    ],
)
async def test_another_protocol_on_the_port_is_wrong_transport(
    transport: str, listener: str, says: str
) -> None:
    async with running(LISTENERS[listener]()) as (handle, sink):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError, match=r"wrong transport\?") as e:
            await send(transport, target(transport, port), count=3, size=18)
    assert says in str(e.value)
    assert sink.payloads == []


async def test_websocket_404_is_a_refused_handshake_not_rejected_messages() -> None:
    async with running(WebSocketSource(path="/ws")) as (handle, sink):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError) as caught:
            await send("ws", target("ws", port, path="/nope"), count=3, size=18)
        summary = await send("ws", target("ws", port, path="/ws"), count=3, size=18)
    assert str(caught.value) == (
        f"127.0.0.1:{port}: the WebSocket handshake was refused with 404 (wrong path?)"
    )
    assert summary.accepted == 3 and len(sink.payloads) == 3


async def test_http_404_is_a_wrong_path_not_rejected_messages() -> None:
    async with running(HttpSource()) as (handle, _):
        port = handle.address()[1]
        with trio.fail_after(10), pytest.raises(TransportError) as caught:
            await send("http", target("http", port, path="/nope"), count=3, size=18)
    assert str(caught.value) == f"127.0.0.1:{port}: POST /nope answered 404 (wrong path?)"


# -- the gateway goes away mid-run ----------------------------------------------------------------

CLIENTS: dict[str, tuple[str, dict[str, object]]] = {
    "tcp": ("tcp", {}),
    "udp": ("udp", {}),
    "http": ("http", {"concurrency": 2}),
    "ws": ("ws", {}),
    "ws-acks": ("ws", {"acks": True}),
    "grpc-unary": ("grpc", {"mode": "unary"}),
    "grpc-stream": ("grpc", {"mode": "stream"}),
    "grpc-bidi": ("grpc", {"mode": "bidi", "concurrency": 2}),
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_the_gateway_stopping_mid_run_ends_with_a_summary(client: str) -> None:
    transport, options = CLIENTS[client]
    count = 1_000_000
    gateway = Gateway(
        sources=[LISTENERS[transport]()],
        sink=RecordingSink(),
        queue=RingBuffer(100_000),
        grace_period=0.5,
        drain_timeout=5,
    )
    result: list[SendSummary] = []
    async with trio.open_nursery() as nursery:
        handle = await start_gateway(nursery, gateway)
        port = handle.address()[1]

        async def run(go: Callable[[], Awaitable[SendSummary]]) -> None:
            result.append(await go())

        nursery.start_soon(
            run,
            lambda: send(
                transport,
                target(transport, port),
                count=count,
                size=18,
                rate=5000,
                step_timeout=10,
                **options,
            ),
        )
        with trio.fail_after(20):
            while handle.ledger.received < 200:
                await trio.sleep(0.01)
        await handle.shutdown()
        with trio.fail_after(30):
            while not result:
                await trio.sleep(0.01)
    [summary] = result
    assert not summary.all_accepted, summary.line()
    line = summary.line()
    assert line.startswith("sent "), line
    if summary.accepted is None:  # TCP, UDP: what was written, and why it stopped
        assert summary.stopped is not None and 200 <= summary.messages < count, line
        return
    assert summary.sent is not None and 200 <= summary.sent < count, line
    assert summary.accepted + summary.rejected_count == count, line
    if transport == "ws":  # the gateway's close frame says it: 1001 going away
        assert "close 1001" in summary.rejected, line
    else:
        assert summary.stopped is not None and summary.rejected[LOST] > 0, line
        assert f"; stopped: 127.0.0.1:{port}: " in line
        if transport == "grpc" and client != "grpc-unary":
            # the drain's GOAWAY and PING, not a protocol error
            assert line.endswith(": the gateway closed the connection (GOAWAY)"), line
        elif transport == "grpc":  # unary calls open a new connection after a GOAWAY, as
            # gRPC clients do: the last word is the GOAWAY or the closed listener after it
            assert line.endswith(
                (": the gateway closed the connection (GOAWAY)", ": connection refused")
            ), line


# -- GOAWAY, then PING, then close, in separate writes (the gateway's drain, slowed down) ------


async def _goaway_then_ping(stream: trio.SocketStream, first: list[bool]) -> None:
    """A scripted gRPC server: it answers the first connection's calls (an ``Ack`` each, the
    windows reopened) until three calls or DATA frames have come, then drains as the gateway
    does but with a pause between each step: ``GOAWAY(max)``, wait for the client's next
    bytes (so it acts on the GOAWAY alone), ``PING``, its reply, ``GOAWAY(last)``, close.
    Later connections are closed at once (the gateway is gone)."""
    async with stream:
        if not first:
            return
        first.clear()
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        ack = grpc_frame(gateway_pb2.Ack(accepted=True))
        seen = last = 0
        while seen < 3:
            data = await stream.receive_some(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    last = event.stream_id or 0
                    conn.send_headers(
                        last, [(":status", "200"), ("content-type", "application/grpc")]
                    )
                elif isinstance(event, h2.events.DataReceived):
                    seen += 1
                    flow = event.flow_controlled_length or 0
                    conn.acknowledge_received_data(flow, event.stream_id or 0)
                    conn.send_data(event.stream_id or 0, ack)  # an Ack per frame (bidi reads it)
                elif isinstance(event, h2.events.StreamEnded):  # a unary call: its trailers
                    conn.send_headers(event.stream_id or 0, [("grpc-status", "0")], end_stream=True)
            await stream.send_all(conn.data_to_send())
        with suppress(trio.BrokenResourceError):  # the client may leave at any step
            await stream.send_all(GoAwayFrame(0, last_stream_id=2**31 - 1).serialize())
            with trio.move_on_after(2):
                await stream.receive_some(65536)  # the client's next frames, after the GOAWAY
            await stream.send_all(PingFrame(0, opaque_data=b"draining").serialize())
            with trio.move_on_after(2):
                await stream.receive_some(65536)  # its PING ack, or its goodbye
            await stream.send_all(GoAwayFrame(0, last_stream_id=last).serialize())


@pytest.mark.parametrize("mode", ["unary", "stream", "bidi"])
async def test_send_grpc_ends_with_a_summary_when_goaway_and_ping_come_apart(mode: str) -> None:
    """h2 closes its state machine at a GOAWAY: a DATA frame, a window update or a PING after
    it raises. ``send`` must still end with its summary, whatever it was doing then."""
    first = [True]
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"),
            lambda stream: _goaway_then_ping(stream, first),
            0,
        )
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10):
            summary = await send(
                "grpc",
                f"127.0.0.1:{port}",
                count=1000,
                size=18,
                rate=500,
                mode=mode,
                step_timeout=5,
            )
        nursery.cancel_scope.cancel()
    line = summary.line()
    assert line.startswith("sent ") and not summary.all_accepted, line
    assert summary.stopped is not None and f"127.0.0.1:{port}: " in summary.stopped, line
    if mode != "stream":  # (a stream's accepted messages are in its final Ack: none here)
        assert summary.accepted is not None and summary.accepted >= 1, line
