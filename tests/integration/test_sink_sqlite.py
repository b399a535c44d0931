"""The SQLite sink: rows read back with plain sqlite3, a gateway in front of it over real TCP,
records that do not fit going to the dead-letter file without stalling their batch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import stream_lines_through

from trio_gateway import Batch, ConfigurationError, Gateway, Origin, SinkUnavailable, TcpSource
from trio_gateway._config import SinkConfig, build_sink
from trio_gateway.sinks import SqliteSink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


async def test_gateway_over_tcp_into_the_default_table_in_order(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    sink = SqliteSink(path)
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=300)
    lines = [b"reading %d" % i for i in range(2000)]
    await stream_lines_through(gateway, lines)
    assert gateway.ledger.delivered == len(lines) and sink.rows == len(lines)
    stored = rows(path, "SELECT transport, listener, peer, received_at, payload FROM messages")
    assert [r[4] for r in stored] == lines
    transport, listener, peer, received_at, _ = stored[0]
    assert (transport, listener) == ("tcp", gateway.sources[0].label)
    assert str(peer).startswith("127.0.0.1:") and float(str(received_at)) > 1.7e9
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]


async def test_json_columns_and_dead_letters_never_stall_the_batch(tmp_path: Path) -> None:
    path, dead = tmp_path / "iot.db", tmp_path / "dead.jsonl"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE readings (room TEXT NOT NULL, lux INTEGER, at REAL, raw TEXT) STRICT"
        )
    sink = SqliteSink(
        path,
        table="readings",
        columns={"room": "room", "lux": "light.lux", "at": "$received_at", "raw": "$text"},
        dead_letter=str(dead),
    )
    payloads = [
        b'{"room": "kitchen", "light": {"lux": 300}}',
        b"not json",  # not a JSON object
        b'{"light": {"lux": 5}}',  # NOT NULL room
        b'{"room": "hall", "light": {"lux": "bright"}}',  # STRICT: text in an INTEGER column
        b'{"room": "hall", "light": {"lux": 120}}',
    ]
    await sink.open()
    await sink.send(Batch(payloads, [(ORIGIN, len(payloads))]))
    await sink.aclose()
    assert rows(path, "SELECT room, lux, at FROM readings") == [
        ("kitchen", 300, ORIGIN.received_at),
        ("hall", 120, ORIGIN.received_at),
    ]
    assert sink.rows == 2 and sink.dead_lettered == 3
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [r["payload"].encode() for r in records] == payloads[1:4]
    assert "not JSON" in records[0]["reason"] and "NOT NULL" in records[1]["reason"]
    assert records[2]["peer"] == ORIGIN.peer


async def test_on_conflict_ignore_makes_a_retried_batch_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "ids.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")
    sink = SqliteSink(path, table="events", columns={"id": "id", "body": "$text"},
                      on_conflict="ignore")  # fmt: skip
    batch = Batch([b'{"id": %d}' % i for i in range(50)], [(ORIGIN, 50)])
    await sink.send(batch)  # opens on first use
    await sink.send(batch)
    await sink.aclose()
    assert rows(path, "SELECT count(*) FROM events") == [(50,)]


async def test_the_senders_id_as_a_unique_key_stores_a_resent_message_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ids.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE events (id TEXT UNIQUE, body BLOB)")
    sink = SqliteSink(path, table="events", columns={"id": "$id", "body": "$payload"},
                      on_conflict="ignore")  # fmt: skip
    first = Batch.of([(b"a", Origin("http", "h", "p", 1.0, "k:0")), (b"b", ORIGIN)])
    resent = Batch.of([(b"a", Origin("http", "h", "p", 2.0, "k:0")), (b"c", ORIGIN)])
    await sink.send(first)
    await sink.send(resent)  # another request, the same id: a crash's copy
    await sink.aclose()
    assert rows(path, "SELECT id, body FROM events ORDER BY rowid") == [
        ("k:0", b"a"),
        (None, b"b"),
        (None, b"c"),
    ]


async def test_open_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SinkUnavailable, match="unable to open database file"):
        await SqliteSink(tmp_path / "missing" / "x.db").open()
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE messages (body TEXT)")
    sink = SqliteSink(path, create=False)
    with pytest.raises(SinkUnavailable, match="no such column"):
        await sink.open()
    await sink.aclose()


def test_built_from_the_config_and_checked() -> None:
    sink = build_sink(
        SinkConfig("sqlite:/tmp/x.db", options={"table": "logs", "columns": {"msg": "message"}})
    )
    assert isinstance(sink, SqliteSink) and sink.spec.names == ("msg",)
    with pytest.raises(ConfigurationError, match=r"sink\.columns\.bad-name"):
        SqliteSink("x.db", columns={"bad-name": "x"})
    with pytest.raises(ConfigurationError, match=r"unknown '\$nope'"):
        SqliteSink("x.db", columns={"a": "$nope"})
    with pytest.raises(ConfigurationError, match=r"sink\.table"):
        SqliteSink("x.db", table="x; DROP TABLE y")
