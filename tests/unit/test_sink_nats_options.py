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
    from trio_gateway.sinks._nats import _Connection
    from trio_gateway.sinks._nats_protocol import Info, NatsParser

    client, server = trio.testing.lockstep_stream_pair()  # nobody reads: send_all waits
    sink = NatsSink("nats://127.0.0.1:4222/a")
    conn = _Connection(client, NatsParser(), Info({}), "nats://127.0.0.1:4222", trio.current_time())
    sink._conn = conn
    with trio.move_on_after(0.05) as scope:
        await sink.send(Batch([b"x"], [(Origin("tcp", "t", "p", 1.0), 1)]))
    assert scope.cancelled_caught and sink._conn is None
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


async def test_confirm_server_waits_for_the_pong_and_fails_on_a_refused_publish() -> None:
    """Under ``confirm="server"`` a round is its publishes and a PING: the PONG confirms it,
    and a ``-ERR`` before it (a publish the server refused) fails the batch."""
    import trio
    import trio.testing

    from trio_gateway import Batch, Origin, SinkError
    from trio_gateway.sinks._nats import _Connection
    from trio_gateway.sinks._nats_protocol import Info, NatsParser

    origin = Origin("tcp", "t", "p", 1.0)
    client, server = trio.testing.memory_stream_pair()
    sink = NatsSink("nats://127.0.0.1:4222/a", confirm="server", origin_headers=False)
    info = Info({"max_payload": 1024})
    sink._conn = _Connection(client, NatsParser(), info, "nats://x:4222", trio.current_time())
    sent = b""

    async def answer(data: bytes) -> None:
        nonlocal sent
        sent = b""
        while not sent.endswith(b"PING\r\n"):
            sent += await server.receive_some()
        assert sink.published == 0  # nothing counted before the PONG
        await server.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, b"PONG\r\n")
        await sink.send(Batch([b"x", b"yz"], [(origin, 2)]))
    assert sent == b"PUB a 1\r\nx\r\nPUB a 2\r\nyz\r\nPING\r\n"  # no reply, no headers
    assert sink.published == 2

    sink.published = 0
    refusal = b"-ERR 'Permissions Violation for Publish to \"a\"'\r\nPONG\r\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, refusal)
        with pytest.raises(SinkError, match="Permissions Violation"):
            await sink.send(Batch([b"x"], [(origin, 1)]))
    assert sink.failures["permissions"] == 1 and sink.published == 0
