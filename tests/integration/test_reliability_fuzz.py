"""Fuzzing the entry points with Hypothesis: HTTP, WebSocket and gRPC listeners, the HTTP
rules (sans-IO), and the codecs' fuzz target from tests/fuzz/fuzz_codecs.py.

The listeners are fuzzed over real loopback sockets against one running gateway: every example
connects, sends its bytes, half-closes and reads until the server hangs up. Whatever the
bytes, the server must answer or close within a bound (no connection held forever), never
answer 5xx, and never let an exception out: after all examples the gateway is still running,
serves a well-behaved client on every listener, and has counted what it refused.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import h2.config
import h2.connection
import httpx
import trio
from helpers import detached_ingress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from trio_gateway import Gateway
from trio_gateway.queues import RingBuffer
from trio_gateway.sources import GrpcSource, HttpSource, WebSocketSource
from trio_gateway.sources.http import BodyKind, IngestRules
from trio_gateway.testing import RecordingSink, open_gateway

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FUZZ = settings(
    max_examples=int(os.environ.get("TRIO_GATEWAY_FUZZ_EXAMPLES", "80")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# -- inputs: pure noise, and noise behind a valid start so that it reaches the deeper layers ------

noise = st.binary(max_size=3000)
header_names = st.sampled_from(
    [
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"authorization",
        b"expect",
        b"connection",
        b"idempotency-key",
        b"x-anything",
    ]
)
header_values = st.one_of(
    st.sampled_from([b"chunked", b"0", b"5", b"99999999999", b"-1", b"application/x-ndjson"]),
    st.sampled_from([b"100-continue", b"Bearer x", b"close", b"gzip, chunked"]),
    st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v),
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"\x00", b"PRI"]))
    target = draw(st.sampled_from([b"/ingest", b"/ingest?x=1", b"/", b"*", b"/%00", b"//"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9"]))
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    head = b"%s %s %s\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % pair for pair in headers)
    return head + b"\r\n" + draw(noise)


WS_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@st.composite
def ws_frames(draw: st.DrawFn) -> bytes:
    """Frames with any opcode, flags, mask and length encoding (valid or not)."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        payload = draw(st.binary(max_size=300))
        fin, rsv, opcode = draw(st.booleans()), draw(st.integers(0, 7)), draw(st.integers(0, 15))
        masked = draw(st.booleans())
        out += bytes([fin << 7 | rsv << 4 | opcode])
        size = len(payload)
        form = draw(st.sampled_from(["short", "16", "64"]))
        if form == "short" and size < 126:
            out += bytes([masked << 7 | size])
        elif form == "64":
            out += bytes([masked << 7 | 127]) + struct.pack(">Q", size)
        else:
            out += bytes([masked << 7 | 126]) + struct.pack(">H", size)
        if masked:
            key = draw(st.binary(min_size=4, max_size=4))
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            out += key
        out += payload
    return out


@st.composite
def grpc_calls(draw: st.DrawFn) -> bytes:
    """A valid HTTP/2 start, one call with fuzzed headers, then gRPC messages with any flag and
    announced length (and optionally raw noise)."""
    # no client-side validation: invalid headers are part of the fuzz
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    path = draw(
        st.sampled_from(
            [
                "/trio_gateway.v1.Gateway/Send",
                "/trio_gateway.v1.Gateway/Stream",
                "/trio_gateway.v1.Gateway/StreamAcked",
                "/model.GrpcUnaryInputterService/MakeRequest",
                "/grpc.health.v1.Health/Check",
                "/nope/Nope",
            ]
        )
    )
    headers = [
        (":method", draw(st.sampled_from(["POST", "GET"]))),
        (":scheme", "http"),
        (":path", path),
        (":authority", "gateway"),
        ("content-type", draw(st.sampled_from(["application/grpc", "text/plain"]))),
    ]
    extra = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["grpc-timeout", "grpc-encoding", "authorization", "te"]),
                st.text(alphabet="0123456789mSHugzip ", max_size=8),
            ),
            max_size=3,
        )
    )
    conn.send_headers(1, headers + extra)
    body = b""
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from([0, 0, 0, 1, 2, 255]))
        message = draw(st.binary(max_size=200))
        size = draw(st.sampled_from([len(message), len(message), 0, 2**32 - 1]))
        body += struct.pack(">BI", flag, size) + message
    if body:
        conn.send_data(1, body, end_stream=draw(st.booleans()))
    return conn.data_to_send() + draw(st.binary(max_size=200))


INPUTS: dict[str, st.SearchStrategy[bytes]] = {
    "http": st.one_of(noise, http_requests(), st.builds(lambda n: H2_PREFACE + n, noise)),
    "websocket": st.one_of(
        noise,
        http_requests(),
        st.builds(lambda f: WS_HANDSHAKE + f, ws_frames()),
        st.builds(lambda n: WS_HANDSHAKE + n, noise),
    ),
    "grpc": st.one_of(noise, grpc_calls(), st.builds(lambda n: H2_PREFACE + n, noise)),
}
"""``TRIO_GATEWAY_FUZZ_EXAMPLES=5000 pytest tests/integration/test_reliability_fuzz.py``: longer."""

