"""The PostgreSQL sink against a real server (tests/pgserver.py): rows read back with a plain
psycopg connection, COPY batches through a gateway, dead letters, the idempotent upsert, and a
connection killed by the server between batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import stream_lines_through
from pgserver import PostgresServer

from trio_gateway import Batch, Gateway, Origin, SinkError, SinkUnavailable, TcpSource
from trio_gateway._config import SinkConfig, build_sink
from trio_gateway.sinks import PostgresSink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


async def test_gateway_over_tcp_copies_into_the_default_table(postgres: PostgresServer) -> None:
    sink = PostgresSink(postgres.url, table="tcp_default")
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=400)
    lines = [b"line %d" % i for i in range(3000)]
    await stream_lines_through(gateway, lines)
    assert gateway.ledger.delivered == len(lines) == sink.rows
    stored = postgres.query(
        "SELECT transport, listener, peer, received_at, payload FROM tcp_default"
    )
    assert sorted(bytes(r[4]) for r in stored) == sorted(lines)  # type: ignore[arg-type]
    assert {(r[0], r[1]) for r in stored} == {("tcp", gateway.sources[0].label)}


async def test_dead_letters_and_an_idempotent_upsert(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    postgres.execute(
        "CREATE TABLE logs (id int PRIMARY KEY, level text NOT NULL, code int, at double precision)"
    )
    dead = tmp_path / "dead.jsonl"
    sink = PostgresSink(
        postgres.url,
        table="logs",
        columns={"id": "id", "level": "level", "code": "code", "at": "$received_at"},
        upsert_key=["id"],
        dead_letter=str(dead),
    )
    good = [b'{"id": %d, "level": "info", "code": %d}' % (i, i) for i in range(200)]
    bad = [b"{oops", b'{"id": 900}', b'{"id": 901, "level": "warn", "code": "NaN-ish"}']
    payloads = good[:100] + bad + good[100:]
    batch = Batch(payloads, [(ORIGIN, len(payloads))])
    await sink.open()
    await sink.send(batch)
    await sink.send(batch)  # the pump's retry after a lost commit answer: no copies
    await sink.aclose()
    assert postgres.query("SELECT count(*), sum(code) FROM logs") == [(200, sum(range(200)))]
    assert (sink.rows, sink.duplicates, sink.dead_lettered) == (200, 200, 6)
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [r["payload"].encode() for r in records[:3]] == bad
    assert "not-null" in records[1]["reason"] and "integer" in records[2]["reason"]


async def test_a_killed_connection_is_retried_on_a_new_one(postgres: PostgresServer) -> None:
    sink = PostgresSink(postgres.url, table="reconnect")
    await sink.open()
    await sink.send(Batch([b"first"], [(ORIGIN, 1)]))
    postgres.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE pid <> pg_backend_pid() AND datname = 'postgres'"
    )
    with pytest.raises(SinkError):
        await sink.send(Batch([b"second"], [(ORIGIN, 1)]))
    # The pump retries the batch after its backoff; the attempt connects again.
    await sink.send(Batch([b"second"], [(ORIGIN, 1)]))
    await sink.aclose()
    assert sink.connects == 2
    assert postgres.query("SELECT payload FROM reconnect") == [(b"first",), (b"second",)]


async def test_open_fails_with_the_servers_reason(postgres: PostgresServer) -> None:
    sink = PostgresSink(postgres.url.replace("/postgres?", "/no_such_db?"))
    with pytest.raises(SinkUnavailable, match="no_such_db"):
        await sink.open()
    await sink.aclose()
    postgres.execute("CREATE TABLE narrow (body text)")
    sink = PostgresSink(postgres.url, table="narrow", columns={"level": "level"})
    with pytest.raises(SinkUnavailable, match='column "level" does not exist'):
        await sink.open()
    await sink.aclose()


def test_built_from_a_url() -> None:
    sink = build_sink(SinkConfig("postgresql://gw:pw@db/x", options={"upsert_key": ["id"],
                                 "columns": {"id": "id"}}))  # fmt: skip
    assert isinstance(sink, PostgresSink) and sink.name == "postgresql:gw:<redacted>@db/x"


async def test_copy_text_round_trips_any_bytes_and_origin(postgres: PostgresServer) -> None:
    odd = Origin("tc\tp", "tcp:\\x\n", "pe\rer", 1700000000.125)
    payloads = [bytes(range(256)), b"tab\there\nnew\\line", b"", b"\\x00"]
    sink = PostgresSink(postgres.url, table="odd_bytes")
    await sink.send(Batch(payloads * 2, [(odd, 4), (ORIGIN, 4)]))
    await sink.aclose()
    stored = postgres.query("SELECT transport, listener, peer, received_at, payload FROM odd_bytes")
    expected = [(o.transport, o.listener, o.peer, o.received_at, p)
                for o in (odd, ORIGIN) for p in payloads]  # fmt: skip
    assert [(*r[:4], bytes(r[4])) for r in stored] == expected  # type: ignore[arg-type]
