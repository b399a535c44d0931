"""Rows per second of the database sinks, beside plain loops writing the same rows.

    python -m bench.sinks_db [--rows N] [--repeats N] [--batch N] [--postgres URL] [--json FILE]

Every case writes ``--rows`` messages of 18 bytes with one origin, as the default schema's
rows (transport, listener, peer, received_at, payload), in batches of ``--batch``, into a
fresh table, one transaction per batch:

* SQLite, ``SqliteSink.send`` from Trio (WAL, synchronous=NORMAL; the sink's thread), against
  plain ``sqlite3`` in the main thread with the same pragmas: ``execute`` per row, and
  ``executemany`` per batch;
* PostgreSQL, ``PostgresSink.send`` (COPY per batch, the sink's thread) against plain psycopg:
  ``executemany`` of an INSERT per batch, and ``copy.write_row`` per row in a COPY per batch.

The plain loops run without an event loop or a thread hop: the best case for them. Without
``--postgres``, a server is started in a temporary directory as the test suite does
(tests/pgserver.py; PostgreSQL's ``postgres`` and ``initdb`` must be installed). The figure
is the median over ``--repeats`` of rows per second.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    raise SystemExit("run it from the repository root as a module: python -m bench.sinks_db")

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import psycopg
import trio

from trio_gateway import Batch, Origin
from trio_gateway.sinks import PostgresSink, SqliteSink

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:51234", 1_700_000_000.123456)
PAYLOAD = b'{"t":21.5,"id":7}'.ljust(18)
CREATE_SQLITE = (
    "CREATE TABLE {t} (transport TEXT, listener TEXT, peer TEXT, received_at REAL, payload BLOB)"
)
CREATE_PG = (
    "CREATE TABLE {t} (transport text, listener text, peer text, "
    "received_at double precision, payload bytea)"
)
INSERT = "INSERT INTO {t} (transport, listener, peer, received_at, payload) VALUES ({m})"


def batches(rows: int, size: int) -> list[Batch]:
    return [
        Batch([PAYLOAD] * min(size, rows - start), [(ORIGIN, min(size, rows - start))])
        for start in range(0, rows, size)
    ]


def plain_rows(batch: Batch) -> list[tuple[object, ...]]:
    head = (ORIGIN.transport, ORIGIN.listener, ORIGIN.peer, ORIGIN.received_at)
    return [(*head, p) for p in batch.payloads]


class Connection(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


def loop_case(
    fresh: Callable[[], tuple[C, str]],
    write: Callable[[C, str, Batch], None],
    work: list[Batch],
    rows: int,
) -> Callable[[], float]:
    """A plain loop: ``fresh()`` gives a connection and a new table, ``write`` one batch's
    transaction; rows per second over ``work``."""

    def case() -> float:
        db, table = fresh()
        try:
            started = time.perf_counter()
            for batch in work:
                write(db, table, batch)
            return rows / (time.perf_counter() - started)
        finally:
            db.close()

    return case


def sink_case(
    make: Callable[[], SqliteSink | PostgresSink], work: list[Batch], rows: int
) -> Callable[[], float]:
    """The sink, as the gateway's pump drives it (``send`` per batch, from Trio)."""

    def case() -> float:
        async def main() -> float:
            sink = make()
            await sink.open()
            try:
                started = time.perf_counter()
                for batch in work:
                    await sink.send(batch)
                return rows / (time.perf_counter() - started)
            finally:
                await sink.aclose()

        return trio.run(main)

    return case


# -- SQLite ---------------------------------------------------------------------------------


def sqlite_cases(directory: Path, work: list[Batch], rows: int) -> dict[str, Callable[[], float]]:
    counter = iter(range(1_000_000))
    sql = INSERT.format(t="messages", m="?, ?, ?, ?, ?")

    def fresh() -> tuple[sqlite3.Connection, str]:
        db = sqlite3.connect(directory / f"plain{next(counter)}.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(CREATE_SQLITE.format(t="messages"))
        return db, "messages"

    def per_row(db: sqlite3.Connection, table: str, batch: Batch) -> None:
        db.execute("BEGIN")
        for row in plain_rows(batch):
            db.execute(sql, row)
        db.execute("COMMIT")

    def executemany(db: sqlite3.Connection, table: str, batch: Batch) -> None:
        db.execute("BEGIN")
        db.executemany(sql, plain_rows(batch))
        db.execute("COMMIT")

    return {
        "SqliteSink": sink_case(
            lambda: SqliteSink(directory / f"sink{next(counter)}.db"), work, rows
        ),
        "sqlite3 execute per row": loop_case(fresh, per_row, work, rows),
        "sqlite3 executemany": loop_case(fresh, executemany, work, rows),
    }


# -- PostgreSQL -----------------------------------------------------------------------------

PgConnection = psycopg.Connection[tuple[object, ...]]


def postgres_cases(url: str, work: list[Batch], rows: int) -> dict[str, Callable[[], float]]:
    counter = iter(range(1_000_000))

    def fresh() -> tuple[PgConnection, str]:
        table = f"plain{next(counter)}"
        conn = psycopg.connect(url)
        conn.execute(CREATE_PG.format(t=table))
        conn.commit()
        return conn, table

    def executemany(conn: PgConnection, table: str, batch: Batch) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(INSERT.format(t=table, m="%s, %s, %s, %s, %s"), plain_rows(batch))
        conn.commit()

    def copy_rows(conn: PgConnection, table: str, batch: Batch) -> None:
        sql = f"COPY {table} (transport, listener, peer, received_at, payload) FROM STDIN"
        with conn.cursor() as cursor, cursor.copy(sql) as copy:
            for row in plain_rows(batch):
                copy.write_row(row)
        conn.commit()

    return {
        "PostgresSink": sink_case(
            lambda: PostgresSink(url, table=f"sink{next(counter)}"), work, rows
        ),
        "psycopg executemany": loop_case(fresh, executemany, work, rows),
        "psycopg COPY write_row": loop_case(fresh, copy_rows, work, rows),
    }


@contextmanager
def postgres_server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from pgserver import PostgresServer  # the test suite's: initdb + postgres as non-root

    server = PostgresServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def measure(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so a busy moment hits every case alike
        for name, case in cases.items():
            runs[name].append(case())
    return {name: statistics.median(rates) for name, rates in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sinks_db", description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--postgres", help="a postgresql:// URL (default: start a server)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = batches(args.rows, args.batch)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        results["sqlite"] = measure(sqlite_cases(Path(directory), work, args.rows), args.repeats)
    with postgres_server(args.postgres) as url:
        results["postgresql"] = measure(postgres_cases(url, work, args.rows), args.repeats)
    print(f"{args.rows} rows of {len(PAYLOAD)} B, batches of {args.batch}, ", end="")
    print(f"median of {args.repeats}")
    print("| database | writer | rows/s | vs best plain loop |\n|---|---|---:|---:|")
    for database, rates in results.items():
        plain = list(rates)[1:]  # the first is the sink
        best = max(rates[name] for name in plain)
        for name, rate in rates.items():
            print(f"| {database} | {name} | {rate:,.0f} | {rate / best:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
