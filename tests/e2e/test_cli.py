"""The command line: serve as a subprocess, shutdown ledger, config errors, send, check-config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def _vanishing_destination() -> tuple[socket.socket, threading.Thread]:
    """A TCP listener that accepts one connection (the sink's, at start) and then goes away
    with it: every later attempt of the sink is refused."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_then_vanish() -> None:
        conn, _ = listener.accept()
        listener.close()
        conn.close()

    thread = threading.Thread(target=accept_then_vanish, daemon=True)
    thread.start()
    return listener, thread


def test_second_sigint_stops_at_once_and_abandoned_messages_exit_3(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    # A sink that works at start and is then gone: the drain would wait the whole timeout.
    listener, vanished = _vanishing_destination()
    gateway = serve(
        [
            "--tcp",
            "127.0.0.1:0",
            "--sink",
            f"tcp:127.0.0.1:{listener.getsockname()[1]}",
            "--drain-timeout",
            "60",
            "--grace-period",
            "0",
            "--admin",
            "127.0.0.1:0",
        ]
    )
    vanished.join(10)
    sent = run_cli("send", "--tcp", f"127.0.0.1:{gateway.port('tcp')}", "--count", "100")
    assert sent.returncode == 0
    gateway.proc.send_signal(signal.SIGINT)
    wait_until_sync(lambda: gateway.status("/readyz") == 503, what="the first SIGINT's drain")
    started = time.monotonic()
    code, stderr = gateway.stop(signal.SIGINT, timeout=10)
    assert time.monotonic() - started < 5
    ledger = ledger_of(stderr)
    assert ledger["received"] == 100
    assert ledger["abandoned"] == 100
    assert ledger["balanced"] is True
    assert code == 3  # stopped, but messages were abandoned (docs/cli.md)


def test_a_bad_flag_and_a_bad_key_exit_2_with_one_line_from_the_real_command(
    tmp_path: Path,
) -> None:
    # tests/unit/test_cli_errors.py covers every case in-process; one of each kind here runs
    # `python -m trio_gateway` itself, as a user does.
    path = tmp_path / "gateway.toml"
    path.write_text("[queue]\ncapacity = 'big'\n")
    for args, key in (
        (["serve", "--capacity", "0"], "queue.capacity"),
        (["serve", "--config", str(path)], "queue.capacity"),
    ):
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
    # Read in either spelling, shown in one (docs/queues.md).
    assert "queue: locked_ring, capacity 50, policy drop_oldest" in result.stdout
    assert "admin: off (no [admin] listen)" in result.stdout
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
    assert "connection open" not in stderr  # websockets' INFO line per connection: kept quiet
    assert "WARNING" not in stderr
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


# -- mistakes answered by one line; sinks checked before ready (issue 19) ----------------------


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio_gateway: error: "), lines
    return lines[0].removeprefix("trio_gateway: error: ")


def test_a_sink_that_cannot_work_fails_serve_with_one_line_and_no_ledger(tmp_path: Path) -> None:
    unwritable = tmp_path / "ro"
    unwritable.mkdir()
    (unwritable / "out.jsonl").write_text("")
    (unwritable / "out.jsonl").chmod(0o444)
    refused = socket.create_server(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    for sink, cause in (
        (f"file:{tmp_path}/nonexistent/dir/out.jsonl", "directory"),
        (f"file:{tmp_path}", "is a directory"),
        (f"tcp:127.0.0.1:{port}", "connection refused"),
    ):
        started = time.monotonic()
        result = run_cli("serve", "--tcp", "127.0.0.1:0", "--admin", "off", "--sink", sink)
        assert result.returncode == 2, result
        line = _one_error_line(result)
        assert line.startswith(f"sink {sink}: "), line
        assert cause in line
        assert time.monotonic() - started < 10
    if os.geteuid() != 0:  # root writes anyway
        result = run_cli("serve", "--tcp", "127.0.0.1:0", "--sink", f"file:{unwritable}/out.jsonl")
        assert result.returncode == 2
        assert "permission denied" in _one_error_line(result)


def _readyz(port: int) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_sink_wait_keeps_readyz_503_with_the_reason_until_the_sink_comes(tmp_path: Path) -> None:
    admin = socket.create_server(("127.0.0.1", 0))
    admin_port = admin.getsockname()[1]
    admin.close()
    destination = socket.create_server(("127.0.0.1", 0))
    sink_port = destination.getsockname()[1]
    destination.close()  # refused until it listens again, below
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "trio_gateway", "serve", "--tcp", "127.0.0.1:0"),
            *("--admin", f"127.0.0.1:{admin_port}", "--sink", f"tcp:127.0.0.1:{sink_port}"),
            *("--sink-wait", "60"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("waiting up to 60 s" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        status, body = _readyz(admin_port)
        assert status == 503
        assert body.strip() == (
            f"not ready: waiting for the sink: sink tcp:127.0.0.1:{sink_port}: connection refused"
        )
        top = run_cli("top", "--admin", f"127.0.0.1:{admin_port}", "--once", "--interval", "0.1")
        assert "sink down" in top.stdout, top.stdout
        destination = socket.create_server(("127.0.0.1", sink_port))
        while not any(line.rstrip().endswith(": ready") for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert _readyz(admin_port) == (200, "ready\n")
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        destination.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sink_wait_that_runs_out_fails_with_one_line(tmp_path: Path) -> None:
    refused = socket.create_server(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()
    result = run_cli(
        "serve",
        "--tcp",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--sink",
        f"tcp:127.0.0.1:{port}",
        "--sink-wait",
        "0.5",
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert not any(line.startswith('{"ledger"') for line in lines), lines
    assert lines[-1] == (
        f"trio_gateway: error: sink tcp:127.0.0.1:{port}: connection refused (waited 0.5 s)"
    )


def test_a_closed_stdout_pipe_ends_serve_promptly_with_a_clear_line(
    serve: type[ServeProcess],
) -> None:
    gateway = serve(["--tcp", "127.0.0.1:0", "--admin", "off"])  # sink stdout
    assert gateway.proc.stdout is not None
    port = gateway.port("tcp")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"one\ntwo\n")
        assert gateway.proc.stdout.readline()  # `serve | head -1` ...
        gateway.proc.stdout.close()  # ... and head exits
        deadline = time.monotonic() + 20
        while gateway.proc.poll() is None and time.monotonic() < deadline:
            try:
                sock.sendall(b"three\n")
            except OSError:
                break
            time.sleep(0.05)
    code = gateway.proc.wait(timeout=20)
    assert gateway.proc.stderr is not None
    stderr = "".join(gateway.stderr_lines) + gateway.proc.stderr.read().decode()
    assert code == 1, stderr
    assert "trio_gateway: error: sink stdout: broken pipe" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert ledger_of(stderr)["balanced"] is True


def test_the_ledger_is_printed_once(serve: type[ServeProcess]) -> None:
    gateway = serve(["--tcp", "127.0.0.1:0", "--sink", "null", "--admin", "off"])
    code, stderr = gateway.stop()
    assert code == 0
    assert stderr.count('"ledger"') == 1, stderr


def test_version_and_a_bare_call() -> None:
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"trio_gateway {version('trio_gateway')}\n"
    bare = run_cli()
    assert bare.returncode == 2
    assert bare.stderr.startswith("usage: trio_gateway")
    for command in ("serve", "check-config", "send", "top"):
        assert command in bare.stderr


def test_check_config_names_a_missing_file_and_shows_the_admin_listener(tmp_path: Path) -> None:
    result = run_cli("check-config", "nosuch.toml")
    assert result.returncode == 2
    assert _one_error_line(result) == "nosuch.toml: cannot read: No such file or directory"
    path = tmp_path / "gateway.toml"
    path.write_text("[admin]\nlisten = '127.0.0.1:9200'\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "admin: http://127.0.0.1:9200/metrics, /healthz, /readyz" in result.stdout


def test_check_config_redacts_every_secret(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[sink]\nurl = 'https://user:hunter2@collector.example/ingest'\n"
        "token = 'sinktoken1'\nheaders = { Authorization = 'Basic c2VjcmV0', X-Team = 'ops' }\n"
        "[[sources]]\ntransport = 'http'\nlisten = '127.0.0.1:0'\ntoken = 'sourcetoken2'\n"
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2", "sinktoken1", "c2VjcmV0", "sourcetoken2"):
        assert secret not in result.stdout
    assert "https://user:<redacted>@collector.example/ingest" in result.stdout
    assert "'X-Team': 'ops'" in result.stdout
    nats = tmp_path / "nats.toml"
    nats.write_text("[sink]\nurl = 'nats://alice:s3cr3t@127.0.0.1:4222/telemetry'\n")
    result = run_cli("check-config", str(nats))
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout
    assert "nats://alice:<redacted>@127.0.0.1:4222/telemetry" in result.stdout


def test_a_udp_port_in_use_names_the_listener_and_prints_no_ledger() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("serve", "--udp", f"127.0.0.1:{port}", "--admin", "off", "--sink", "null")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert not any('"ledger"' in line for line in lines), lines
    assert lines[-1] == f"trio_gateway: error: udp 127.0.0.1:{port}: address already in use"


def test_policies_and_queue_kinds_are_read_in_both_spellings(tmp_path: Path) -> None:
    for policy in ("drop-oldest", "drop_oldest"):
        result = run_cli("serve", "--policy", policy, "--queue", "locked-ring", "--help")
        assert result.returncode == 0
    path = tmp_path / "gateway.toml"
    for spelled in ("drop-newest", "drop_newest"):
        path.write_text(f"[queue]\nkind = 'locked-list'\npolicy = '{spelled}'\n")
        result = run_cli("check-config", str(path))
        assert result.returncode == 0, result.stderr
        assert "queue: locked_list, capacity 10000, policy drop_newest" in result.stdout
    result = run_cli("serve", "--help")
    assert "{block,drop_newest,drop_oldest}" in result.stdout
    assert "ring|locked_ring|channel|locked_list|disk:DIR" in result.stdout
    path.write_text(f"[queue]\nkind = 'disk'\ndir = '{tmp_path}/q'\nfsync = 'interval'\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"queue: disk, capacity 10000, policy block, dir {tmp_path}/q, fsync interval" in (
        result.stdout
    )
    path.write_text("[queue]\nkind = 'disk'\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "queue.dir" in result.stderr
    result = run_cli("serve", "--queue", "disk", "--sink", "null")
    assert result.returncode == 2
    assert "--queue: the disk queue needs a directory: disk:DIR" in result.stderr


def test_top_on_an_80x24_terminal_fits_and_quits_on_q(serve: type[ServeProcess]) -> None:
    import fcntl
    import pty
    import re
    import struct
    import termios

    admin = socket.create_server(("127.0.0.1", 0))
    admin_port = admin.getsockname()[1]
    admin.close()
    serve(["--tcp", "127.0.0.1:0", "--sink", "null", "--admin", f"127.0.0.1:{admin_port}"])
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    top = subprocess.Popen(
        [
            *(sys.executable, "-m", "trio_gateway", "top"),
            *("--admin", f"127.0.0.1:{admin_port}", "--interval", "0.2"),
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "", "LINES": ""},
    )
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while b"msg/batch" not in screen or screen.count(b"q quit") < 2:
            assert time.monotonic() < deadline, screen.decode(errors="replace")
            screen += os.read(leader, 65536)
        os.write(leader, b"q")
        assert top.wait(timeout=10) == 0
        while True:  # what it drew before it read the q
            try:
                more = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side has closed
                break
            if not more:
                break
            screen += more
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    lines = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    starts = [i for i, line in enumerate(lines) if line.startswith("top ")]
    frames = [lines[a:b] for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]
    # The last whole frame: header, four tables, the sink's row last.
    frame = next(f for f in reversed(frames) if f[-1].startswith("null"))
    assert len(frame) <= 23, frame
    assert frame[0].startswith(f"top 127.0.0.1:{admin_port}") and "q quit" in frame[0]
    assert " up " in frame[-1], frame


def test_udp_framing_flag(tmp_path: Path, serve: type[ServeProcess]) -> None:
    out = tmp_path / "out.jsonl"
    gateway = serve(
        [
            "--udp",
            "127.0.0.1:0",
            "--udp-framing",
            "newline",
            "--sink",
            f"file:{out}",
            "--admin",
            "off",
        ]
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"x\n", ("127.0.0.1", gateway.port("udp")))  # as `echo x | nc -u` sends
        sock.sendto(b"a\nb\n", ("127.0.0.1", gateway.port("udp")))
    deadline = time.monotonic() + 10
    while len(read_payloads(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert read_payloads(out) == [b"x", b"a", b"b"]


def test_error_lines_redact_passwords_and_workers_check_the_sink_first(tmp_path: Path) -> None:
    for url in ("kafka://bob:pw123@host/topic", "nats://bob:pw123@host", "https://bob:pw123@"):
        result = run_cli("serve", "--sink", url)
        assert result.returncode == 2
        line = _one_error_line(result)
        assert "pw123" not in line and "bob:<redacted>@" in line, line
    missing = tmp_path / "missing" / "out.jsonl"
    result = run_cli("serve", "--workers", "2", "--tcp", "127.0.0.1:0", "--sink", f"file:{missing}")
    assert result.returncode == 2
    assert _one_error_line(result) == (
        f"sink file:{missing}: directory {missing.parent} does not exist"
    )
