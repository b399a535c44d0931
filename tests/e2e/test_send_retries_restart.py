"""``send --retries`` survives ``kill -9`` of ``serve``: the command reconnects with backoff to
the gateway restarted on the same port and resends what was not acknowledged, with the same
ids, so every message is acknowledged once in the summary and stored once in JetStream.

``serve --ack delivered`` into a real nats-server: an acknowledgement means "JetStream has it",
and a resend of a message JetStream has (its answer died with the gateway) carries the same
``Nats-Msg-Id``, which JetStream drops. The in-process version, for every transport and mode,
is tests/integration/test_send_retries.py.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, ServeProcess, wait_until_sync
from jetstream import NatsServer, stream_messages

from trio_gateway.loadgen import make_payload

COUNT = 3000
RUNS = {
    "http": (["--http", "http://127.0.0.1:{port}/ingest", "--ndjson", "20"], "--http"),
    "grpc-bidi": (["--grpc", "127.0.0.1:{port}", "--mode", "bidi"], "--grpc"),
}


def free_port() -> int:
    """A port for both lives of the gateway (the restart must come back where it was)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_send_retries_rides_out_a_kill_9_and_restart_with_each_message_stored_once(
    run: str, tmp_path: Path, serve: type[ServeProcess], nats_server: NatsServer
) -> None:
    client_args, listener = RUNS[run]
    port = free_port()
    args = [
        listener,
        f"127.0.0.1:{port}",
        "--sink",
        f"{nats_server.url}/retry.in?stream=RETRY&create=true",
        "--ack",
        "delivered",
        "--admin",
        "127.0.0.1:0",
    ]
    gateway = serve(args)
    command = [sys.executable, "-m", "trio_gateway", "send"]
    command += [arg.format(port=port) for arg in client_args]
    command += ["--count", str(COUNT), "--rate", "1500", "--retries", "10", "--ids", "r"]
    client = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True
    )
    try:
        wait_until_sync(lambda: gateway.received() >= 500, what="the first messages")
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.communicate()
        last = serve(args)  # the same port: the client's reconnects find it again
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, out + err
    assert f"accepted {COUNT}, rejected 0" in out, out
    resent = re.search(r"resent (\d+) \(.*?(\d+) after a lost connection\)", out)
    assert resent is not None and int(resent[2]) > 0, out
    assert "; reconnected" in out and "gave up" not in out, out

    found: Counter[bytes] = Counter()

    def every_message_is_stored() -> bool:
        messages = asyncio.run(stream_messages(nats_server.url, "RETRY", "retry.in", COUNT))
        found.clear()
        found.update(m.data for m in messages)
        return len(found) >= COUNT

    wait_until_sync(every_message_is_stored, timeout=30, what="every message in the stream")
    code, stderr = last.stop()
    assert code == 0, stderr
    assert set(found) == {make_payload(18, seq) for seq in range(COUNT)}
    assert [payload for payload, n in found.items() if n > 1] == []  # exactly once
