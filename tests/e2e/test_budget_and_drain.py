"""``serve`` as a subprocess: the memory budget holds under a flood into a stalled sink, and the
shutdown honours its drain deadline (what was read is not abandoned before it; a slow
processor does not hold the drain past it)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, WS_HANDSHAKE, ServeProcess

MiB = 1 << 20


def ledger_of(stderr: str) -> dict[str, object]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger: dict[str, object] = json.loads(lines[0])["ledger"]
    return ledger


def memory(pid: int, key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def flood(connect: socket.socket, chunk: bytes, limit: int) -> None:
    """Send ``chunk`` until ``limit`` bytes are out or the gateway stops reading for 0.5 s."""
    sent = 0
    with connect as sock:
        sock.settimeout(0.5)
        try:
            while sent < limit:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            return


def ws_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(WS_HANDSHAKE)
    assert b" 101 " in sock.recv(4096)
    return sock


@pytest.mark.slow  # about 4 s: a flood of 240 MB against a stalled sink
def test_a_flood_into_a_stalled_sink_stays_within_the_memory_budget(
    serve: type[ServeProcess],
) -> None:
    """Four TCP and two WebSocket clients send 64 KiB messages as fast as they can while the
    sink's destination accepts nothing (a listener that never reads). The queue's byte bound
    (half the budget) and the connections' shares stop the reading: the gateway's resident
    memory grows by at most the budget (64 MiB) plus 64 MiB. Before the budget it grew by
    about 690 MiB here (a queue of 10,000 messages of 64 KiB)."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)
        sink_port = stalled.getsockname()[1]
        gateway = serve(
            [
                *("--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"),
                *("--sink", f"tcp:127.0.0.1:{sink_port}", "--max-memory", "64MiB"),
                *("--drain-timeout", "0.3", "--grace-period", "0.2", "--admin", "off"),
            ]
        )
        pid = gateway.proc.pid
        ready = memory(pid, "VmRSS")
        frame = b"x" * 65535 + b"\n"
        message = b"y" * 65536  # a binary WebSocket frame, masked with zeros
        ws_frame = bytes((0x82, 0xFF)) + len(message).to_bytes(8, "big") + bytes(4) + message
        sends = [
            (socket.create_connection(("127.0.0.1", gateway.port("tcp"))), frame * 16)
            for _ in range(4)
        ] + [(ws_connection(gateway.port("websocket")), ws_frame * 16) for _ in range(2)]
        threads = [
            threading.Thread(target=flood, args=(sock, chunk, 40 * MiB)) for sock, chunk in sends
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        peak = memory(pid, "VmHWM")
        code, stderr = gateway.stop(signal.SIGTERM)
    assert peak - ready <= 64 * MiB + 64 * MiB, (ready, peak)
    ledger = ledger_of(stderr)
    # The stalled destination never reads, but the kernel's socket buffers take a few messages.
    assert ledger["balanced"] and ledger["delivered"] * 65536 <= 16 * MiB
    assert ledger["received"] * 65536 >= 32 * MiB * 0.9  # the queue's share filled up
    assert code == 3  # what the stalled sink never took is abandoned at the deadline


@pytest.mark.slow  # about 3 s
def test_sigterm_during_a_fast_tcp_stream_abandons_nothing_that_was_read(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """A client streams small frames as fast as it can into a small queue, so the connection
    is always waiting for room with a read in hand. SIGTERM: the grace period (0.3 s) ends
    with that read not queued; it waits for room until the drain deadline (0.3 + 10 s), not
    abandoned (issue 16: 15-20 thousand messages abandoned, the drain 8 s short)."""
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            *("--tcp", "127.0.0.1:0", "--sink", f"file:{out}", "--capacity", "2000"),
            *("--grace-period", "0.3", "--drain-timeout", "10", "--admin", "off"),
        ]
    )
    sock = socket.create_connection(("127.0.0.1", gateway.port("tcp")))
    chunk = b"0123456789abcdef\n" * 4096
    sender = threading.Thread(target=flood, args=(sock, chunk, 1 << 40))
    sender.start()
    deadline = time.monotonic() + 20
    while (not out.exists() or out.stat().st_size < 2 * MiB) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    code, stderr = gateway.stop(signal.SIGTERM)
    took = time.monotonic() - started
    sender.join(timeout=10)
    ledger = ledger_of(stderr)
    assert ledger["abandoned"] == 0 and ledger["balanced"], ledger
    assert code == 0
    assert ledger["received"] == ledger["delivered"] == len(out.read_bytes().splitlines())
    assert took < 0.3 + 5.0  # the grace period, then a queue of 2,000 to write


