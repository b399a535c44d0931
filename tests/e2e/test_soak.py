"""The 30-second soak: ``python -m bench.soak`` against ``serve``, as CI can afford it.

Every transport streams at a fixed rate for 30 s; after a 10 s warm-up the gateway's resident
memory must stay flat (grow by at most ``MAX_GROWTH_MIB``), nothing may be lost on loopback, and
the shutdown ledger must balance. The full soak (10 minutes by default) is the same program:
``python -m bench.soak`` (see docs/reliability.md). Marked slow: ``pytest -m "not slow"`` leaves
it out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

DURATION = 30
RATE = 500
"""Messages per second per transport (five transports)."""
MAX_GROWTH_MIB = 4.0
"""Measured growth after warm-up is 0.1-0.3 MiB; a leak of 100 bytes per message would add
about 5 MiB over the 20 s that count."""


@pytest.mark.slow
def test_soak_30_seconds_every_transport_memory_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.soak", "--duration", str(DURATION)),
            *("--rate", str(RATE), "--sample", "2", "--warmup", "10"),
            *("--max-growth", str(MAX_GROWTH_MIB), "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DURATION + 90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    samples = report["samples"]
    assert len(samples) >= DURATION // 2 - 1
    after = [s["rss_mib"] for s in samples if s["t"] >= 10]
    assert max(after) - after[0] <= MAX_GROWTH_MIB, after
    # Throughput: each transport carried its rate, and loopback lost nothing.
    final = samples[-1]["received"]
    for transport, sent in report["sent"].items():
        assert sent >= RATE * DURATION * 0.95, (transport, sent)
        assert final[transport] == sent, (transport, sent, final[transport])
    assert report["accepted"] == {"http": report["sent"]["http"], "grpc": report["sent"]["grpc"]}
    ledger = report["ledger"]
    assert ledger["balanced"] is True and ledger["received"] == sum(report["sent"].values())
    assert ledger["rejected"] == {} and sum(ledger["dropped"].values()) == 0
