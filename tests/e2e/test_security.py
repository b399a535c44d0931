"""Security properties, each proven against the real thing.

* Mutual TLS on every TLS listener (TCP, HTTP, WebSocket, gRPC): a client with a certificate
  from the configured CA is served; one without is refused at the handshake and counted
  (``tls_handshake``), and a client with a certificate from another CA too.
* Bearer tokens are compared in constant time: every check on HTTP, WebSocket and gRPC goes
  through ``hmac.compare_digest`` (a spy counts the calls), right token or wrong.
* Every listener binds 127.0.0.1 unless told otherwise (library defaults, CLI defaults, TOML).
* Every limit is on by default: every source (and the queue, the gateway, the admin endpoint)
  built with its defaults has finite, positive bounds.
* No secret is ever logged: ``serve --log-level debug`` with tokens on HTTP, WebSocket and gRPC,
  auth failing and succeeding on each, and the token appears nowhere on stderr.
"""

from __future__ import annotations

import hmac
import inspect
import math
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
import trustme
from helpers import REPO, ServeProcess
from trio_websocket import HandshakeError, open_websocket_url
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

from trio_gateway import Gateway, RingBuffer
from trio_gateway._config import (
    DEFAULT_ADMIN,
    DEFAULT_TCP,
    DEFAULT_UDP,
    GatewayConfig,
    build_gateway,
    config_from_mapping,
    parse_hostport,
)
from trio_gateway._proto import gateway_pb2
from trio_gateway.admin import AdminServer
from trio_gateway.sources import (
    GrpcSource,
    HttpSource,
    Source,
    TcpSource,
    UdpSource,
    WebSocketSource,
)
from trio_gateway.sources.grpc import ServerLimits
from trio_gateway.testing import RecordingSink, open_gateway

SOURCES: tuple[type[Source], ...] = (TcpSource, UdpSource, HttpSource, WebSocketSource, GrpcSource)
TOKEN = "tok-5up3r-s3cr3t-value"


# -- certificates ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA, a server certificate from it, a client certificate from it, and one from a
    stranger CA; as PEM files for the sources and as contexts for the clients."""

    ca_pem: Path
    server_pem: Path
    client_pem: Path
    stranger_pem: Path
    ca: trustme.CA
    client: trustme.LeafCert

    def client_context(self, pem: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if pem is not None:
            context.load_cert_chain(str(pem))
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "server", "client", "stranger")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(paths["server"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths["client"]))
    stranger.issue_cert("client@example.com").private_key_and_cert_chain_pem.write_to_path(
        str(paths["stranger"])
    )
    return Pki(paths["ca"], paths["server"], paths["client"], paths["stranger"], ca, client)


# -- mutual TLS on every TLS listener -------------------------------------------------------------

Client = Callable[[tuple[str, int], ssl.SSLContext, Pki, Path | None], Awaitable[None]]


async def tcp_tls_client(
    address: tuple[str, int], context: ssl.SSLContext, pki: Pki, pem: Path | None
) -> None:
    stream = await trio.open_ssl_over_tcp_stream(*address, ssl_context=context)
    async with stream:
        await stream.send_all(b"mtls\n")
        # The server says nothing on success; on refusal the TLS alert arrives here.
        with trio.move_on_after(0.3):
            if await stream.receive_some(100) == b"":
                raise trio.BrokenResourceError("closed by the server")


async def http_tls_client(
    address: tuple[str, int], context: ssl.SSLContext, pki: Pki, pem: Path | None
) -> None:
    async with httpx.AsyncClient(verify=context) as client:
        reply = await client.post(f"https://{address[0]}:{address[1]}/ingest", content=b"mtls")
        assert reply.status_code == 202


async def ws_tls_client(
    address: tuple[str, int], context: ssl.SSLContext, pki: Pki, pem: Path | None
) -> None:
    # websockets' sync client in a thread: it reports the server's TLS alert at once
    # (trio-websocket waits for its connect timeout instead).
    def session() -> None:
        url = f"wss://{address[0]}:{address[1]}/"
        with ws_connect(url, ssl=context, open_timeout=5) as ws:
            ws.send(b"mtls")

    await trio.to_thread.run_sync(session)


async def grpc_tls_client(
    address: tuple[str, int], context: ssl.SSLContext, pki: Pki, pem: Path | None
) -> None:
    def call() -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem.read_bytes(),
            private_key=None if pem is None else pem.read_bytes(),
            certificate_chain=None if pem is None else pem.read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{address[1]}", credentials) as channel:
            send = channel.unary_unary(
                "/trio_gateway.v1.Gateway/Send",
                request_serializer=gateway_pb2.Message.SerializeToString,
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            assert send(gateway_pb2.Message(payload=b"mtls"), timeout=5).accepted

    await trio.to_thread.run_sync(call)


TLS_CLIENTS: dict[str, tuple[type[Source], Client]] = {
    "tcp": (TcpSource, tcp_tls_client),
    "http": (HttpSource, http_tls_client),
    "websocket": (WebSocketSource, ws_tls_client),
    "grpc": (GrpcSource, grpc_tls_client),
}
REFUSED = (
    trio.BrokenResourceError,
    ssl.SSLError,
    httpx.TransportError,
    HandshakeError,
    grpc.RpcError,
    WebSocketException,
    OSError,
)


@pytest.mark.parametrize("transport", list(TLS_CLIENTS))
async def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    transport: str, pki: Pki
) -> None:
    source_class, client = TLS_CLIENTS[transport]
    source = source_class(certfile=str(pki.server_pem), client_ca=str(pki.ca_pem), idle_timeout=2.0)
    sink = RecordingSink()
    with trio.fail_after(30):
        async with open_gateway(Gateway(sources=[source], sink=sink)) as handle:
            address = handle.address()
            counters = handle.gateway.source_counters[0]
            for pem in (None, pki.stranger_pem):
                with pytest.raises(REFUSED):
                    await client(address, pki.client_context(pem), pki, pem)
            while counters.rejected["tls_handshake"] < 2:
                await trio.sleep(0.01)
            await client(address, pki.client_context(pki.client_pem), pki, pki.client_pem)
            await sink.wait_for(1)
    assert sink.payloads == [b"mtls"]
    assert dict(counters.rejected) == {"tls_handshake": 2}


# -- constant-time token comparison ---------------------------------------------------------------


@pytest.fixture
def compare_digest_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bytes, bytes]]]:
    """Every call of ``hmac.compare_digest`` made by the sources (they call it through the
    ``hmac`` module, so replacing the module attribute sees them all)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    yield calls


