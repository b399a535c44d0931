"""What the database sinks share: which columns a message fills (the table spec), the rows of a
batch, and the dead-letter file for records that do not fit the table.

A column's value comes from the message's origin (``$transport``, ``$listener``, ``$peer``,
``$received_at``, and ``$id``: the sender's id, NULL without one), its payload (``$payload``
as bytes, ``$text`` as UTF-8 text) or a field of the payload parsed as a JSON object
(``"level"``, or ``"device.room"`` for a nested field).
Without ``columns`` a sink stores the JSON Lines record of the file sink: the four origin
fields and the payload's bytes (:data:`DEFAULT_COLUMNS`), which needs no parsing at all: the
rows of a run of messages are built by one comprehension over its payloads.
"""

from __future__ import annotations

import base64
import json
import os
import re
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._message import Batch, Origin
from ._base import Sink
from ._writes import _WriterThread

__all__ = ("DEFAULT_COLUMNS", "DatabaseSink", "DeadLetters", "Rejected", "TableSpec")

DEFAULT_COLUMNS: Mapping[str, str] = {
    "transport": "$transport",
    "listener": "$listener",
    "peer": "$peer",
    "received_at": "$received_at",
    "payload": "$payload",
}
"""The default schema: the JSON Lines record (docs/sinks.md), the payload as bytes."""
ORIGIN_SOURCES = ("$transport", "$listener", "$peer", "$received_at", "$id")
PAYLOAD_SOURCES = ("$payload", "$text")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELD = re.compile(r"[^.$][^.]*(\.[^.]+)*")

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that cannot become a row, and why (for the dead-letter file)."""

    payload: bytes
    origin: Origin
    reason: str


def check_identifier(name: str, *, key: str, dotted: bool = False) -> str:
    """``name`` if it is a plain SQL identifier (``schema.table`` when ``dotted``), else a
    :class:`ConfigurationError`: names are quoted, never interpolated from user input raw."""
    parts = name.split(".") if dotted else [name]
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise ConfigurationError(key, f"not a plain SQL identifier: {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class TableSpec:
    """The table a database sink writes and where each of its columns comes from."""

    table: str
    columns: tuple[tuple[str, str], ...]
    """``(column, source)`` in insert order."""

    @classmethod
    def build(cls, table: str, columns: Mapping[str, str] | None) -> TableSpec:
        check_identifier(table, key="sink.table", dotted=True)
        given = dict(DEFAULT_COLUMNS if columns is None else columns)
        if not given:
            raise ConfigurationError("sink.columns", "needs at least one column")
        for column, source in given.items():
            check_identifier(column, key=f"sink.columns.{column}")
            if not isinstance(source, str):
                raise ConfigurationError(f"sink.columns.{column}", f"expected a string: {source!r}")
            if source.startswith("$"):
                if source not in ORIGIN_SOURCES + PAYLOAD_SOURCES:
                    expected = ", ".join(ORIGIN_SOURCES + PAYLOAD_SOURCES)
                    raise ConfigurationError(
                        f"sink.columns.{column}", f"unknown {source!r}; expected {expected}"
                    )
            elif not _FIELD.fullmatch(source):
                raise ConfigurationError(f"sink.columns.{column}", f"bad JSON field {source!r}")
        return cls(table, tuple(given.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column for column, _ in self.columns)

    @property
    def is_default(self) -> bool:
        """Whether these are :data:`DEFAULT_COLUMNS` in their order (the sinks' fast path)."""
        return self.columns == _DEFAULT_ITEMS

    @property
    def parses_json(self) -> bool:
        """Whether some column is a field of the payload parsed as JSON."""
        return any(not source.startswith("$") for _, source in self.columns)

    def rows(self, batch: Batch) -> tuple[list[Row], list[Rejected]]:
        """The rows of ``batch`` in order, and the messages that cannot be rows (not JSON, not
        UTF-8 where a column wants text)."""
        rows: list[Row] = []
        rejected: list[Rejected] = []
        payloads = batch.payloads
        start = 0
        for origin, count in batch.runs:
            run = payloads[start : start + count]
            start += count
            if self.is_default:
                head = (origin.transport, origin.listener, origin.peer, origin.received_at)
                rows += [(*head, payload) for payload in run]
                continue
            for payload in run:
                try:
                    rows.append(self._row(payload, origin))
                except _Unfit as exc:
                    rejected.append(Rejected(payload, origin, str(exc)))
        return rows, rejected

    def _row(self, payload: bytes, origin: Origin) -> Row:
        document: Any = None
        if self.parses_json:
            try:
                document = json.loads(payload)
            except ValueError as exc:
                raise _Unfit(f"payload is not JSON: {exc}") from None
            if not isinstance(document, dict):
                raise _Unfit(f"payload is a JSON {type(document).__name__}, not an object")
        return tuple(_value(source, payload, origin, document) for _, source in self.columns)

    def messages(self, batch: Batch) -> tuple[list[tuple[Row, bytes, Origin]], list[Rejected]]:
        """Each message of ``batch`` with its row, and those that cannot be rows: the slow
        path, taken only when the database refused a batch and rows are tried apart."""
        items: list[tuple[Row, bytes, Origin]] = []
        rejected: list[Rejected] = []
        for payload, origin in batch:
            try:
                items.append((self._row(payload, origin), payload, origin))
            except _Unfit as exc:
                rejected.append(Rejected(payload, origin, str(exc)))
        return items, rejected


_DEFAULT_ITEMS = tuple(DEFAULT_COLUMNS.items())


class _Unfit(Exception):
    pass


def _value(source: str, payload: bytes, origin: Origin, document: Any) -> Any:
    if source == "$payload":
        return payload
    if source == "$text":
        try:
            return payload.decode()
        except UnicodeDecodeError:
            raise _Unfit("payload is not UTF-8 text") from None
    if source.startswith("$"):
        return getattr(origin, source[1:])
    value = document
    for part in source.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))  # a JSON column stores the text
    return value


