"""The command line: serve as a subprocess, shutdown ledger, config errors, send, check-config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import REPO, ServeProcess, read_payloads, wait_until_sync

from trio_gateway.loadgen import make_payload


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_gateway", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def ledger_of(stderr: str) -> dict[str, object]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger: dict[str, object] = json.loads(lines[0])["ledger"]
    return ledger


def test_sigterm_mid_stream_balances_and_keeps_every_delivered_message(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            f"file:{out}",
            "--grace-period",
            "0.2",
            "--capacity",
            "1000",
        ]
    )
    port = gateway.port("tcp")
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trio_gateway",
            "send",
            "--tcp",
            f"127.0.0.1:{port}",
            "--count",
            "50000",
            "--size",
            "64",
            "--rate",
            "40000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    # Stop in the middle of the stream (it takes over a second at 40,000 msg/s).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 100_000):
        time.sleep(0.02)
    code, stderr = gateway.stop(signal.SIGTERM)
    sender.kill()
    sender.communicate()
    assert code == 0, stderr
    ledger = ledger_of(stderr)
    assert ledger["balanced"] is True
    dropped = ledger["dropped"]
    assert isinstance(dropped, dict)
    assert ledger["received"] == ledger["delivered"] + sum(dropped.values()) + ledger["abandoned"]
    delivered = read_payloads(out)
    assert 0 < len(delivered) < 50_000
    assert len(delivered) == ledger["delivered"]
    # Byte-exact, in order, no gaps: exactly the first N messages the client sent.
    assert delivered == [make_payload(64, i) for i in range(len(delivered))]


def test_send_ends_with_its_summary_when_serve_stops(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    """SIGTERM to the gateway mid-run: each client prints its summary (what was accepted, and
    why it stopped) and exits 1, without a traceback."""
    out = tmp_path / "out.jsonl"
    gateway = serve(["--ws", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--sink", f"file:{out}"])
    ws, grpc = gateway.port("websocket"), gateway.port("grpc")
    runs = {
        "ws": ["--ws", f"ws://127.0.0.1:{ws}/"],
        "bidi": ["--grpc", f"127.0.0.1:{grpc}", "--mode", "bidi"],
    }
    send = [sys.executable, "-m", "trio_gateway", "send", "--count", "10000000", "--rate", "5000"]
    senders = {
        name: subprocess.Popen(
            [*send, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for name, args in runs.items()
    }
    # Stop once both have delivered something (the file sink writes what the gateway took).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        written = out.read_text() if out.exists() else ""
        if '"transport":"websocket"' in written and '"transport":"grpc"' in written:
            break
        time.sleep(0.05)
    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    for name, sender in senders.items():
        stdout, err = sender.communicate(timeout=60)
        assert sender.returncode == 1, (name, stdout, err)
        assert stdout.startswith("sent ") and stdout.count("\n") == 1, (name, stdout)
        assert "Traceback" not in err and err == "", (name, err)
        expected = "close 1001" if name == "ws" else "; stopped: 127.0.0.1:"
        assert expected in stdout, (name, stdout)


def test_embedded_defaults_listen_on_7000_and_7001(tmp_path: Path) -> None:
    # Checked without binding them: other programs on this machine may hold those ports.
    (tmp_path / "empty.toml").write_text("")
    checked = run_cli("check-config", str(tmp_path / "empty.toml"))
    assert checked.returncode == 0, checked.stderr
    assert "source: tcp on 127.0.0.1:7000\n" in checked.stdout
    assert "source: udp on 127.0.0.1:7001\n" in checked.stdout


def test_serve_and_send_tcp_and_udp(serve: type[ServeProcess]) -> None:
    gateway = serve(
        ["--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--sink", "null"]
    )
    tcp, udp = gateway.port("tcp"), gateway.port("udp")
    sent = run_cli("send", "--tcp", f"127.0.0.1:{tcp}", "--count", "1000", "--size", "100")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("sent 1000 messages, 100000 bytes in ")
    assert "msg/s" in sent.stdout and "MB/s" in sent.stdout
    sent = run_cli("send", "--udp", f"127.0.0.1:{udp}", "--count", "10", "--size", "30")
    assert sent.returncode == 0, sent.stderr
    wait_until_sync(lambda: gateway.received() == 1010, what="1010 messages received")
    code, stderr = gateway.stop(signal.SIGINT)
    assert code == 0
    ledger = ledger_of(stderr)
    assert ledger["received"] == ledger["delivered"] == 1010


def test_second_sigint_stops_at_once(tmp_path: Path, serve: type[ServeProcess]) -> None:
    # A sink that can never be reached: the drain would wait the whole drain timeout.
    gateway = serve(
        [
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            "tcp:127.0.0.1:9",
            "--drain-timeout",
            "60",
            "--grace-period",
            "0",
            "--admin",
            "127.0.0.1:0",
        ]
    )
    sent = run_cli("send", "--tcp", f"127.0.0.1:{gateway.port('tcp')}", "--count", "100")
    assert sent.returncode == 0
    gateway.proc.send_signal(signal.SIGINT)
    wait_until_sync(lambda: gateway.status("/readyz") == 503, what="the first SIGINT's drain")
    started = time.monotonic()
    _, stderr = gateway.stop(signal.SIGINT, timeout=10)
    assert time.monotonic() - started < 5
    ledger = ledger_of(stderr)
    assert ledger["received"] == 100
    assert ledger["abandoned"] == 100
    assert ledger["balanced"] is True


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["serve", "--capacity", "0"], "queue.capacity"),
        (["serve", "--tcp", "nonsense"], "--tcp"),
        (["serve", "--tcp", "127.0.0.1:99999"], "--tcp"),
        (["serve", "--sink", "kafka://x"], "sink"),
        (["serve", "--queue", "channel", "--policy", "drop-oldest"], "queue.policy"),
        (["serve", "--processor", "no_such_module_xyz:f"], "processor"),
        (["serve", "--drain-timeout", "-1"], "gateway.drain_timeout"),
        (["serve", "--policy", "sometimes"], "--policy"),
        (["send", "--tcp", "127.0.0.1:1", "--count", "-5"], "--count"),
    ],
)
def test_bad_flags_print_one_line_naming_the_key(args: list[str], key: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[queue]\ncapacity = 'big'\n", "queue.capacity"),
        ("[queue]\nkind = 'heap'\n", "queue.kind"),
        ("[queu]\ncapacity = 5\n", "config.queu"),
        ("[[sources]]\ntransport = 'carrier-pigeon'\n", "sources[0].transport"),
        ("[[sources]]\ntransport = 'tcp'\nlisten = ':70000'\n", "sources[0].listen"),
        ("[[sources]]\ntransport = 'tcp'\nframing = 'xml'\n", "sources[0].framing"),
        (
            "[[sources]]\ntransport = 'tcp'\nmax_connections = 'many'\n",
            "sources[0].max_connections",
        ),
        ("[[sources]]\ntransport = 'udp'\ncolour = 'blue'\n", "sources[0].colour"),
        ("[gateway]\ndrain_timeout = 'soon'\n", "gateway.drain_timeout"),
        ("[sink]\nurl = 'null'\nfsync = true\n", "sink.fsync"),
        ("[sink]\nurl = 'file:/tmp/x.jsonl'\nfsync = 'yes'\n", "sink.fsync"),
        ("this is not toml", "--config"),
    ],
)
def test_bad_config_prints_one_line_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = run_cli(*args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert key in lines[0]


def test_sink_flag_of_another_kind_than_the_config_options_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[sink]\nurl = 'file:{tmp_path / 'out.jsonl'}'\nfsync = true\n")
    result = run_cli("serve", "--config", str(path), "--sink", "null", "--tcp", "127.0.0.1:0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "trio_gateway: error: --sink: the config's [sink] options (fsync) are for its file "
        "sink, not null"
    ]


def test_check_config_prints_the_resolved_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[gateway]\ndrain_timeout = 3\n"
        "[queue]\nkind = 'locked-ring'\ncapacity = 50\npolicy = 'drop-oldest'\n"
        "[sink]\nurl = 'null'\n"
        "[[sources]]\ntransport = 'tcp'\nlisten = '127.0.0.1:0'\nframing = 'length'\n"
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "queue: locked-ring, capacity 50, policy drop-oldest" in result.stdout
    assert "source: tcp on 127.0.0.1:0, framing='length'" in result.stdout
    assert "drain timeout 3.0 s" in result.stdout


def test_processor_from_user_code(tmp_path: Path, serve: type[ServeProcess]) -> None:
    (tmp_path / "my_filters.py").write_text(
        "def upper_or_drop(message):\n"
        "    if message.payload.startswith(b'debug'):\n"
        "        return None\n"
        "    return message.payload.upper()\n"
    )
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            f"file:{out}",
            "--processor",
            "my_filters:upper_or_drop",
            "--admin",
            "127.0.0.1:0",
        ],
        env={"PYTHONPATH": str(tmp_path)},
    )
    port = gateway.port("tcp")
    done = threading.Event()

    def client() -> None:
        import socket

        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"hello\ndebug noise\nworld\n")
            sock.shutdown(socket.SHUT_WR)
            sock.recv(10)
        done.set()

    threading.Thread(target=client).start()
    assert done.wait(10)
    wait_until_sync(lambda: gateway.received() == 3, what="three lines received")
    code, stderr = gateway.stop()
    assert code == 0
    assert read_payloads(out) == [b"HELLO", b"WORLD"]
    ledger = ledger_of(stderr)
    assert ledger["dropped"] == {
        "drop_newest": 0,
        "drop_oldest": 0,
        "filtered": 1,
        "processor_error": 0,
        "sink_failed": 0,
    }


def test_serve_http_and_websocket_with_tokens_from_the_environment(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    from websockets.sync.client import connect

    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--http",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
            "--http-token",
            "env:GW_TOKEN",
            "--ws-token",
            "env:GW_TOKEN",
            "--sink",
            f"file:{out}",
            "--admin",
            "127.0.0.1:0",
        ],
        env={"GW_TOKEN": "s3cret"},
    )
    url = f"http://127.0.0.1:{gateway.port('http')}/ingest"
    accepted = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "%{http_code}",
            "-H",
            "Authorization: Bearer s3cret",
            "--data-binary",
            "over http",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert accepted.stdout.endswith("202"), accepted
    refused = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "no", url],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert refused.stdout == "401"
    ws_url = f"ws://127.0.0.1:{gateway.port('websocket')}/"
    with connect(ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
        ws.send(b"over websocket")
        ws.send("text too")
    wait_until_sync(lambda: gateway.received() == 3, what="three messages received")
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert "s3cret" not in stderr
    assert sorted(read_payloads(out)) == [b"over http", b"over websocket", b"text too"]
    ledger = ledger_of(stderr)
    assert ledger["rejected"] == {"unauthorized": 1}


def test_serve_tls_on_tcp_from_flags(tmp_path: Path, serve: type[ServeProcess]) -> None:
    import socket
    import ssl

    import trustme

    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1")
    cert_path, ca_path = tmp_path / "cert.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    authority.cert_pem.write_to_path(str(ca_path))
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--tcp",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert_path),
            "--sink",
            f"file:{out}",
            "--admin",
            "127.0.0.1:0",
        ]
    )
    context = ssl.create_default_context(cafile=str(ca_path))
    with (
        socket.create_connection(("127.0.0.1", gateway.port("tcp"))) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"secret one\nsecret two\n")
    wait_until_sync(lambda: gateway.received() == 2, what="two lines received")
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert read_payloads(out) == [b"secret one", b"secret two"]


def test_tls_flag_with_a_missing_file_names_the_key(tmp_path: Path) -> None:
    result = run_cli("serve", "--tcp", "127.0.0.1:0", "--tls-cert", str(tmp_path / "none.pem"))
    assert result.returncode == 2
    assert "certfile" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_burst_of_signals_still_ends_with_the_ledger(serve: type[ServeProcess]) -> None:
    gateway = serve(["--tcp", "127.0.0.1:0", "--sink", "null", "--grace-period", "0.5"])
    for _ in range(5):
        gateway.proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    code, stderr = gateway.stop(signal.SIGTERM, timeout=10)
    assert "Traceback" not in stderr
    assert ledger_of(stderr)["balanced"] is True
    assert code == 0
