"""The PostgreSQL sink: each batch written with ``COPY`` in one transaction (psycopg 3).

psycopg's connection is blocking here, run in one dedicated thread for the sink's lifetime
(one wake-up per batch; psycopg releases the GIL while it waits on the server). Its async
connection is asyncio's, and a batch is one COPY whichever side runs it.

Guarantees: a batch is committed whole or not at all (the good rows of it: see the dead
letters below), then ``send`` returns. A lost connection fails the batch; the pump retries
it with its backoff and the next attempt connects again. A commit whose answer was lost is
retried too, so the table can hold a batch twice: at-least-once. ``upsert_key`` makes the
retry idempotent: rows are copied into a temporary table and moved with ``INSERT ... ON
CONFLICT (key) DO NOTHING``.

A row the table refuses (a value of the wrong type, a NOT NULL or CHECK constraint: SQLSTATE
classes 22 and 23) fails the COPY. The sink then halves the batch, each half under a
savepoint, until the refused rows stand alone; they go to the dead letters and the rest is
committed: a few bad rows cost ``log2(batch)`` extra COPYs, never a stalled batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from .._log import RateLimitedLogger, logger
from .._message import Batch, Origin
from .._secrets import redact_url
from ._table import DatabaseSink, DeadLetters, Rejected, Row, TableSpec, check_identifier

if TYPE_CHECKING:
    import psycopg

__all__ = ("PostgresSink",)

_log = logger.getChild("sinks.postgres")
_dead_log = RateLimitedLogger(_log)
_TYPES = {
    "$transport": "text",
    "$listener": "text",
    "$peer": "text",
    "$received_at": "double precision",
    "$id": "text",
    "$payload": "bytea",
    "$text": "text",
}


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(
            "sink", f"the postgresql sink needs psycopg 3 (pip install 'psycopg[binary]'): {exc}"
        ) from exc
    return psycopg


def _quote(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


def _unfit(exc: BaseException) -> bool:
    """Whether ``exc`` says a row does not fit (data exception or integrity violation)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in ("22", "23")
    # Refused by psycopg before it reached the server (a NUL byte in text, a value it
    # cannot adapt).
    pg = _import_psycopg()
    return isinstance(exc, pg.DataError | pg.ProgrammingError | TypeError)