# -- one blocking client per example (run in a worker thread beside the gateway) ------------------

CLOSE_WITHIN = 5.0
"""Seconds the server may take to answer and hang up (its idle timeout is well below)."""


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read everything until the server closes (which it must)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already refused and closed
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError as exc:
            raise AssertionError(f"the server held the connection: {data[:80]!r}") from exc
        return bytes(received)


ANSWERS = {101, 202, 400, 401, 404, 405, 408, 413, 426, 431, 501, 505}
"""Statuses a listener may answer fuzz with: never 500 (an internal error), nor 503 (the queue
is far from full here). 501 answers a Transfer-Encoding other than chunked, 505 an HTTP version
other than 1.0 and 1.1."""


def check_answer(transport: str, data: bytes, reply: bytes) -> None:
    if transport == "grpc" or data.startswith(H2_PREFACE):
        return  # HTTP/2: frames; what matters is that it closed and nothing escaped
    while reply.startswith(b"HTTP/1.1 100 "):  # "Expect: 100-continue" has its interim answer
        reply = reply.partition(b"\r\n\r\n")[2]
    if reply:
        assert reply.startswith(b"HTTP/1.1 "), reply[:80]
        status = int(reply[9:12])
        assert status in ANSWERS, f"{status} for {data[:80]!r}"


def fuzz_listener(transport: str, port: int) -> Callable[[], None]:
    @FUZZ
    @given(data=INPUTS[transport])
    def run(data: bytes) -> None:
        check_answer(transport, data, exchange(port, data))

    return run


async def test_listeners_survive_fuzzed_input_and_count_it() -> None:
    sources = {
        "http": HttpSource(idle_timeout=1.0, max_message_size=2000, token=None),
        "websocket": WebSocketSource(
            idle_timeout=1.0, handshake_timeout=1.0, max_message_size=2000
        ),
        "grpc": GrpcSource(idle_timeout=1.0, max_message_size=2000),
    }
    sink = RecordingSink()
    gateway = Gateway(sources=list(sources.values()), sink=sink, grace_period=0.2)
    with trio.fail_after(240):
        async with open_gateway(gateway) as handle:
            ports = {t: handle.address(i)[1] for i, t in enumerate(sources)}
            for transport, port in ports.items():
                await trio.to_thread.run_sync(fuzz_listener(transport, port))
            assert gateway.state == "running"
            # Every listener still serves a well-behaved client.
            async with httpx.AsyncClient() as client:
                reply = await client.post(f"http://127.0.0.1:{ports['http']}/ingest", content=b"ok")
                assert reply.status_code == 202
            async with open_websocket_url(f"ws://127.0.0.1:{ports['websocket']}/") as ws:
                await ws.send_message(b"ok")
            while sink.count < handle.ledger.received:
                await trio.sleep(0.01)
    ledger = handle.ledger
    assert ledger.balanced
    for counters in gateway.source_counters:
        assert sum(counters.rejected.values()) > 0, f"{counters.transport}: nothing counted"
        # the safety net in serve_connections keeps the gateway up; a bug must still show
        assert "internal_error" not in counters.rejected, counters.rejected
        assert counters.connections_active == 0


# -- the HTTP rules, sans-IO ----------------------------------------------------------------------

STATUSES = {202, 400, 401, 404, 405, 408, 413, 503}


def rules_with(capacity: int) -> IngestRules:
    ingress, _ = detached_ingress(RingBuffer(capacity), "http")
    return IngestRules(ingress, max_body_size=500, token="s3cret", queue_wait=0)


@FUZZ
@given(
    method=st.sampled_from([b"POST", b"GET", b"post"]) | st.binary(max_size=8),
    target=st.sampled_from([b"/ingest", b"/ingest?a", b"/other"]) | st.binary(max_size=20),
    headers=st.lists(st.tuples(header_names, header_values), max_size=8),
    body=st.binary(max_size=800) | st.lists(st.binary(max_size=50)).map(b"\n".join),
    ndjson=st.booleans(),
    capacity=st.integers(1, 5),
)
def test_http_rules_answer_everything_and_count_every_refusal(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    ndjson: bool,
    capacity: int,
) -> None:
    rules = rules_with(capacity)
    counters = rules.ingress.counters
    refusal, kind = rules.head(method, target, headers)
    if refusal is not None:
        assert refusal.status in STATUSES
        # a refusal at the door is counted, except "not found" and "method not allowed"
        assert sum(counters.rejected.values()) == (refusal.status not in (404, 405))
        return
    reply = trio.run(rules.ingest, body, BodyKind(ndjson, kind.key), "fuzz")
    assert reply.status in STATUSES
    queued = len(rules.ingress.buffer.queue)
    if reply.status == 202:
        assert counters.received == queued > 0 and not counters.rejected
    else:
        assert counters.received == queued and sum(counters.rejected.values()) > 0


# -- the codecs' fuzz target, so the atheris harness cannot rot ------------------------------------
