"""The disk queue's storage: the SQLite schema, the row format, and the writer thread.

A row is a *run*: the messages of one read from one origin, their lengths (uint32,
little-endian) in one blob and their payloads joined in another. The writer thread owns the
write connection and commits in groups (docs/queues.md#the-disk-queue).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from typing import Any, Literal, get_args

import trio
from trio.lowlevel import TrioToken

from .._log import logger
from .._message import Origin

__all__ = ("FSYNC_POLICIES", "FsyncPolicy", "Run", "Writer", "unpack")

_log = logger.getChild("queues.disk")

FsyncPolicy = Literal["always", "batch", "interval"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = get_args(FsyncPolicy)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    skip INTEGER NOT NULL DEFAULT 0,
    transport TEXT NOT NULL,
    listener TEXT NOT NULL,
    peer TEXT NOT NULL,
    received_at REAL NOT NULL,
    message_id TEXT,
    lengths BLOB NOT NULL,
    data BLOB NOT NULL
)
"""
_INSERT = (
    # OR IGNORE: a group that failed part-way under "always" is tried again whole.
    "INSERT OR IGNORE INTO runs (id, count, nbytes, skip, transport, listener, peer, received_at,"
    " message_id, lengths, data) VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?)"
)
PAGE_SIZE = 65536
"""SQLite's page size for a new queue database (its largest)."""
_RETRY_DELAY = (0.05, 2.0)
"""Seconds the writer waits before trying a failed commit again: the first time, and at most."""


