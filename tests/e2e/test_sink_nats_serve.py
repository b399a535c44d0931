"""The NATS sink in programs: ``serve`` into JetStream, and a clear error without nats-py."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

from helpers import ServeProcess
from jetstream import NatsServer, stream_count, stream_messages


def test_missing_nats_py_is_one_config_error_naming_sink() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from trio_gateway import ConfigurationError\n"
        "from trio_gateway.sinks import NatsSink\n"
        "try:\n"
        "    NatsSink('nats://127.0.0.1:4222/a')\n"
        "except ConfigurationError as exc:\n"
        "    print(exc.key, '|', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.startswith("sink | sink: the nats sink needs nats-py")
    assert len(out.strip().splitlines()) == 1


def test_serve_with_the_nats_sink_then_sigterm(
    nats_server: NatsServer, serve: type[ServeProcess]
) -> None:
    url = f"{nats_server.url}/cli.in?stream=CLI&create=true"
    gateway = serve(["--tcp", "127.0.0.1:0", "--sink", url, "--admin", "off"])
    with socket.create_connection(("127.0.0.1", gateway.port("tcp")), timeout=10) as client:
        client.sendall(b"".join(b"cli %d\n" % i for i in range(1000)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if asyncio.run(stream_count(nats_server.url, "CLI")) >= 1000:
            break
        time.sleep(0.05)
    code, stderr = gateway.stop(signal.SIGTERM)
    assert code == 0, stderr
    ledger_line = next(line for line in stderr.splitlines() if line.startswith('{"ledger"'))
    ledger = json.loads(ledger_line)["ledger"]
    assert ledger["received"] == ledger["delivered"] == 1000
    messages = asyncio.run(stream_messages(nats_server.url, "CLI", "cli.in", 1000))
    assert [m.data for m in messages] == [b"cli %d" % i for i in range(1000)]
