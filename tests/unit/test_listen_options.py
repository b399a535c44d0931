"""The listen options every stream source shares: one validation, errors naming the key."""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from trio_gateway import GrpcSource, HttpSource, TcpSource, WebSocketSource
from trio_gateway._errors import ConfigurationError
from trio_gateway.sources._options import ListenOptions

SOURCES = {"tcp": TcpSource, "http": HttpSource, "websocket": WebSocketSource, "grpc": GrpcSource}


@pytest.mark.parametrize(
    ("option", "value", "key"),
    [
        ("port", 70000, "port"),
        ("max_connections", 0, "max_connections"),
        ("idle_timeout", 0, "idle_timeout"),
        ("max_message_size", 0, "max_message_size"),
        ("keyfile", "key.pem", "certfile"),
        ("token", "", "token"),
        ("handshake_timeout", 0, "handshake_timeout"),
    ],
)
def test_every_stream_source_refuses_the_same_way(option: str, value: object, key: str) -> None:
    for transport, source in SOURCES.items():
        if option not in source.__init__.__code__.co_varnames:
            continue  # e.g. TCP has no token
        with pytest.raises(ConfigurationError) as info:
            source(**{option: value})
        assert info.value.key == f"{transport}.{key}"


def test_ssl_context_and_certfile_are_exclusive() -> None:
    with pytest.raises(ConfigurationError, match="not both") as info:
        ListenOptions(
            transport="http",
            ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            certfile="cert.pem",
        )
    assert info.value.key == "http.certfile"


def test_options_are_frozen_and_keyword_only() -> None:
    options = ListenOptions(transport="tcp", port=8000)
    assert options.tls is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ListenOptions("tcp")  # type: ignore[misc]


def test_a_source_exposes_what_it_was_given() -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    source = HttpSource(port=8080, max_connections=7, token="t", ssl_context=context)
    assert source.listen_options.max_connections == source.max_connections == 7
    assert source.ssl_context is context
    assert source.scheme == "https"