class DeadLetters:
    """Where rejected records go: one JSON Lines record each (the file sink's record plus a
    ``reason``), appended to ``path``; without a path they are only counted and logged.

    Called from the sink's database thread, after the batch's transaction: a full disk here
    raises ``OSError``, and the pump retries the batch (its good rows again: the database
    sinks are at-least-once).
    """

    def __init__(self, path: str | None, *, log: Callable[[str], None]) -> None:
        self.path = path
        self.count = 0
        self._log = log

    def check(self) -> None:
        """Open the file once for appending (blocking: from the sink's thread)."""
        if self.path is not None:
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise OSError(f"dead-letter directory {directory} does not exist")
            with open(self.path, "ab"):
                pass

    def write(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        if self.path is not None:
            lines = [_record(r) for r in rejected]
            with open(self.path, "ab") as file:
                file.write(b"".join(lines))
        self.count += len(rejected)
        self._log(f"{len(rejected)} record(s) did not fit the table: {rejected[0].reason}")


def _record(rejected: Rejected) -> bytes:
    origin = rejected.origin
    record: dict[str, object] = {
        "reason": rejected.reason,
        "transport": origin.transport,
        "peer": origin.peer,
        "received_at": origin.received_at,
    }
    try:
        record["payload"] = rejected.payload.decode()
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(rejected.payload).decode("ascii")
    return json.dumps(record).encode() + b"\n"


class DatabaseSink(Sink):
    """What both database sinks share: the driver blocks, so every call runs in one thread
    of the sink's own for its lifetime (one hand-over per batch); the driver's errors become
    :class:`SinkUnavailable` in :meth:`open` and :class:`SinkError` (retried) in :meth:`send`.
    """

    _thread: _WriterThread | None = None

    @abstractmethod
    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions of the driver that mean "the database said no"."""

    @abstractmethod
    def _connect(self) -> None:
        """In the thread: connect, create and check the table."""

    @abstractmethod
    def _write_job(self, batch: Batch) -> Callable[[], None]:
        """Prepare ``batch`` (in the event loop) and return what writes it (in the thread)."""

    @abstractmethod
    def _close(self) -> None:
        """In the thread: close the connection."""

    async def _run(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = _WriterThread(f"trio_gateway {self.name}")
        await self._thread.run(job)

    async def open(self) -> None:
        errors: tuple[type[BaseException], ...] = (*self._driver_errors(), OSError)
        try:
            await self._run(self._connect)
        except errors as exc:
            await self.aclose()  # a later open (``sink_wait``) starts afresh
            raise SinkUnavailable(self.name, _first_line(exc)) from exc

    async def send(self, batch: Batch) -> None:
        job = self._write_job(batch)
        errors: tuple[type[BaseException], ...] = (*self._driver_errors(), OSError)
        try:
            await self._run(job)
        except errors as exc:
            raise SinkError(f"{self.name}: {_first_line(exc)}") from exc

    async def aclose(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            try:
                await thread.run(self._close)
            finally:
                await thread.aclose()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)
