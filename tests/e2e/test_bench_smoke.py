"""``python -m bench --smoke`` end to end, into a temporary directory.

Every row and every implementation of the full run (ours and each peer), at the smallest and
the largest size, one connection (the wire rows: one in flight), with very short runs: about
40 s here. ``--quick`` (every size, parallel too: about 3 minutes) is left to people, as the
suite must stay within minutes. It checks that the outputs are well formed, never the
timings: the JSON results, the generated blocks of docs/benchmarks.md, and the PNG charts
the page embeds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")  # the bench extra; the charts need it
pytestmark = pytest.mark.slow  # about 40 s: `pytest -m "not slow"` leaves it out

REPO = Path(__file__).resolve().parents[2]
SIZES = [18, 79435]
"""The sizes of a smoke run (the full run adds 4,266 and 6,786 bytes)."""
GRPC = ("trio_gateway", "grpcio", "asyncio")
ROWS = {
    "http": ("trio_gateway", "asyncio"),
    "grpc-unary": ("trio_gateway", "asyncio"),
    "udp": ("trio_gateway", "asyncio", "uvloop"),
    "tcp": ("trio_gateway", "asyncio"),
    "ws": ("trio_gateway", "asyncio"),
    "grpc-frames": GRPC,
    "grpc-stream": ("trio_gateway", "asyncio"),
    "tcp-file": ("trio_gateway", "asyncio"),
}
WIRE_ROWS = {
    "grpc-send": GRPC,
    "grpc-make": GRPC,
    "http-wire": ("trio_gateway", "uvicorn-httptools", "uvicorn-h11", "asyncio"),
    "h2c": ("trio_gateway", "asyncio"),
}
"""Rows measured at 18 B with requests or calls in flight (one, in a smoke run)."""
OPTIONAL = ("uvloop", "grpcio", "uvicorn-httptools", "uvicorn-h11")
"""Peers skipped, with a note, where their package is not installed."""
BLOCKS = ("machine", "summary", "transports", "peers", "cpu", "wire", "extras", "jsonl")
BLOCKS += ("targets", "queues", "go")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def _results(out: Path) -> dict[str, Any]:
    [path] = (out / "bench" / "results").glob("*.json")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}\.json", path.name)
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_results_json_has_every_case(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    document = _results(out)
    assert document["schema"] == 1 and document["mode"] == "smoke"
    assert document["machine"]["cores"] >= 1 and document["machine"]["python"]
    assert set(document["load"]) == {"start", "min", "median", "max", "end"}
    assert document["settings"]["sizes"] == SIZES
    found = {(r["row"], r["size"], r["parallel"], r["impl"]): r for r in document["results"]}
    cases = [
        (row, impl, size, parallel)
        for row, impls in ROWS.items()
        for impl in impls
        for size in SIZES
        for parallel in (False,)
    ]
    cases += [
        (row, impl, 18, parallel)
        for row, impls in WIRE_ROWS.items()
        for impl in impls
        for parallel in (False,)
    ]
    for row, impl, size, parallel in cases:
        result = found[(row, size, parallel, impl)]
        if row == "udp" and size > 65507:
            assert result["status"] == "n/a", result
        elif impl in OPTIONAL and result["status"] == "skipped":
            assert "not installed" in result["note"]
        else:
            # Measured: the samples carry numbers, whatever they are.
            assert result["status"] == "ok", result
            assert result["count"] > 0 and result["samples"]
            assert result["median_ns_per_op"] > 0
            assert result["median_cpu_ns_per_op"] > 0
            # Every client reported the CPU it spent (the page shows it beside the server's).
            assert result["median_client_cpu_ns_per_op"] > 0
            assert all(s["count"] <= s["sent"] for s in result["samples"])
        if row in WIRE_ROWS:
            assert result["inflight"] == (16 if parallel else 1)
    if shutil.which("socat"):
        assert found[("tcp", 79435, False, "socat")]["status"] == "ok"
    for target in document["targets"]:
        assert {"target", "value", "goal", "met", "note"} <= set(target)
    queues = document["queues"]
    assert queues["status"] == "ok"
    kinds = {(r["queue"], r["mode"]) for r in queues["results"]}
    for queue in ("deque", "ring", "locked_ring", "channel", "locked_list"):
        assert {(queue, mode) for mode in ("sync", "await", "batched")} <= kinds
    assert document["jsonl"]["status"] == "ok"
    assert [r["size"] for r in document["jsonl"]["results"]] == [18, 4266, 6786, 79435]


def test_page_blocks_and_charts(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    page = (out / "docs" / "benchmarks.md").read_text()
    for name in BLOCKS:
        body = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", page, re.S)
        assert body is not None and body[1].strip(), name
    table = re.search(r"<!-- bench:transports -->\n(.*?)<!-- /bench", page, re.S)
    assert table is not None
    for title in ("Unary HTTP", "Unary gRPC", "UDP", "Streaming TCP", "Streaming WebSocket"):
        assert f"| {title} | No |" in table[1]
    assert "| Streaming gRPC, batched DATA frames | No |" in table[1]
    wire = re.search(r"<!-- bench:wire -->\n(.*?)<!-- /bench", page, re.S)
    assert wire is not None
    for title in ("Unary gRPC, `Send`", "Unary HTTP/1.1, keep-alive", "Unary h2c"):
        assert f"| {title}" in wire[1] and "| 1 | 18 | **trio_gateway** |" in wire[1]
    assert "Do not quote its figures" in page  # a smoke run says so
    images = re.findall(r"\]\((img/[^)]+\.png)\)", page)
    assert images, "the page embeds the charts"
    for image in images:
        data = (out / "docs" / image).read_bytes()
        assert data.startswith(PNG) and 1_000 < len(data) < 300_000, image
