"""Chaos: ``kill -9`` of ``serve`` in the middle of a stream of acknowledged requests, three
times, then a last start that drains. Every message acknowledged with a 202 must be in the
file sink at the end (copies allowed: at-least-once), in both durable modes:

* the disk queue with ``ack = "queued"`` (a 202 means "committed to disk");
* the memory queue with ``ack = "delivered"`` and a file sink that fsyncs each batch (a 202
  means "in the file, on disk").

Then exactly once with ids, into a real JetStream (nats-server itself killed and restarted
once as well): the client gives each request an ``Idempotency-Key`` and, when the gateway dies
with a request unanswered, sends that request again with the same key after the restart, as
any retrying client does. Every acknowledged message must be in the stream, and no message
twice: the copies a crash makes (a batch published but not settled, the client's resend)
carry the same ``Nats-Msg-Id`` and JetStream drops them. Both durable modes again: the disk
queue keeps each message's id across the crash, ``ack = "delivered"`` answers once JetStream
has acked.

The 20-restart version, with throughput, is ``python -m bench.durable``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    RetryingPoster,
    ServeProcess,
    post_until_stopped,
    read_payloads,
    wait_until_sync,
)
from jetstream import NatsServer, stream_messages


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
    args += ["--http", "127.0.0.1:0"]
    acknowledged: list[bytes] = []
    for restart in range(3):
        gateway = serve(args)
        stop = threading.Event()
        url = f"http://127.0.0.1:{gateway.port('http')}/ingest"
        client = threading.Thread(
            target=post_until_stopped, args=(url, acknowledged, stop, restart)
        )
        client.start()
        before = len(acknowledged)
        wait_until_sync(lambda: len(acknowledged) > before + 200, what="acks")  # noqa: B023
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.communicate()
        stop.set()
        client.join()
    last = serve(args)
    wanted = set(acknowledged)
    wait_until_sync(lambda: wanted <= set(read_payloads(out)), what="every acknowledged message")
    code, stderr = last.stop()
    assert code == 0, stderr
    found = read_payloads(out)
    assert wanted <= set(found)
    assert len(acknowledged) > 600


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
    args += ["--http", "127.0.0.1:0"]
    client = RetryingPoster()
    for restart in range(3):
        gateway = serve(args)
        stop = threading.Event()
        url = f"http://127.0.0.1:{gateway.port('http')}/ingest"
        thread = threading.Thread(target=client.run, args=(url, stop))
        thread.start()
        before = len(client.acknowledged)
        wait_until_sync(lambda: len(client.acknowledged) > before + 100, what="acks")  # noqa: B023
        if restart == 1:  # the destination crashes too, once, while the gateway is sending
            nats_server.kill()
            nats_server.start()
            wait_until_sync(lambda: len(client.acknowledged) > before + 200, what="acks")  # noqa: B023
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.communicate()
        stop.set()
        thread.join()
    last = serve(args)
    client.finish(f"http://127.0.0.1:{last.port('http')}/ingest")
    wanted = set(client.acknowledged)

    found: Counter[bytes] = Counter()

    def every_acknowledged_is_stored() -> bool:
        messages = asyncio.run(stream_messages(nats_server.url, "CHAOS", "chaos.in", len(wanted)))
        found.clear()
        found.update(m.data for m in messages)
        return wanted <= found.keys()

    wait_until_sync(every_acknowledged_is_stored, timeout=30, what="every acknowledged message")
    code, stderr = last.stop()
    assert code == 0, stderr
    assert [payload for payload, count in found.items() if count > 1] == []  # exactly once
    assert len(client.acknowledged) > 300
