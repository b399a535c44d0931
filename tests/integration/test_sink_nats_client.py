"""What the NATS sink's own client does beyond publishing: credentials, messages too large for
the server, and a connection that died while the sink was idle (real nats-server each time)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from jetstream import NatsServer, read_stream

from trio_gateway import Batch, Origin, SinkRefused, SinkUnavailable
from trio_gateway.sinks import NatsSink
from trio_gateway.sinks import _nats as nats_sink_module

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


async def test_user_and_password_are_sent_and_a_wrong_one_is_refused(
    password_server: NatsServer,
) -> None:
    address = password_server.url.removeprefix("nats://")
    with trio.fail_after(20):
        wrong = NatsSink(f"nats://alice:nope@{address}/auth.in?stream=AUTH&create=true")
        with pytest.raises(SinkUnavailable, match="Authorization Violation"):
            await wrong.open()
        await wrong.aclose()
        sink = NatsSink(f"nats://alice:s3cret@{address}/auth.in?stream=AUTH&create=true")
        await sink.open()
        await sink.send(Batch([b"a", b"b"], [(ORIGIN, 2)]))
        await sink.aclose()
    assert sink.stored == 2


async def test_a_message_over_max_payload_is_refused_and_the_rest_delivered(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/big.in?stream=BIG&create=true")
    too_big = b"x" * (1024 * 1024 + 1)  # nats-server's default max_payload is 1 MiB
    batch = Batch([b"first", too_big, b"last"], [(ORIGIN, 3)])
    with trio.fail_after(20):
        await sink.open()
        with pytest.raises(SinkRefused) as refused:
            await sink.send(batch)
        await sink.aclose()
    assert refused.value.indices == [1] and refused.value.reason == "max_payload"
    assert (sink.stored, sink.refused) == (2, 1)
    messages = await read_stream(nats_server, "BIG", "big.in", 2)
    assert [m.data for m in messages] == [b"first", b"last"]


async def test_a_connection_that_died_while_idle_is_replaced_before_publishing(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every send counts as "after an idle spell": the sink checks the connection first.
    monkeypatch.setattr(nats_sink_module, "_IDLE_CHECK", -1.0)
    sink = NatsSink(f"{nats_server.url}/idle.in?stream=IDLE&create=true&storage=file")
    with trio.fail_after(30):
        await sink.open()
        await sink.send(Batch([b"before"], [(ORIGIN, 1)]))
        await trio.to_thread.run_sync(nats_server.kill)
        await trio.to_thread.run_sync(nats_server.start)
        await sink.send(Batch([b"after"], [(ORIGIN, 1)]))  # no failure: reconnected first
        await sink.aclose()
    assert sink.connects == 2 and not sink.failures and sink.stored == 2
    messages = await read_stream(nats_server, "IDLE", "idle.in", 2)
    assert [m.data for m in messages] == [b"before", b"after"]


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = NatsServer(
        tmp_path,
        args=(
            "--tls",
            "--tlscert",
            str(tmp_path / "server.pem"),
            "--tlskey",
            str(tmp_path / "server.pem"),
        ),
    )
    await trio.to_thread.run_sync(server.start)
    try:
        address = server.url.removeprefix("nats://")
        with trio.fail_after(20):
            untrusted = NatsSink(f"nats://{address}/tls.in?stream=TLS&create=true&tls=true")
            with pytest.raises(SinkUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.open()
            sink = NatsSink(f"nats://{address}/tls.in?stream=TLS&create=true&ca={tmp_path}/ca.pem")
            await sink.open()
            await sink.send(Batch([b"secret"], [(ORIGIN, 1)]))
            await sink.aclose()
        assert sink.stored == 1
    finally:
        server.stop()