@pytest.mark.slow  # about 3 s
def test_a_slow_processor_does_not_hold_the_drain_past_its_deadline(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """A synchronous processor of 2 ms a message and the default batch (1,024 messages: 2 s
    without an await): the pump yields between messages, so the stop takes the grace period
    plus the drain timeout and a little, not a batch more (issue 16: 12.8 s for a 5 s
    deadline)."""
    (tmp_path / "slowproc.py").write_text(
        "import time\n\ndef slow(message):\n    time.sleep(0.002)\n    return message.payload\n"
    )
    gateway = serve(
        [
            *("--tcp", "127.0.0.1:0", "--sink", "null", "--processor", "slowproc:slow"),
            *("--grace-period", "0.2", "--drain-timeout", "1.0", "--admin", "off"),
        ],
        env={"PYTHONPATH": str(tmp_path)},
    )
    with socket.create_connection(("127.0.0.1", gateway.port("tcp"))) as sock:
        sock.sendall(b"message\n" * 5000)
        time.sleep(0.3)  # the pump is inside its first batch of 1,024
        started = time.monotonic()
        code, stderr = gateway.stop(signal.SIGTERM)
        took = time.monotonic() - started
    ledger = ledger_of(stderr)
    assert ledger["balanced"] and ledger["abandoned"] > 0 and code == 3
    assert took < 0.2 + 1.0 + 0.6, took  # the deadline, plus at most a checkpoint and exit


@pytest.mark.slow  # about 12 s: six clients start as subprocesses
def test_send_ends_with_its_summary_on_every_transport_when_serve_stops(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """The transports ``tests/e2e/test_cli.py::test_send_ends_with_its_summary_when_serve_stops``
    leaves out: SIGTERM to the gateway mid-run, each ``send`` prints its one-line summary
    (why it stopped) and exits 1, no traceback."""
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            *("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--http", "127.0.0.1:0"),
            *("--ws", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--sink", f"file:{out}"),
            *("--admin", "off"),
        ]
    )
    grpc = f"127.0.0.1:{gateway.port('grpc')}"
    runs = {
        "tcp": ["--tcp", f"127.0.0.1:{gateway.port('tcp')}"],
        "udp": ["--udp", f"127.0.0.1:{gateway.port('udp')}"],
        "http": ["--http", f"http://127.0.0.1:{gateway.port('http')}/ingest"],
        "ws-acks": ["--ws", f"ws://127.0.0.1:{gateway.port('websocket')}/", "--acks"],
        "unary": ["--grpc", grpc],
        "stream": ["--grpc", grpc, "--mode", "stream"],
    }
    send = [sys.executable, "-m", "trio_gateway", "send", "--count", "10000000", "--rate", "2000"]
    senders = {
        name: subprocess.Popen(
            [*send, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        for name, args in runs.items()
    }
    transports = ("tcp", "udp", "http", "websocket", "grpc")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        written = out.read_text() if out.exists() else ""
        if all(f'"transport":"{t}"' in written for t in transports):
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the client-streaming call has sent more than its first message
    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    for name, sender in senders.items():
        stdout, err = sender.communicate(timeout=60)
        assert sender.returncode == 1, (name, stdout, err)
        assert stdout.startswith("sent ") and stdout.count("\n") == 1, (name, stdout)
        assert err == "", (name, err)
        expected = "close 1001" if name == "ws-acks" else "; stopped: "
        assert expected in stdout, (name, stdout)
