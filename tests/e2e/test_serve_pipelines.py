"""``serve`` with named pipelines from a TOML file: two pipelines, one fanning out to SQLite
and a JSON Lines file, real TCP and UDP clients, then SIGTERM and the ledgers."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
from pathlib import Path

import pytest
from helpers import ROUTED_PIPELINES, ServeProcess, read_payloads, wait_until_sync

from trio_gateway._cli import main

CONFIG = """
[admin]
listen = "127.0.0.1:0"

[pipelines.readings]
[[pipelines.readings.sources]]
transport = "tcp"
listen = "127.0.0.1:0"
[[pipelines.readings.sinks]]
url = "sqlite:{db}"
[[pipelines.readings.sinks]]
url = "file:{copy}"
queue = {{ capacity = 5000, policy = "drop_oldest" }}

[pipelines.raw]
[[pipelines.raw.sources]]
transport = "udp"
listen = "127.0.0.1:0"
[[pipelines.raw.sinks]]
url = "file:{raw}"
"""


def test_two_pipelines_fan_out_and_report_their_ledgers(
    tmp_path: Path, serve: type[ServeProcess]
) -> None:
    db, copy, raw = tmp_path / "r.db", tmp_path / "copy.jsonl", tmp_path / "raw.jsonl"
    config = tmp_path / "pipelines.toml"
    config.write_text(CONFIG.format(db=db, copy=copy, raw=raw))
    process = serve(["--config", str(config)])
    lines = [b"reading %d" % i for i in range(500)]
    with socket.create_connection(("127.0.0.1", process.port("tcp"))) as client:
        client.sendall(b"".join(line + b"\n" for line in lines))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for i in range(20):
            udp.sendto(b"datagram %d" % i, ("127.0.0.1", process.port("udp")))
    wait_until_sync(lambda: process.received() >= 500 + 20, what="every message received")
    code, err = process.stop(signal.SIGTERM)
    assert code == 0, err
    reports = [json.loads(line) for line in err.splitlines() if line.startswith('{"pipeline"')]
    by_name = {r["pipeline"]: r for r in reports}
    assert by_name["readings"]["delivered"] == 500 and by_name["raw"]["delivered"] == 20
    sinks = by_name["readings"]["sinks"]
    assert {s["delivered"] for s in sinks.values()} == {500}
    total = json.loads(err.strip().splitlines()[-1])["ledger"]
    assert total["received"] == 520 and total["balanced"]
    with sqlite3.connect(db) as conn:
        stored = [row[0] for row in conn.execute("SELECT payload FROM messages")]
    assert stored == lines
    assert read_payloads(copy) == lines
    assert sorted(read_payloads(raw)) == sorted(b"datagram %d" % i for i in range(20))


def test_check_config_prints_each_pipelines_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pipelines.toml"
    config.write_text(CONFIG.format(db="r.db", copy="c.jsonl", raw="raw.jsonl"))
    assert main(["check-config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "pipeline readings:\n  source: tcp on 127.0.0.1:0\n" in text
    assert "    -> fan-out to 2 sinks, each with its own queue:\n" in text
    assert "         -> sink: file:c.jsonl [queue: ring, capacity 5000, policy drop_oldest]" in text
    assert main(["check-config", str(config), "--mermaid"]) == 0
    drawn = capsys.readouterr().out
    assert drawn.startswith("flowchart LR\n") and 'subgraph p1 ["pipeline raw"]' in drawn
    assert main(["serve", "--config", str(config), "--sink", "null"]) == 2
    assert "--sink: the config has [pipelines]" in capsys.readouterr().err


def test_a_route_to_another_pipeline_is_drawn_served_and_counted_in_both_ledgers(
    tmp_path: Path, serve: type[ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    everything, alerts = tmp_path / "all.jsonl", tmp_path / "alerts.jsonl"
    config = tmp_path / "routed.toml"
    config.write_text(ROUTED_PIPELINES.format(all=everything, alerts=alerts))
    assert main(["check-config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "         -> sink: pipeline:alerts [queue: ring, capacity 10000, policy block]" in text
    assert "pipeline alerts:\n  source: routed from pipeline logs\n" in text
    process = serve(["--config", str(config)])
    lines = [
        b'{"level":"%s","n":%d}' % (b"error" if i % 4 == 0 else b"info", i) for i in range(400)
    ]
    with socket.create_connection(("127.0.0.1", process.port("tcp"))) as client:
        client.sendall(b"".join(line + b"\n" for line in lines))
    wait_until_sync(lambda: len(read_payloads(alerts)) == 100, what="the errors routed")
    code, err = process.stop(signal.SIGTERM)
    assert code == 0, err
    assert read_payloads(everything) == lines
    assert read_payloads(alerts) == lines[::4]
    reports = {
        r["pipeline"]: r
        for r in (json.loads(x) for x in err.splitlines() if x.startswith('{"pipeline"'))
    }
    assert reports["logs"]["routed_out"] == {"alerts": 100} and reports["logs"]["balanced"]
    assert reports["alerts"]["routed_in"] == {"logs": 100}
    assert reports["alerts"]["received"] == reports["alerts"]["delivered"] == 100
    assert reports["alerts"]["balanced"]