class PostgresSink(DatabaseSink):
    """Copies every message as a row of ``table`` into the PostgreSQL database at ``url``.

    ``PostgresSink("postgresql://gateway@db.internal/telemetry")`` stores the JSON Lines record
    (transport, listener, peer, received_at, payload as ``bytea``) in ``messages``, created
    when missing; ``columns={"level": "level", "msg": "message", "at": "$received_at"}`` stores
    fields of JSON payloads in an existing table. See the module docstring for the guarantees.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str = "messages",
        columns: Mapping[str, str] | None = None,
        create: bool = True,
        dead_letter: str | None = None,
        upsert_key: Sequence[str] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError("sink", "postgresql sink needs a postgresql:// URL")
        if connect_timeout <= 0:
            raise ConfigurationError("sink.connect_timeout", "must be positive")
        _import_psycopg()  # a missing psycopg is a configuration error, found before serving
        self.url = url
        self.spec = TableSpec.build(table, columns)
        self.create = create
        self.connect_timeout = connect_timeout
        self.upsert_key = tuple(upsert_key) if upsert_key is not None else None
        if self.upsert_key is not None:
            for column in self.upsert_key:
                check_identifier(column, key="sink.upsert_key")
                if column not in self.spec.names:
                    raise ConfigurationError(
                        "sink.upsert_key", f"{column!r} is not one of the columns"
                    )
        self.name = f"postgresql:{redact_url(url).split('://', 1)[1]}"
        self.rows = 0
        """Rows committed (with ``upsert_key``, new rows only)."""
        self.duplicates = 0
        """Rows an upsert found already stored (a retried batch's earlier copies)."""
        self.connects = 0
        self._dead = DeadLetters(dead_letter, log=lambda text: _dead_log.warning("%s", text))
        self._conn: psycopg.Connection[Any] | None = None
        names = ", ".join(_quote(n) for n in self.spec.names)
        target = _quote(table)
        if self.upsert_key is None:
            self._copy_sql = f"COPY {target} ({names}) FROM STDIN"
            self._move_sql = ""
        else:
            key = ", ".join(_quote(k) for k in self.upsert_key)
            self._copy_sql = f"COPY pg_temp.trio_gateway_stage ({names}) FROM STDIN"
            self._move_sql = (
                f"INSERT INTO {target} ({names}) SELECT {names} FROM pg_temp.trio_gateway_stage "
                f"ON CONFLICT ({key}) DO NOTHING"
            )

    @property
    def dead_lettered(self) -> int:
        return self._dead.count

    def statistics(self) -> dict[str, int]:
        """Counters for /metrics (``trio_gateway_sink_rows_total`` ...)."""
        return {
            "rows": self.rows,
            "dead_lettered": self._dead.count,
            "duplicates": self.duplicates,
            "connects": self.connects,
        }

    # -- in the sink's thread ---------------------------------------------------------------

    def _open_connection(self) -> psycopg.Connection[Any]:
        pg = _import_psycopg()
        conn: psycopg.Connection[Any] = pg.connect(
            self.url, connect_timeout=max(1, round(self.connect_timeout))
        )
        try:
            names = ", ".join(_quote(n) for n in self.spec.names)
            target = _quote(self.spec.table)
            with conn.transaction():
                if self.create:
                    columns = ", ".join(
                        f"{_quote(column)} {_TYPES.get(source, 'text')}"
                        for column, source in self.spec.columns
                    )
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {target} ({columns})")
                conn.execute(f"SELECT {names} FROM {target} LIMIT 0")
            if self.upsert_key is not None:
                conn.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS trio_gateway_stage AS "
                    f"SELECT {names} FROM {target} WITH NO DATA"
                )
                conn.execute(self._move_sql)  # checks the key has a unique index (42P10)
                conn.commit()
            self._dead.check()
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        return conn

    def _copy(self, conn: psycopg.Connection[Any], rows: Sequence[Row] | Batch) -> None:
        with conn.cursor() as cursor:
            with cursor.copy(self._copy_sql) as copy:
                if isinstance(rows, Batch):
                    copy.write(_copy_text(rows))
                else:
                    write_row = copy.write_row
                    for row in rows:
                        write_row(row)
            if self.upsert_key is not None:
                cursor.execute(self._move_sql)
                moved = max(cursor.rowcount, 0)
                self.duplicates += len(rows) - moved
                cursor.execute("TRUNCATE pg_temp.trio_gateway_stage")
            else:
                moved = len(rows)
        self.rows += moved

    def _copy_each(
        self, conn: psycopg.Connection[Any], items: list[tuple[Row, bytes, Origin]]
    ) -> list[Rejected]:
        """COPY ``items`` under a savepoint; when the table refuses one, halve and recurse."""
        try:
            with conn.transaction():
                self._copy(conn, [row for row, _, _ in items])
            return []
        except Exception as exc:
            if not _unfit(exc):
                raise
            if len(items) == 1:
                _, payload, origin = items[0]
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                return [Rejected(payload, origin, reason)]
            middle = len(items) // 2
            return self._copy_each(conn, items[:middle]) + self._copy_each(conn, items[middle:])

    def _send(self, rows: list[Row] | Batch, batch: Batch, rejected: list[Rejected]) -> None:
        pg = _import_psycopg()
        if self._conn is None or self._conn.closed:
            self._conn = self._open_connection()
        conn = self._conn
        rows_before, duplicates_before = self.rows, self.duplicates
        try:
            with conn.transaction():
                try:
                    with conn.transaction():  # a savepoint, so a refused COPY can be redone
                        self._copy(conn, rows)
                except Exception as exc:
                    if not _unfit(exc):
                        raise
                    self.rows, self.duplicates = rows_before, duplicates_before
                    items, rejected = self.spec.messages(batch)
                    rejected += self._copy_each(conn, items)
        except pg.Error:
            self.rows, self.duplicates = rows_before, duplicates_before
            if conn.closed or conn.broken:
                self._conn = None
            raise
        self._dead.write(rejected)

    def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    # -- the DatabaseSink hooks ---------------------------------------------------------------

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        pg = _import_psycopg()
        return (pg.Error,)

    def _connect(self) -> None:
        self._conn = self._open_connection()

    def _write_job(self, batch: Batch) -> Callable[[], None]:
        rows: list[Row] | Batch
        rows, rejected = (batch, []) if self.spec.is_default else self.spec.rows(batch)
        return lambda: self._send(rows, batch, rejected)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_text(batch: Batch) -> bytes:
    """The default schema's rows of ``batch`` in COPY's text format, built a run at a time:
    the origin's four fields are escaped once per run, and each payload is one ``hex()``
    (``bytea``'s ``\\x`` form), so no tuple or adapter call is made per row (1.1 to 1.3x
    psycopg's ``write_row``)."""
    parts: list[str] = []
    payloads = batch.payloads
    start = 0
    for origin, count in batch.runs:
        fields = (origin.transport, origin.listener, origin.peer)
        head = "\t".join(f.translate(_COPY_ESCAPES) for f in fields)
        head += f"\t{origin.received_at!r}\t\\\\x"
        parts += [head + payload.hex() for payload in payloads[start : start + count]]
        start += count
    parts.append("")
    return "\n".join(parts).encode()
