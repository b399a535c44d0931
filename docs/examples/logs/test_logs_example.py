"""The logs example, end to end: ``serve`` runs logs.toml (ports and paths pointed at this
test's), a TCP client and an HTTP client send JSON log lines, and the lines are read back
from SQLite and PostgreSQL; the per-level counters are on /metrics; the README's picture is
what ``check-config --mermaid`` draws from logs.toml."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
from helpers import ServeProcess, wait_until_sync
from pgserver import PostgresServer

from trio_gateway._cli import main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def configured(tmp_path: Path, postgres: PostgresServer) -> Path:
    """logs.toml with this test's ports (0), files and database."""
    text = (HERE / "logs.toml").read_text()
    text = re.sub(r'listen = "127\.0\.0\.1:\d+"', 'listen = "127.0.0.1:0"', text)
    text = text.replace('"sqlite:logs.db"', f'"sqlite:{tmp_path / "logs.db"}"')
    text = text.replace('"logs.rejected.jsonl"', f'"{tmp_path / "rejected.jsonl"}"')
    text = text.replace("host=/var/run/postgresql", f"host={postgres.directory}")
    path = tmp_path / "logs.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_log_lines_over_tcp_and_http_land_in_both_databases(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    postgres.execute("DROP TABLE IF EXISTS logs")
    process = ServeProcess(["--config", str(configured(tmp_path, postgres))], env=ENV)
    try:
        tcp_lines = [
            {"level": "INFO", "service": "api", "message": f"request {i}"} for i in range(200)
        ]
        tcp_lines += [{"level": "debug", "message": "noise"}] * 50
        with socket.create_connection(("127.0.0.1", process.port("tcp"))) as client:
            client.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in tcp_lines))
            client.sendall(b"not json\n")
        batch = [{"level": "error", "service": "db", "message": f"failure {i}", "at": 1.5}
                 for i in range(30)]  # fmt: skip
        answer = httpx.post(
            f"http://127.0.0.1:{process.port('http')}/ingest",
            content=b"".join(json.dumps(r).encode() + b"\n" for r in batch),
            headers={"content-type": "application/x-ndjson"},
        )
        assert answer.status_code == 202, answer.text
        wait_until_sync(lambda: process.received() >= 281, what="every line received")
        metrics = httpx.get(f"http://127.0.0.1:{process.port('admin')}/metrics").text
        assert 'logs_lines_total{level="info"} 200.0' in metrics
        assert 'logs_lines_total{level="error"} 30.0' in metrics
        assert re.search(r'trio_gateway_received_messages_total\{[^}]*pipeline="logs"', metrics)
    finally:
        code, err = process.stop(signal.SIGTERM)
    assert code == 0, err
    report = next(json.loads(x) for x in err.splitlines() if x.startswith('{"pipeline"'))
    assert report["delivered"] == 230 and report["dropped"]["filtered"] == 50
    assert report["dropped"]["processor_error"] == 1  # "not json"
    with sqlite3.connect(tmp_path / "logs.db") as db:
        stored = db.execute("SELECT level, count(*) FROM logs GROUP BY level").fetchall()
        peer = db.execute("SELECT peer FROM logs WHERE service = 'api' LIMIT 1").fetchone()[0]
    assert sorted(stored) == [("error", 30), ("info", 200)]
    assert peer.startswith("127.0.0.1:")
    rows = postgres.query("SELECT level, count(*) FROM logs GROUP BY level ORDER BY level")
    assert rows == [("error", 30), ("info", 200)]


def test_the_readme_picture_is_drawn_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(HERE / "logs.toml"), "--mermaid"]) == 0
    drawn = capsys.readouterr().out
    readme = (HERE / "README.md").read_text()
    assert f"```mermaid\n{drawn}```" in readme
