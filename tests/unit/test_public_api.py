"""The public surface: what `import trio_gateway` offers, and the README's example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

import trio_gateway


def test_exported_names() -> None:
    assert isinstance(trio_gateway.__all__, tuple)
    public = {n for n in dir(trio_gateway) if not n.startswith(("_", "@"))}
    # Subpackages are reachable as attributes once imported; they are not part of __all__.
    modules = {"admin", "codecs", "loadgen", "queues", "sinks", "sources", "testing"}
    assert set(trio_gateway.__all__) - {"__version__"} == public - modules
    assert {
        "Gateway",
        "Ledger",
        "Message",
        "Origin",
        "Batch",
        "RingBuffer",
        "ChannelQueue",
        "LockedRingBuffer",
        "LockedListQueue",
        "TcpSource",
        "UdpSource",
        "HttpSource",
        "WebSocketSource",
        "GrpcSource",
        "FileSink",
        "StdoutSink",
        "NullSink",
        "TcpSink",
        "GatewayError",
        "ConfigurationError",
        "ProtocolError",
        "FrameTooLarge",
        "SinkError",
        "TransportError",
    } <= set(trio_gateway.__all__)


def test_one_error_tree() -> None:
    for name in (
        "ConfigurationError",
        "ProtocolError",
        "FrameTooLarge",
        "SinkError",
        "TransportError",
    ):
        assert issubclass(getattr(trio_gateway, name), trio_gateway.GatewayError)


def test_readme_example_runs_and_matches_the_file() -> None:
    example = REPO / "docs" / "examples" / "embed.py"
    readme = (REPO / "README.md").read_text()
    body = example.read_text().split('"""', 2)[2].strip()  # the file minus its docstring
    assert body in readme, "README.md must show docs/examples/embed.py as it is"
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    first, last = result.stdout.strip().splitlines()
    assert json.loads(first)["payload"] == '{"level":"error","msg":"disk full"}'
    ledger = json.loads(last)["ledger"]
    assert ledger["received"] == 2 and ledger["delivered"] == 1
    assert ledger["dropped"]["filtered"] == 1 and ledger["balanced"] is True


def test_tutorial_processor_matches_the_docs_and_filters(tmp_path: Path) -> None:
    tutorial = (REPO / "docs" / "tutorial.md").read_text()
    source = (REPO / "docs" / "examples" / "filters.py").read_text()
    assert source.split('"""', 2)[2].strip() in tutorial
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_WITH_FILTER, str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "docs" / "examples")},
    )
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(json.loads(lines[0])["payload"]) == {
        "device": "lamp-1",
        "lux": 310,
        "gateway": "edge-7",
    }


_SERVE_WITH_FILTER = """
import sys, trio
from filters import bright_only
from trio_gateway import FileSink, Gateway, TcpSource

async def main():
    gateway = Gateway(sources=[TcpSource()], sink=FileSink(sys.argv[1]), processor=bright_only)
    async with trio.open_nursery() as nursery:
        [[address]] = await nursery.start(gateway.run)
        async with await trio.open_tcp_stream(*address) as client:
            await client.send_all(
                b'{"device":"lamp-1","lux":310}\\n{"device":"lamp-2","lux":12}\\n'
            )
        gateway.shutdown()
    assert gateway.ledger.dropped["filtered"] == 1

trio.run(main)
"""
