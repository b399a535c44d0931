"""Safe defaults without a socket: listeners on loopback, every limit on, every bound finite."""

from __future__ import annotations

import inspect
import math
from dataclasses import fields

import pytest

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
from trio_gateway.testing import RecordingSink

SOURCES: tuple[type[Source], ...] = (TcpSource, UdpSource, HttpSource, WebSocketSource, GrpcSource)
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
