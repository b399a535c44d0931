"""The listen options every stream source shares: one validation, errors naming the key."""

from __future__ import annotations

import dataclasses
import inspect
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


def test_every_shared_keyword_of_a_source_reaches_its_options() -> None:
    # from_arguments picks the options out of the constructor's locals() by name: a keyword
    # renamed on one side only would silently fall back to the default. Give each shared
    # keyword a non-default value and read it back.
    given: dict[str, object] = {
        "host": "::1",
        "port": 7,
        "max_connections": 3,
        "idle_timeout": 4.5,
        "max_message_size": 12345,
        "token": "t0k",
        "handshake_timeout": 2.5,
    }
    for transport, source in SOURCES.items():
        parameters = inspect.signature(source).parameters
        shared = {name: value for name, value in given.items() if name in parameters}
        options = source(**shared).listen_options  # type: ignore[arg-type]
        assert options.transport == transport
        assert {name: getattr(options, name) for name in shared} == shared, transport
        defaults = {name: p.default for name, p in parameters.items() if name in given}
        assert defaults.keys() == shared.keys()
        built = source().listen_options
        assert {name: getattr(built, name) for name in defaults} == defaults, transport


def test_from_arguments_takes_only_fields_and_overrides_win() -> None:
    options = ListenOptions.from_arguments(
        "http", {"self": object(), "path": "/x", "port": 9, "alpn": ("x",)}, alpn=("h2",)
    )
    assert (options.transport, options.port, options.alpn) == ("http", 9, ("h2",))
    assert options.max_connections == ListenOptions(transport="http").max_connections