class Run:
    """One row: a run of messages from one origin, and how far it has been taken and settled."""

    __slots__ = (
        "count",
        "freed",
        "id",
        "nbytes",
        "origin",
        "payloads",
        "seq_end",
        "settled",
        "spill",
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
        self.settled = 0
        """Messages at this run's head that are done (delivered, given up or evicted)."""
        self.taken = 0
        """Messages at this run's head handed to the consumer or evicted."""
        self.stored = False
        """Committed to the database (its payloads may then leave memory)."""
        self.freed = False
        """Its bytes no longer count against ``max_bytes`` (evicted whole)."""
        self.spill = False
        """Drop the payloads from memory once committed (memory is over ``memory_bytes``)."""


def _pack(payloads: Sequence[bytes]) -> tuple[bytes, bytes]:
    lengths = array("I", map(len, payloads))
    if sys.byteorder == "big":
        lengths.byteswap()  # stored little-endian, so a database moves between machines
    return lengths.tobytes(), b"".join(payloads)


def unpack(lengths_blob: bytes, data: bytes) -> list[bytes]:
    lengths = array("I")
    lengths.frombytes(lengths_blob)
    if sys.byteorder == "big":
        lengths.byteswap()
    out: list[bytes] = []
    pos = 0
    view = memoryview(data)
    for length in lengths:
        out.append(bytes(view[pos : pos + length]))
        pos += length
    return out


class Writer:
    """The thread that owns the database's write connection and commits in groups.

    The event loop hands it new runs, finished run ids and the head's progress under one
    lock; the thread takes everything handed over since its last commit and writes it in one
    transaction (``always``: one transaction per run), then reports the runs back to the loop.
    A commit that fails (a full disk, an I/O error) is rolled back and tried again with
    backoff: the runs stay in memory meanwhile, and acknowledgements waiting on them wait.
    """

    def __init__(
        self, path: str, fsync: FsyncPolicy, interval: float, *, group_bytes: int = 8 << 20
    ) -> None:
        self.path = path
        self.group_bytes = group_bytes
        """Payload bytes one transaction takes at most (at least one run): while it commits,
        the producers fill the next group, so the disk and the event loop work at once."""
        self.fsync = fsync
        self.interval = interval
        self.lock = threading.Condition()
        self.inserts: list[Run] = []
        self.deletes: list[int] = []
        self.skips: dict[int, int] = {}
        self.stopping = False
        self.commits = 0
        self.failures = 0
        self.problem: str | None = None
        self._report: Any = None  # set by start(): the loop-side callback
        self._token: TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        """A connection in WAL mode with this policy's ``synchronous``, the table created."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Before the first table: a new database gets 64 KiB pages (an existing one keeps its
        # own). A run is a blob of up to a read's size, stored as a chain of overflow pages,
        # each one a WAL frame with its header and checksum: 4 KiB pages (the default) wrote
        # 62 MB/s of 4 MiB groups here, 64 KiB pages 300-340 MB/s (docs/queues.md).
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit fsyncs the log. NORMAL (interval): commits reach the page cache,
        # which a killed process cannot lose; this thread fsyncs the log every interval.
        conn.execute(f"PRAGMA synchronous={'NORMAL' if self.fsync == 'interval' else 'FULL'}")
        conn.execute("PRAGMA journal_size_limit=67108864")
        conn.execute(_SCHEMA)
        if "message_id" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}:
            # A queue written before runs kept their message's id (Origin.id): add the column.
            conn.execute("ALTER TABLE runs ADD COLUMN message_id TEXT")
        return conn

    def start(self, report: Any, token: TrioToken) -> None:
        self._conn = self.connect()
        # Room in SQLite's page cache for the last few groups: a run is deleted soon after it
        # was inserted, and freeing its overflow chain reads every page of it (each holds the
        # next one's number). With the default 2 MiB cache those reads went to the log: the
        # writer's CPU per 4,266-byte message was 1.7x that with 4 groups' worth (measured
        # here, docs/queues.md); more cache than that bought nothing.
        cache_kib = max(4 * self.group_bytes // 1024, 2048)
        self._conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        self._report = report
        self._token = token
        self._thread = threading.Thread(target=self._loop, name="trio_gateway disk queue")
        self._thread.start()

    def hand(self, inserts: list[Run], deletes: list[int], skips: dict[int, int]) -> None:
        with self.lock:
            self.inserts += inserts
            self.deletes += deletes
            self.skips.update(skips)
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()

    def _loop(self) -> None:
        last_sync = time.monotonic()
        delay = _RETRY_DELAY[0]
        inserts: list[Run] = []
        deletes: list[int] = []
        skips: dict[int, int] = {}
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
                    # Runs not inserted yet keep their deletes and skips for a later group.
                    first = self.inserts[taken].id
                    self.inserts = self.inserts[taken:]
                    deletes += [i for i in self.deletes if i < first]
                    self.deletes = [i for i in self.deletes if i >= first]
                    skips.update((i, k) for i, k in self.skips.items() if i < first)
                    self.skips = {i: k for i, k in self.skips.items() if i >= first}
                stopping = self.stopping
            if inserts or deletes or skips:
                try:
                    self._commit(inserts, deletes, skips)
                except (sqlite3.Error, OSError) as exc:
                    self.failures += 1
                    self.problem = str(exc)
                    _log.log(
                        logging.ERROR if self.failures == 1 else logging.DEBUG,
                        "disk queue %s: commit failed (%s); retrying",
                        self.path,
                        exc,
                    )
                    with self.lock:
                        self.lock.wait(delay)
                    delay = min(delay * 2, _RETRY_DELAY[1])
                    if stopping and self.failures > 3:
                        return  # closing: what is not committed was never acknowledged
                    continue
                delay = _RETRY_DELAY[0]
                self.problem = None
                committed, inserts, deletes, skips = inserts, [], [], {}
                if committed:
                    assert self._token is not None
                    with contextlib.suppress(trio.RunFinishedError):
                        self._token.run_sync_soon(self._report, committed)
            if self.fsync == "interval" and time.monotonic() - last_sync >= self.interval:
                self._sync_log()
                last_sync = time.monotonic()
            if stopping and not (self.inserts or self.deletes or self.skips):
                if self.fsync == "interval":
                    self._sync_log()
                return

    def _commit(self, inserts: list[Run], deletes: list[int], skips: dict[int, int]) -> None:
        conn = self._conn
        assert conn is not None
        rows = []
        for run in inserts:
            assert run.payloads is not None
            o = run.origin
            lengths, data = _pack(run.payloads)
            where = (o.transport, o.listener, o.peer, o.received_at, o.id)
            rows.append((run.id, run.count, run.nbytes, *where, lengths, data))
        try:
            if self.fsync == "always":
                # One transaction (one fsync) per run: what "fsync every put" costs.
                for row in rows:
                    conn.execute("BEGIN")
                    conn.execute(_INSERT, row)
                    conn.execute("COMMIT")
                rows = []
            conn.execute("BEGIN")
            conn.executemany(_INSERT, rows)
            conn.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in deletes])
            conn.executemany(
                "UPDATE runs SET skip = ? WHERE id = ?", [(s, i) for i, s in skips.items()]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1

    def _sync_log(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.path + "-wal", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