async def http_with_token(address: tuple[str, int], token: str) -> bool:
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://{address[0]}:{address[1]}/ingest",
            content=b"t",
            headers={"authorization": f"Bearer {token}"},
        )
        return reply.status_code == 202


async def ws_with_token(address: tuple[str, int], token: str) -> bool:
    try:
        async with open_websocket_url(
            f"ws://{address[0]}:{address[1]}/",
            extra_headers=[(b"authorization", b"Bearer " + token.encode())],
        ) as ws:
            await ws.send_message(b"t")
    except HandshakeError:
        return False
    return True


async def grpc_with_token(address: tuple[str, int], token: str) -> bool:
    def call() -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{address[1]}") as channel:
            send = channel.unary_unary(
                "/trio_gateway.v1.Gateway/Send",
                request_serializer=gateway_pb2.Message.SerializeToString,
                response_deserializer=gateway_pb2.Ack.FromString,
            )
            try:
                send(
                    gateway_pb2.Message(payload=b"t"),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=5,
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

    return await trio.to_thread.run_sync(call)


TOKEN_CLIENTS = {
    "http": (HttpSource, http_with_token),
    "websocket": (WebSocketSource, ws_with_token),
    "grpc": (GrpcSource, grpc_with_token),
}


@pytest.mark.parametrize("transport", list(TOKEN_CLIENTS))
async def test_every_token_check_is_constant_time(
    transport: str, compare_digest_calls: list[tuple[bytes, bytes]]
) -> None:
    source_class, client = TOKEN_CLIENTS[transport]
    with trio.fail_after(20):
        async with open_gateway(
            Gateway(sources=[source_class(token=TOKEN)], sink=RecordingSink())
        ) as handle:
            address = handle.address()
            tries = [TOKEN, "wrong", TOKEN[:-1], TOKEN + "x", TOKEN]
            results = [await client(address, token) for token in tries]
    assert results == [True, False, False, False, True]
    # one constant-time comparison per request, right or wrong, always against the token
    assert len(compare_digest_calls) == len(tries)
    assert all(TOKEN.encode() in expected for _, expected in compare_digest_calls)
    assert dict(handle.ledger.rejected) == {"unauthorized": 3}


# -- 127.0.0.1 unless told otherwise --------------------------------------------------------------


def test_every_listener_defaults_to_loopback() -> None:
    for cls in SOURCES:
        assert inspect.signature(cls.__init__).parameters["host"].default == "127.0.0.1", cls
        assert cls().host == "127.0.0.1", cls
    assert AdminServer().host == "127.0.0.1"
    for default in (DEFAULT_TCP, DEFAULT_UDP, DEFAULT_ADMIN):
        assert parse_hostport(default, key="default")[0] == "127.0.0.1"
    assert parse_hostport(":7000", key="--tcp") == ("127.0.0.1", 7000)  # no host given
    config = config_from_mapping({"sources": [{"transport": t} for t in ("tcp", "udp", "http")]})
    assert {s.host for s in config.sources} == {"127.0.0.1"}  # no listen key
    gateway = build_gateway(GatewayConfig().with_default_sources())
    assert {s.host for s in gateway.sources} == {"127.0.0.1"}


async def test_every_source_built_with_defaults_binds_loopback_only() -> None:
    gateway = Gateway(sources=[cls() for cls in SOURCES], sink=RecordingSink())
    with trio.fail_after(20):
        async with open_gateway(gateway) as handle:
            hosts = {host for addresses in handle.bound for host, _ in addresses}
    assert hosts == {"127.0.0.1"}


# -- every limit on by default --------------------------------------------------------------------

LIMITS = {
    "max_connections",
    "idle_timeout",
    "max_message_size",
    "handshake_timeout",
    "max_header_size",
    "max_concurrent_streams",
    "queue_wait",
    "queue_timeout",
    "batch_limit",
    "receive_buffer",
    "read_size",
}
"""Constructor options that bound something (UDP has no connections: no idle timeout)."""


def _finite_positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@pytest.mark.parametrize("cls", SOURCES, ids=lambda c: c.transport)
def test_every_source_has_every_limit_on_by_default(cls: type[Source]) -> None:
    source = cls()
    bounds = {
        name: getattr(source, name)
        for name in inspect.signature(cls.__init__).parameters
        if name in LIMITS
    }
    # what every source has, whatever its transport
    assert {"max_message_size"} <= set(bounds)
    if cls is not UdpSource:
        assert {"max_connections", "idle_timeout"} <= set(bounds)
    for name, value in bounds.items():
        assert _finite_positive(value), f"{cls.__name__}.{name} = {value!r}"
    # and no numeric default anywhere is unbounded (infinite, zero or negative)
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        default = parameter.default
        if isinstance(default, int | float) and not isinstance(default, bool) and name != "port":
            assert _finite_positive(default), f"{cls.__name__}({name}={default!r})"


def test_the_rest_is_bounded_by_default_too() -> None:
    limits = ServerLimits()  # every gRPC connection's HTTP/2 bounds
    for field in fields(limits):
        assert _finite_positive(getattr(limits, field.name)), field.name
    gateway = Gateway(sources=[TcpSource()], sink=RecordingSink())
    assert isinstance(gateway.queue, RingBuffer)
    assert _finite_positive(gateway.queue.statistics().capacity)
    assert _finite_positive(gateway.drain_timeout) and _finite_positive(gateway.grace_period)
    assert _finite_positive(gateway.batch_size)
    admin = AdminServer()
    for name in ("max_connections", "max_header_size", "timeout"):
        assert _finite_positive(getattr(admin, name)), name
    config = GatewayConfig()
    assert _finite_positive(config.queue.capacity) and _finite_positive(config.drain_timeout)


# -- no secret ever logged ------------------------------------------------------------------------


def test_no_secret_is_ever_logged_even_at_debug(tmp_path: Path, serve: type[ServeProcess]) -> None:
    env_token = "env-" + TOKEN
    gateway = serve(
        [
            *("--http", "127.0.0.1:0", "--ws", "127.0.0.1:0", "--grpc", "127.0.0.1:0"),
            *("--http-token", TOKEN, "--ws-token", TOKEN, "--grpc-token", "env:GW_GRPC_TOKEN"),
            *("--sink", f"file:{tmp_path / 'out.jsonl'}", "--log-level", "debug"),
        ],
        env={"GW_GRPC_TOKEN": env_token},
    )

    async def exercise() -> list[bool]:
        results = []
        for token in (TOKEN, "Bearer-less", TOKEN + "-wrong"):
            results.append(await http_with_token(("127.0.0.1", gateway.port("http")), token))
            results.append(await ws_with_token(("127.0.0.1", gateway.port("websocket")), token))
        # the query-string form of the WebSocket token
        port = gateway.port("websocket")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/?token={TOKEN}") as ws:
            await ws.send_message(b"by query")
        results.append(await grpc_with_token(("127.0.0.1", gateway.port("grpc")), env_token))
        results.append(await grpc_with_token(("127.0.0.1", gateway.port("grpc")), TOKEN))
        return results

    assert trio.run(exercise) == [True, True, False, False, False, False, True, False]
    time.sleep(0.2)
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert "debug" in stderr.lower(), "not running at debug level"
    for secret in (TOKEN, env_token, TOKEN[:12]):
        assert secret not in stderr, [line for line in stderr.splitlines() if secret in line][:3]


def test_check_config_does_not_print_secrets(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[sources]]\ntransport = "http"\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_gateway", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "source: http" in result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_check_config_redacts_sink_secrets(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[sink]\nurl = "nats://alice:hunter2-pw@127.0.0.1:4222/events"\n'
        '[[sources]]\ntransport = "tcp"\nlisten = "127.0.0.1:0"\n'
    )
    http = tmp_path / "http.toml"
    http.write_text(
        f'[sink]\nurl = "https://collector.example/ingest"\ntoken = "{TOKEN}"\n'
        f'headers = {{ Authorization = "Basic {TOKEN}", X-Tenant = "blue" }}\n'
        '[[sources]]\ntransport = "tcp"\nlisten = "127.0.0.1:0"\n'
    )
    outputs = []
    for path in (config, http):
        result = subprocess.run(
            [sys.executable, "-m", "trio_gateway", "check-config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "sink: nats://alice:<redacted>@127.0.0.1:4222/events" in outputs[0]
    assert "hunter2-pw" not in outputs[0]
    assert TOKEN not in outputs[1] and "'X-Tenant': 'blue'" in outputs[1]
