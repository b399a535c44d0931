"""The disk queue's index and its two threads: the writer, and the one that fsyncs.

Payloads go to append-only segment files (:mod:`._segments`); SQLite (WAL mode) holds one
small row per run: its origin, where its record is (segment, offset, CRC-32) and how much of
its head is settled. The writer thread appends a group of runs to the current segment, then
commits their rows in one transaction with ``synchronous=NORMAL`` (no ``fsync``); the syncer
thread then ``fdatasync``\\ s the segments and the log, and only then reports the group
stored. While it waits for the disk the writer appends and commits the next group: the disk
and the CPU work at once (docs/queues.md#the-disk-queue has the figures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Literal, get_args

import trio
from trio.lowlevel import TrioToken

from .._log import logger
from .._message import Origin
from ._segments import SEGMENT_BYTES, Segments, pack

__all__ = ("FSYNC_POLICIES", "FsyncPolicy", "Run", "Writer")

_log = logger.getChild("queues.disk")

FsyncPolicy = Literal["always", "batch", "interval"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = get_args(FsyncPolicy)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queued_runs (
    id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    skip INTEGER NOT NULL DEFAULT 0,
    transport TEXT NOT NULL,
    listener TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    message_id TEXT,
    segment INTEGER NOT NULL,
    start INTEGER NOT NULL,
    crc INTEGER NOT NULL
)
"""
_COLUMNS = "id, count, nbytes, skip, transport, listener, peer, received_at, message_id"
_INSERT = (
    # OR IGNORE: a group that failed part-way under "always" is tried again whole.
    f"INSERT OR IGNORE INTO queued_runs ({_COLUMNS}, segment, start, crc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RETRY_DELAY = (0.05, 2.0)
"""Seconds a thread waits before trying a failed write or fsync again: first, and at most."""


class Run:
    """One row: a run of messages from one origin, and how far it has been taken and settled."""

    __slots__ = (
        "count",
        "crc",
        "freed",
        "id",
        "nbytes",
        "origin",
        "payloads",
        "segment",
        "seq_end",
        "settled",
        "spill",
        "start",
        "stored",
        "taken",
    )

    def __init__(
        self,
        run_id: int,
        origin: Origin,
        payloads: list[bytes] | None,
        count: int,
        nbytes: int,
        seq_end: int,
    ) -> None:
        self.id = run_id
        self.origin = origin
        self.payloads = payloads
        """None while only on disk (read back when the consumer reaches it)."""
        self.count = count
        self.nbytes = nbytes
        self.seq_end = seq_end
        """The queue position just after this run's last message (``wait_stored`` compares)."""
        self.segment = 0
        """The segment its record is in (0 until the writer appended it)."""
        self.start = 0
        """Its record's offset in that segment."""
        self.crc = 0
        self.settled = 0
        """Messages at this run's head that are done (delivered, given up or evicted)."""
        self.taken = 0
        """Messages at this run's head handed to the consumer or evicted."""
        self.stored = False
        """Committed to disk as the policy commits (its payloads may then leave memory)."""
        self.freed = False
        """Its bytes no longer count against ``max_bytes`` (evicted whole)."""
        self.spill = False
        """Drop the payloads from memory once committed (memory is over ``memory_bytes``)."""

    @property
    def record_size(self) -> int:
        return 4 * self.count + self.nbytes


class Writer:
    """The threads that own the queue's files: the writer (appends, commits the index) and
    the syncer (``fsync``, then reports runs stored and unlinks emptied segments).

    The event loop hands the writer new runs, settled runs and the head's progress under one
    lock; the writer takes what was handed over since its last commit (at most
    ``group_bytes`` of new runs) and writes it as one group. A write, commit or ``fsync``
    that fails (a full disk, an I/O error) is tried again with backoff: the runs stay in
    memory meanwhile, and acknowledgements waiting on them wait.
    """

    def __init__(
        self,
        directory: str,
        fsync: FsyncPolicy,
        interval: float,
        *,
        group_bytes: int = 8 << 20,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.path = os.path.join(directory, "queue.sqlite3")
        self.segments = Segments(directory, segment_bytes=segment_bytes)
        self.group_bytes = group_bytes
        """Payload bytes one group takes at most (at least one run): while it is written and
        synced, the producers fill the next one."""
        self.fsync = fsync
        self.interval = interval
        self.lock = threading.Condition()
        self.inserts: list[Run] = []
        self.deletes: list[Run] = []
        self.skips: dict[int, int] = {}
        self.stopping = False
        self.synced = threading.Condition()
        self.unsynced: list[tuple[list[Run], set[int], list[int]] | None] = []
        """Committed, waiting for the syncer: runs, the segments they are in, emptied ones
        (None: the writer has stopped)."""
        self.commits = 0
        self.failures = 0
        self.problem: str | None = None
        self._report: Any = None  # set by start(): the loop-side callback
        self._token: TrioToken | None = None
        self._threads: list[threading.Thread] = []
        self._conn: sqlite3.Connection | None = None

    # -- open -------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # No fsync at commit: the syncer fsyncs the log itself, after the segments.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.execute(_SCHEMA)
        return conn

    def recover(self) -> tuple[list[tuple[Any, ...]], int]:
        """Open the index; check every queued record and cut from the first one whose bytes
        are missing or fail their CRC (a torn tail); unlink segments no row points at; move
        the runs of a queue written before segments into them. The runs' rows (as
        :data:`_COLUMNS`, then segment and offset) and how many messages were cut."""
        self._conn = conn = self.connect()
        rows = conn.execute(
            f"SELECT {_COLUMNS}, segment, start, crc FROM queued_runs ORDER BY id"
        ).fetchall()
        good = 0
        for row in rows:
            count, nbytes, segment, start, crc = row[1], row[2], row[9], row[10], row[11]
            if not self.segments.check(segment, start, 4 * count + nbytes, crc):
                break
            good += 1
        cut = sum(row[1] - row[3] for row in rows[good:])
        if good < len(rows):
            conn.execute("DELETE FROM queued_runs WHERE id >= ?", (rows[good][0],))
            _log.warning(
                "disk queue %s: %d runs (%d messages) from run %d on were cut: their bytes"
                " did not all reach the disk",
                self.path,
                len(rows) - good,
                cut,
                rows[good][0],
            )
        rows = [row[:11] for row in rows[:good]]
        self.segments.keep_only(row[9] for row in rows)
        return rows + self._migrate(conn), cut

    def _migrate(self, conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        """A queue written before segments keeps its runs in the ``runs`` table, payloads
        and all: copy each into a segment, index it, and drop that table in one transaction
        (a crash before the commit leaves the old table, and the copies are unlinked)."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        if not columns:
            return []
        message_id = "message_id" if "message_id" in columns else "NULL"
        old = conn.execute(
            "SELECT id, count, nbytes, skip, transport, listener, peer, received_at,"
            f" {message_id}, lengths, data FROM runs ORDER BY id"
        )
        moved = []
        for *meta, lengths, data in old:
            ((segment, start, crc),) = self.segments.append([(lengths, data)])
            moved.append((*meta, segment, start, crc))
        self.segments.sync(set(self.segments.fds))
        conn.execute("BEGIN")
        conn.executemany(_INSERT, moved)
        conn.execute("DROP TABLE runs")
        conn.execute("COMMIT")
        conn.execute("VACUUM")  # the old payloads' pages
        self._sync_log()
        _log.info("disk queue %s: %d runs moved into segment files", self.path, len(moved))
        return [row[:11] for row in moved]

    def start(self, report: Any, token: TrioToken) -> None:
        self._report = report
        self._token = token
        self._threads = [
            threading.Thread(target=self._loop, name="trio_gateway disk queue writer"),
            threading.Thread(target=self._sync_loop, name="trio_gateway disk queue fsync"),
        ]
        for thread in self._threads:
            thread.start()

    def hand(self, inserts: list[Run], deletes: list[Run], skips: dict[int, int]) -> None:
        with self.lock:
            self.inserts += inserts
            self.deletes += deletes
            self.skips.update(skips)
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        for thread in self._threads:
            thread.join()
        if self._conn is not None:
            self._conn.close()
        self.segments.close()

    # -- the writer -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._write_groups()
        finally:
            with self.synced:
                self.unsynced.append(None)  # the end: the syncer stops there
                self.synced.notify()

    def _write_groups(self) -> None:
        last_sync = time.monotonic()
        delay = _RETRY_DELAY[0]
        inserts: list[Run] = []
        deletes: list[Run] = []
        skips: dict[int, int] = {}
        drops: list[int] = []  # emptied segments (interval: unlinked at the next sync)
        while True:
            with self.lock:
                while not (
                    self.inserts or self.deletes or self.skips or inserts or deletes or skips
                ):
                    if self.stopping:
                        break
                    timeout = None
                    if self.fsync == "interval":
                        timeout = max(self.interval - (time.monotonic() - last_sync), 0.001)
                    if not self.lock.wait(timeout) and self.fsync == "interval":
                        break  # the interval passed with nothing new: sync below
                taken, total = 0, 0
                for run in self.inserts:
                    if taken and total + run.nbytes > self.group_bytes:
                        break
                    taken += 1
                    total += run.nbytes
                inserts += self.inserts[:taken]
                if taken == len(self.inserts):
                    deletes += self.deletes
                    skips.update(self.skips)
                    self.inserts, self.deletes, self.skips = [], [], {}
                else:
                    # Runs not written yet keep their deletes and skips for a later group.
                    first = self.inserts[taken].id
                    self.inserts = self.inserts[taken:]
                    deletes += [r for r in self.deletes if r.id < first]
                    self.deletes = [r for r in self.deletes if r.id >= first]
                    skips.update((i, k) for i, k in self.skips.items() if i < first)
                    self.skips = {i: k for i, k in self.skips.items() if i >= first}
                stopping = self.stopping
            if inserts or deletes or skips:
                try:
                    self._commit(inserts, deletes, skips)
                except (sqlite3.Error, OSError) as exc:
                    self._failed("write", exc)
                    with self.lock:
                        self.lock.wait(delay)
                    delay = min(delay * 2, _RETRY_DELAY[1])
                    if stopping and self.failures > 3:
                        return  # closing: what is not committed was never acknowledged
                    continue
                delay = _RETRY_DELAY[0]
                self.problem = None
                emptied = self.segments.release(run.segment for run in deletes)
                if self.fsync == "interval":
                    drops += emptied
                    if inserts:
                        self._stored(inserts)
                else:
                    self._to_syncer(inserts, emptied)
                inserts, deletes, skips = [], [], {}
            if self.fsync == "interval" and (
                stopping or time.monotonic() - last_sync >= self.interval
            ):
                with contextlib.suppress(OSError):  # tried again at the next interval
                    self.segments.sync(set(self.segments.fds))
                    self._sync_log()
                    for segment in drops:
                        self.segments.drop(segment)
                    drops = []
                last_sync = time.monotonic()
            if stopping and not (self.inserts or self.deletes or self.skips):
                return

    def _commit(self, inserts: list[Run], deletes: list[Run], skips: dict[int, int]) -> None:
        """Append the runs not written yet to the current segment (one write), then commit
        their rows, the deletes and the skips in one transaction (``always``: one per run)."""
        conn = self._conn
        assert conn is not None
        fresh = [run for run in inserts if not run.segment]
        if fresh:
            records = []
            for run in fresh:
                assert run.payloads is not None
                records.append(pack(run.payloads))
            for run, (segment, start, crc) in zip(
                fresh, self.segments.append(records), strict=True
            ):
                run.segment, run.start, run.crc = segment, start, crc
        rows = []
        for run in inserts:
            o = run.origin
            where = (o.transport, o.listener, o.peer, o.received_at, o.id)
            rows.append((run.id, run.count, run.nbytes, 0, *where, run.segment, run.start, run.crc))
        try:
            if self.fsync == "always":
                for row in rows:
                    conn.execute("BEGIN")
                    conn.execute(_INSERT, row)
                    conn.execute("COMMIT")
                rows = []
            conn.execute("BEGIN")
            conn.executemany(_INSERT, rows)
            conn.executemany("DELETE FROM queued_runs WHERE id = ?", [(r.id,) for r in deletes])
            conn.executemany(
                "UPDATE queued_runs SET skip = ? WHERE id = ?", [(s, i) for i, s in skips.items()]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1

    def _to_syncer(self, inserts: list[Run], emptied: list[int]) -> None:
        if not (inserts or emptied):
            return  # deletes and skips only: nothing waits for them
        with self.synced:
            if self.fsync == "always":
                # One fsync per put: each run is synced, and answered, on its own.
                self.unsynced += [([run], {run.segment}, []) for run in inserts]
                if emptied:
                    self.unsynced.append(([], set(), emptied))
            else:
                self.unsynced.append((inserts, {run.segment for run in inserts}, emptied))
            self.synced.notify()

    # -- the syncer ---------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        delay = _RETRY_DELAY[0]
        while True:
            with self.synced:
                while not self.unsynced:
                    self.synced.wait()
                take = 1 if self.fsync == "always" else len(self.unsynced)
                entries = self.unsynced[:take]
            runs: list[Run] = []
            segments: set[int] = set()
            drops: list[int] = []
            end = False
            for entry in entries:
                if entry is None:
                    end = True
                    continue
                entry_runs, entry_segments, entry_drops = entry
                runs += entry_runs
                segments |= entry_segments
                drops += entry_drops
            try:
                self.segments.sync(segments)
                self._sync_log()
            except OSError as exc:
                self._failed("fsync", exc)
                if end and self.failures > 3:
                    return  # closing: what is not synced was never acknowledged
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_DELAY[1])
                continue
            delay = _RETRY_DELAY[0]
            with self.synced:
                del self.unsynced[:take]
            for segment in drops:
                self.segments.drop(segment)
            if runs:
                self._stored(runs)
            if end:
                return

    def _stored(self, runs: list[Run]) -> None:
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._report, runs)

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        self.problem = str(exc)
        _log.log(
            logging.ERROR if self.failures == 1 else logging.DEBUG,
            "disk queue %s: %s failed (%s); retrying",
            self.path,
            what,
            exc,
        )

    def _sync_log(self) -> None:
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no log: every commit is in the database file, synced at checkpoint
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
