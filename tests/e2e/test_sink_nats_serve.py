"""The NATS sink in programs: ``serve`` into JetStream, and publishing with no nats-py at all."""

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


def test_the_sink_publishes_without_nats_py(nats_server: NatsServer) -> None:
    """The sink speaks NATS itself: with nats-py unimportable it still publishes and is acked."""
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "import trio\n"
        "from trio_gateway import Batch, Origin\n"
        "from trio_gateway.sinks import NatsSink\n"
        "async def main():\n"
        f"    sink = NatsSink('{nats_server.url}/plain.in?stream=PLAIN&create=true')\n"
        "    await sink.open()\n"
        "    origin = Origin('tcp', 'tcp:x', 'p', 1.0)\n"
        "    await sink.send(Batch([b'a', b'b'], [(origin, 2)]))\n"
        "    await sink.aclose()\n"
        "    print(sink.stored, sink.duplicates)\n"
        "trio.run(main)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.split() == ["2", "0"]
    assert asyncio.run(stream_count(nats_server.url, "PLAIN")) == 2


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
