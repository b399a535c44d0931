"""The NATS sink without a server: its URL, its config options, where nats-server comes from."""

from __future__ import annotations

import os

import pytest
from jetstream import nats_server_binary

from trio_gateway import (
    ConfigurationError,
)
from trio_gateway._config import SinkConfig, build_sink
from trio_gateway.sinks import NatsSink
from trio_gateway.sinks._nats import parse_nats_url


def test_parse_nats_url() -> None:
    target = parse_nats_url(
        "nats://alice:s%3Acret@10.0.0.1,10.0.0.2:4333,[::1]:4444/telemetry.in"
        "?stream=TELEMETRY&create=true&storage=memory&replicas=3&duplicate_window=30"
    )
    assert target.servers == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4333", "nats://[::1]:4444")
    assert target.subject == "telemetry.in" and target.stream == "TELEMETRY"
    assert target.create and target.storage == "memory" and target.replicas == 3
    assert target.duplicate_window == 30.0
    assert (target.user, target.password, target.token) == ("alice", "s:cret", None)
    assert parse_nats_url("nats://tok@host/a").token == "tok"


@pytest.mark.parametrize(
    "url",
    [
        "http://host/subject",
        "nats://host",
        "nats://host/",
        "nats://host/a.*",
        "nats://host/a.>",
        "nats://host/a..b",
        "nats://host:99999/a",
        "nats://host/a?create=true",
        "nats://host/a?stream=S&replicas=9",
        "nats://host/a?stream=S&storage=disk",
        "nats://host/a?bogus=1",
        "nats://host/a?stream=bad.name",
    ],
)
def test_bad_nats_url_is_a_config_error_naming_sink(url: str) -> None:
    with pytest.raises(Exception) as caught:
        NatsSink(url)
    assert type(caught.value).__name__ == "ConfigurationError"
    assert str(caught.value).startswith("sink: ")


def test_nats_server_binary_comes_from_the_test_extra() -> None:
    assert os.access(nats_server_binary(), os.X_OK)


def test_config_builds_the_nats_sink() -> None:
    sink = build_sink(SinkConfig(url="nats://127.0.0.1:4222/a.b?stream=S"))
    assert isinstance(sink, NatsSink) and sink.target.subject == "a.b"
    with pytest.raises(ConfigurationError) as caught:
        build_sink(SinkConfig(url="nats://127.0.0.1:4222/a.*"))
    assert caught.value.key == "sink"


async def test_a_write_cut_short_gives_up_the_connection() -> None:
    """Half a command on the wire would garble whatever follows: the sink drops that
    connection (the next send reconnects) instead of writing on after it."""
    import trio
    import trio.testing

    from trio_gateway import Batch, Origin
    from trio_gateway.sinks._nats_conn import NatsConnection
    from trio_gateway.sinks._nats_protocol import Info, NatsParser

    client, server = trio.testing.lockstep_stream_pair()  # nobody reads: send_all waits
    sink = NatsSink("nats://127.0.0.1:4222/a")
    conn = NatsConnection(
        client, NatsParser(), Info({}), "nats://127.0.0.1:4222", trio.current_time()
    )
    sink._client.conn = conn
    with trio.move_on_after(0.05) as scope:
        await sink.send(Batch([b"x"], [(Origin("tcp", "t", "p", 1.0), 1)]))
    assert scope.cancelled_caught and sink._client.conn is None
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")
    await server.aclose()


def test_confirm_is_stored_or_server_and_comes_from_the_config() -> None:
    sink = build_sink(SinkConfig(url="nats://127.0.0.1:4222/a.b", options={"confirm": "server"}))
    assert isinstance(sink, NatsSink) and sink.confirm == "server"
    assert NatsSink("nats://127.0.0.1:4222/a").confirm == "stored"
    with pytest.raises(ConfigurationError, match='confirm must be "stored" or "server"') as caught:
        build_sink(SinkConfig(url="nats://127.0.0.1:4222/a", options={"confirm": "acked"}))
    assert caught.value.key == "sink"
