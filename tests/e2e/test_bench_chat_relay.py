"""``python -m bench.chat_relay`` end to end, with every relay it compares, at a low rate and
for a moment: that each relay passes every message on, and that the report holds a row per
relay and the gateway's ratios to each peer. Never the timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nats")  # the peers' client (the bench extra; the test extra has it too)
pytestmark = pytest.mark.slow  # five processes per relay: about 15 s

REPO = Path(__file__).resolve().parents[2]
RELAYS = ("gateway", "asyncio", "direct")


def test_every_relay_passes_every_message_on(tmp_path: Path) -> None:
    out = tmp_path / "relay.json"
    command = [sys.executable, "-m", "bench.chat_relay", "--rates", "200", "--seconds", "0.5"]
    command += ["--relays", ",".join(RELAYS), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["relay"] for r in results] == list(RELAYS)
    for r in results:
        assert r["received"] == r["sent"] == 100, r
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    gateway = results[0]["cpu_percent"]
    assert {"nats-server", "A", "B", "senders", "receiver"} <= set(gateway)
    assert "A" not in results[2]["cpu_percent"]  # direct: no relay processes
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[1:4]] == list(RELAYS)
    assert "gateway / asyncio: p50, p99, relay CPU" in done.stdout
    assert "gateway / direct: p50, p99, relay CPU" in done.stdout
