"""``send`` as a program: the load client run from the command line against ``serve``."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import ServeProcess

from trio_gateway._cli import main

TOKEN = "s3cret-token"


def test_cli_every_transport_against_serve(
    serve: type[ServeProcess], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = serve(
        [
            "--http",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--grpc-token",
            "env:SEND_CLI_TOKEN",
            "--sink",
            "null",
            "--admin",
            "off",
        ],
        env={"SEND_CLI_TOKEN": TOKEN},
    )
    http = f"http://127.0.0.1:{gateway.port('http')}/ingest"
    runs = [
        (["--http", http, "--count", "100", "--ndjson", "10"], 0, "accepted 100, rejected 0"),
        (["--ws", f"ws://127.0.0.1:{gateway.port('websocket')}/", "--count", "200"], 0, None),
        (
            ["--grpc", f"127.0.0.1:{gateway.port('grpc')}", "--mode", "bidi", "--count", "300"],
            1,
            "accepted 0, rejected 300 (UNAUTHENTICATED: 300)",
        ),
    ]
    for args, code, text in runs:
        assert main(["send", *args]) == code
        out = capsys.readouterr().out
        assert out.startswith("sent "), out
        if text is not None:
            assert text in out
    monkeypatch.setenv("SEND_CLI_TOKEN", TOKEN)
    grpc = ["--grpc", f"127.0.0.1:{gateway.port('grpc')}", "--token", "env:SEND_CLI_TOKEN"]
    assert main(["send", *grpc, "--mode", "stream", "--count", "400"]) == 0
    assert "accepted 400, rejected 0" in capsys.readouterr().out
    code, stderr = gateway.stop(signal.SIGINT)
    assert code == 0
    lines = [line for line in stderr.splitlines() if line.startswith('{"ledger"')]
    assert len(lines) == 1, stderr
    ledger = json.loads(lines[0])["ledger"]
    assert ledger["received"] == ledger["delivered"] == 100 + 200 + 400
    assert ledger["rejected"]["unauthorized"] == 1  # the one bidi call without the token


def test_cli_send_ws_acks_against_serve(
    serve: type[ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = serve(["--ws", "127.0.0.1:0", "--sink", "null", "--admin", "off"])
    url = f"ws://127.0.0.1:{gateway.port('websocket')}/"
    assert main(["send", "--ws", url, "--acks", "--count", "3000", "--concurrency", "3"]) == 0
    assert "accepted 3000, rejected 0" in capsys.readouterr().out
    assert main(["send", "--tcp", "127.0.0.1:1", "--acks"]) == 2
    assert "--acks" in capsys.readouterr().err
    code, stderr = gateway.stop()
    assert code == 0
    ledger = json.loads(next(ln for ln in stderr.splitlines() if ln.startswith('{"ledger"')))
    assert ledger["ledger"]["received"] == ledger["ledger"]["delivered"] == 3000


def test_cli_wrong_path_and_wrong_transport_exit_1_with_one_line(
    serve: type[ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = serve(["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0", "--admin", "off"])
    ws, tcp = gateway.port("websocket"), gateway.port("tcp")
    runs = [
        (["--ws", f"ws://127.0.0.1:{ws}/nope"], "handshake was refused with 404 (wrong path?)"),
        (["--http", f"http://127.0.0.1:{tcp}/ingest", "--timeout", "1"], "wrong transport?"),
        (["--grpc", f"127.0.0.1:{ws}"], "not an HTTP/2 answer: wrong transport?"),
    ]
    for args, says in runs:
        assert main(["send", *args, "--count", "3"]) == 1
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert captured.out == "" and len(err) == 1 and says in err[0], captured
