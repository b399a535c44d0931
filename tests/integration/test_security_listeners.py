"""Listener security in-process: mutual TLS, constant-time token checks, binding loopback only."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trio
import trustme
from helpers import grpc_with_token, http_with_token, ws_with_token
from trio_websocket import HandshakeError
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect as ws_connect

from trio_gateway import Gateway
from trio_gateway._proto import gateway_pb2
from trio_gateway.sources import (
    GrpcSource,
    HttpSource,
    Source,
    TcpSource,
    UdpSource,
    WebSocketSource,
)
from trio_gateway.testing import RecordingSink, open_gateway

SOURCES: tuple[type[Source], ...] = (TcpSource, UdpSource, HttpSource, WebSocketSource, GrpcSource)
TOKEN = "tok-5up3r-s3cr3t-value"


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


Client = Callable[[tuple[str, int], ssl.SSLContext, Pki, Path | None], Awaitable[None]]
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


async def test_every_source_built_with_defaults_binds_loopback_only() -> None:
    gateway = Gateway(sources=[cls() for cls in SOURCES], sink=RecordingSink())
    with trio.fail_after(20):
        async with open_gateway(gateway) as handle:
            hosts = {host for addresses in handle.bound for host, _ in addresses}
    assert hosts == {"127.0.0.1"}
