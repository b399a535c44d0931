"""The disk queue against ``serve`` as a subprocess: ``kill -9``, restart, delivered after.

The first gateway's sink is an HTTP destination that answers 503 to everything, so every
message it acknowledges (HTTP 202) is still in its queue when it is killed with SIGKILL. The
second gateway opens the same directory with a file sink: every acknowledged message must
reach the file, and its ledger must count them as ``recovered``. Then ``kill -9`` in the
middle of a stream of 4 KiB messages while the gateway delivers (runs committed, settled and
deleted as it is killed).
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from helpers import (
    ServeProcess,
    ledger_of,
    post_until_stopped,
    read_payloads,
    wait_until_sync,
)


class _Refusing(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_destination() -> Iterator[int]:
    """An HTTP destination that answers 503 to every batch: the gateway's queue holds on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_acknowledged_messages_survive_kill_9_and_are_delivered_after_restart(
    tmp_path: Path, serve: type[ServeProcess], refusing_destination: int
) -> None:
    queue_dir = tmp_path / "queue"
    first = serve(
        [
            "--http",
            "127.0.0.1:0",
            "--queue",
            f"disk:{queue_dir}",
            "--sink",
            f"http://127.0.0.1:{refusing_destination}/ingest",
        ]
    )
    url = f"http://127.0.0.1:{first.port('http')}/ingest"
    acknowledged: list[bytes] = []
    with httpx.Client() as client:
        for request in range(20):
            lines = [json.dumps({"r": request, "i": i}).encode() for i in range(50)]
            response = client.post(
                url,
                content=b"\n".join(lines),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert response.status_code == 202, response.text
            acknowledged += lines
        one = json.dumps({"single": True}).encode()
        assert client.post(url, content=one).status_code == 202
        acknowledged.append(one)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.communicate()

    out = tmp_path / "out.jsonl"
    second = serve(
        ["--http", "127.0.0.1:0", "--queue", f"disk:{queue_dir}", "--sink", f"file:{out}"]
    )
    wait_until_sync(lambda: len(read_payloads(out)) >= len(acknowledged), what="redelivery")
    code, stderr = second.stop()
    assert code == 0, stderr
    assert read_payloads(out) == acknowledged  # all of them, once each, in order
    ledger = ledger_of(stderr)
    assert ledger["recovered"] == len(acknowledged)
    assert ledger["received"] == 0
    assert ledger["delivered"] == len(acknowledged)
    assert ledger["balanced"] is True


def test_a_stop_keeps_what_the_sink_could_not_take_for_the_next_start(
    tmp_path: Path, serve: type[ServeProcess], refusing_destination: int
) -> None:
    """SIGTERM with the sink refusing: what is queued is ``kept`` (not abandoned: exit 0)."""
    queue_dir = tmp_path / "queue"
    gateway = serve(
        [
            "--http",
            "127.0.0.1:0",
            "--queue",
            f"disk:{queue_dir}",
            "--drain-timeout",
            "0.3",
            "--sink",
            f"http://127.0.0.1:{refusing_destination}/ingest",
        ]
    )
    url = f"http://127.0.0.1:{gateway.port('http')}/ingest"
    with httpx.Client() as client:
        for i in range(5):
            assert client.post(url, content=b"%d" % i).status_code == 202
    code, stderr = gateway.stop()
    ledger = ledger_of(stderr)
    assert code == 0, stderr
    assert ledger["received"] == 5
    assert ledger["kept"] == 5
    assert ledger["abandoned"] == 0
    assert ledger["balanced"] is True


@pytest.mark.slow
def test_kill_9_mid_stream_loses_no_acknowledged_message(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """The gateway delivers (the file sink) while it takes more. Killed once 40 MB were
    acknowledged, then restarted: every acknowledged message is in the file (a batch in the
    sink's hands when it died may come twice)."""
    out = tmp_path / "out.jsonl"
    args = ["--http", "127.0.0.1:0", "--queue", f"disk:{tmp_path / 'queue'}"]
    args += ["--sink", f"file:{out}"]
    first = serve(args)
    acknowledged: list[bytes] = []
    stop = threading.Event()
    url = f"http://127.0.0.1:{first.port('http')}/ingest"
    client = threading.Thread(
        target=post_until_stopped,
        args=(url, acknowledged, stop, 0),
        kwargs={"batch": 100, "pad": 4096},
    )
    client.start()
    try:
        wait_until_sync(lambda: len(acknowledged) >= 10_000, what="40 MB acknowledged", timeout=60)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.communicate()
    finally:
        stop.set()
        client.join()
    second = serve(args)
    wanted = set(acknowledged)
    wait_until_sync(lambda: wanted <= set(read_payloads(out)), what="redelivery", timeout=60)
    code, stderr = second.stop()
    assert code == 0, stderr
    assert ledger_of(stderr)["balanced"] is True
