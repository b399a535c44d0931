"""Chaos: ``kill -9`` of ``serve`` in the middle of a stream of acknowledged requests, three
times, then a last start that drains, with a retrying client: ``send --retries`` (NDJSON
batches over HTTP), which keeps every message until the gateway acknowledges it, reconnects to
the gateway restarted on its port and sends again what a crash left unanswered. It ends with
every message acknowledged, and every one must be in the file sink at the end (copies allowed:
at-least-once), in both durable modes:

* the disk queue with ``ack = "queued"`` (a 202 means "committed to disk");
* the memory queue with ``ack = "delivered"`` and a file sink that fsyncs each batch (a 202
  means "in the file, on disk").

Then exactly once with ids, into a real JetStream (nats-server itself killed and restarted
once as well): with ``send --ids`` every request carries an ``Idempotency-Key`` and a resend
carries the same one. Every acknowledged message must be in the stream, and no message twice:
the copies a crash makes (a batch published but not settled, the client's resend) carry the
same ``Nats-Msg-Id`` and JetStream drops them. Both durable modes again: the disk queue keeps
each message's id across the crash, ``ack = "delivered"`` answers once JetStream has acked.

The 20-restart version, with throughput, is ``python -m bench.exactly_once`` (and, with the
disk queue's figures, ``python -m bench.durable``).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    SendProcess,
    ServeProcess,
    free_port,
    kill_9_while_sending,
    read_payloads,
    wait_until_sync,
)
from jetstream import NatsServer, stream_messages

from trio_gateway.loadgen import make_payload

COUNT = 3000
SIZE = 32
EXPECTED = {make_payload(SIZE, seq) for seq in range(COUNT)}


def start_sending(port: int, *more: str) -> SendProcess:
    """NDJSON batches of 20 at 1,500 msg/s, retrying: a run of 2 s unless the gateway is down,
    so it lasts as long as the restarts do."""
    return SendProcess(
        [
            "--http",
            f"http://127.0.0.1:{port}/ingest",
            "--ndjson",
            "20",
            "--count",
            str(COUNT),
            "--size",
            str(SIZE),
            "--rate",
            "1500",
            "--retries",
            "20",
            *more,
        ]
    )


def after_acks(gateway: ServeProcess, restart: int, client: SendProcess) -> None:
    """Kill once this life of the gateway has taken 200 messages (or the run is over)."""
    wait_until_sync(lambda: not client.running() or gateway.received() >= 200, what="acks")


def every_message_acknowledged(code: int, output: str) -> None:
    assert code == 0, output
    assert f"accepted {COUNT}, rejected 0" in output, output
    resent = re.search(r"(\d+) after a lost connection", output)  # the crashes hit requests
    assert resent is not None and "; reconnected" in output, output


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disk-queue", "ack-delivered"])
def test_no_acknowledged_message_is_lost_to_kill_9(
    mode: str, tmp_path: Path, serve: type[ServeProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    if mode == "disk-queue":
        args = ["--queue", f"disk:{tmp_path / 'queue'}", "--sink", f"file:{out}"]
    else:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[sink]\nurl = "file:{out}"\nfsync = true\n')
        args = ["--config", str(config), "--ack", "delivered"]
    port = free_port()
    args += ["--http", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"]
    gateway = serve(args)
    client = start_sending(port)
    last = kill_9_while_sending(
        gateway, client, times=3, moment=lambda g, r: after_acks(g, r, client)
    )
    every_message_acknowledged(*client.finish())
    wait_until_sync(lambda: set(read_payloads(out)) >= EXPECTED, what="every message")
    code, stderr = last.stop()
    assert code == 0, stderr
    assert set(read_payloads(out)) >= EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disk-queue", "ack-delivered"])
def test_exactly_once_with_ids_into_jetstream_across_kill_9(
    mode: str, tmp_path: Path, serve: type[ServeProcess], nats_server: NatsServer
) -> None:
    sink = f"{nats_server.url}/chaos.in?stream=CHAOS&create=true"
    if mode == "disk-queue":
        args = ["--queue", f"disk:{tmp_path / 'queue'}", "--sink", sink]
    else:
        args = ["--sink", sink, "--ack", "delivered"]
    port = free_port()
    args += ["--http", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"]
    gateway = serve(args)
    client = start_sending(port, "--ids", "chaos")

    def moment(gateway: ServeProcess, restart: int) -> None:
        after_acks(gateway, restart, client)
        if restart == 1:  # the destination crashes too, once, while the gateway is sending
            nats_server.kill()
            nats_server.start()
            before = gateway.received()
            wait_until_sync(
                lambda: not client.running() or gateway.received() >= before + 200,
                what="acks after nats-server's restart",
            )

    last = kill_9_while_sending(gateway, client, times=3, moment=moment)
    every_message_acknowledged(*client.finish())

    found: Counter[bytes] = Counter()

    def every_message_is_stored() -> bool:
        messages = asyncio.run(stream_messages(nats_server.url, "CHAOS", "chaos.in", COUNT))
        found.clear()
        found.update(m.data for m in messages)
        return found.keys() >= EXPECTED

    wait_until_sync(every_message_is_stored, timeout=30, what="every acknowledged message")
    code, stderr = last.stop()
    assert code == 0, stderr
    assert [payload for payload, count in found.items() if count > 1] == []  # exactly once
    assert found.keys() == EXPECTED
