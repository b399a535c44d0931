"""Security properties, each proven against the real thing.

* Mutual TLS on every TLS listener (TCP, HTTP, WebSocket, gRPC): a client with a certificate
  from the configured CA is served; one without is refused at the handshake and counted
  (``tls_handshake``), and a client with a certificate from another CA too.
* Bearer tokens are compared in constant time: every check on HTTP, WebSocket and gRPC goes
  through ``hmac.compare_digest`` (a spy counts the calls), right token or wrong.
* Every listener binds 127.0.0.1 unless told otherwise (library defaults, CLI defaults, TOML).
* Every limit is on by default: every source (and the queue, the gateway, the admin endpoint)
  built with its defaults has finite, positive bounds.
* No secret is ever logged: ``serve --log-level debug`` with tokens on HTTP, WebSocket and gRPC,
  auth failing and succeeding on each, and the token appears nowhere on stderr.

This file holds what needs ``serve`` as a program; the properties proven in-process are in
tests/integration/test_security_listeners.py (mutual TLS, tokens, binding loopback) and
tests/unit/test_security_defaults.py (defaults and limits).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio
from helpers import (
    REPO,
    ServeProcess,
    grpc_with_token,
    http_with_token,
    wait_until_sync,
    ws_with_token,
)
from trio_websocket import open_websocket_url

TOKEN = "tok-5up3r-s3cr3t-value"


# -- no secret ever logged ------------------------------------------------------------------------


def test_no_secret_is_ever_logged_even_at_debug(tmp_path: Path, serve: type[ServeProcess]) -> None:
    env_token = "env-" + TOKEN
    gateway = serve(
        [
            *("--http", "127.0.0.1:0", "--ws", "127.0.0.1:0", "--grpc", "127.0.0.1:0"),
            *("--http-token", TOKEN, "--ws-token", TOKEN, "--grpc-token", "env:GW_GRPC_TOKEN"),
            *("--sink", f"file:{tmp_path / 'out.jsonl'}", "--log-level", "debug"),
            *("--admin", "127.0.0.1:0"),
        ],
        env={"GW_GRPC_TOKEN": env_token},
    )

    async def exercise() -> list[bool]:
        results = []
        for token in (TOKEN, "Bearer-less", TOKEN + "-wrong"):
            results.append(await http_with_token(("127.0.0.1", gateway.port("http")), token))
            results.append(await ws_with_token(("127.0.0.1", gateway.port("websocket")), token))
        # the query-string form of the WebSocket token
        port = gateway.port("websocket")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/?token={TOKEN}") as ws:
            await ws.send_message(b"by query")
        results.append(await grpc_with_token(("127.0.0.1", gateway.port("grpc")), env_token))
        results.append(await grpc_with_token(("127.0.0.1", gateway.port("grpc")), TOKEN))
        return results

    assert trio.run(exercise) == [True, True, False, False, False, False, True, False]
    wait_until_sync(lambda: gateway.received() == 4, what="the four accepted messages")
    code, stderr = gateway.stop()
    assert code == 0, stderr
    assert "debug" in stderr.lower(), "not running at debug level"
    for secret in (TOKEN, env_token, TOKEN[:12]):
        assert secret not in stderr, [line for line in stderr.splitlines() if secret in line][:3]


def test_check_config_does_not_print_secrets(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[sources]]\ntransport = "http"\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "trio_gateway", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "source: http" in result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_check_config_redacts_sink_secrets(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[sink]\nurl = "nats://alice:hunter2-pw@127.0.0.1:4222/events"\n'
        '[[sources]]\ntransport = "tcp"\nlisten = "127.0.0.1:0"\n'
    )
    http = tmp_path / "http.toml"
    http.write_text(
        f'[sink]\nurl = "https://collector.example/ingest"\ntoken = "{TOKEN}"\n'
        f'headers = {{ Authorization = "Basic {TOKEN}", X-Tenant = "blue" }}\n'
        '[[sources]]\ntransport = "tcp"\nlisten = "127.0.0.1:0"\n'
    )
    outputs = []
    for path in (config, http):
        result = subprocess.run(
            [sys.executable, "-m", "trio_gateway", "check-config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "sink: nats://alice:<redacted>@127.0.0.1:4222/events" in outputs[0]
    assert "hunter2-pw" not in outputs[0]
    assert TOKEN not in outputs[1] and "'X-Tenant': 'blue'" in outputs[1]
