"""A queue that keeps its messages on disk, in SQLite (WAL mode), across crashes and restarts.

Why SQLite: it is in the standard library, its write-ahead log checksums every frame and
ignores a torn or uncommitted tail when the database is next opened (that is the recovery a
hand-rolled log would have to write and fuzz), and a commit in WAL mode costs one append and,
when asked, one ``fsync`` of the log. Measured in docs/queues.md#the-disk-queue.

Shape of the data: one row per *run*, the messages one read (one ``put_many_nowait``) brought
from one origin: its origin's fields, the payload lengths (uint32 each) and the payloads
joined. A row per message would cap the queue at SQLite's row rate (a few hundred thousand a
second from Python); a row per read writes a 1,000-message TCP chunk with one insert.

Who does what:

* Producers stay synchronous: :meth:`DiskQueue.put_many_nowait` decides by the policy, keeps
  the run in memory and hands it to the writer thread, which commits everything handed to it
  since its last commit in one transaction (group commit). :meth:`DiskQueue.wait_stored`
  waits until a position is committed: what an acknowledgement of a durable queue waits for.
* Consumers take batches as from any queue; what the pump takes stays on disk until the pump
  :meth:`settles <DiskQueue.settle>` it (delivered, or given up for good). A crash between the
  two delivers that batch again after the restart: at-least-once.
* Runs beyond ``memory_bytes`` are written and then dropped from memory; the consumer reads
  them back from the database when it reaches them. ``memory_bytes`` also bounds what waits
  for the writer: a disk that is slow or failing holds the producers (``block``) or drops
  what they offer, instead of growing memory; one transaction takes at most a sixteenth of
  it, so the producers fill the next group while one commits.

The storage (schema, row format, the writer thread) is in :mod:`._sqlite`.
"""

from __future__ import annotations

import os
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from trio.lowlevel import ParkingLot

from .._errors import ConfigurationError
from .._log import logger
from .._message import Batch, Origin
from .._names import canonical
from ._base import PolicyName, Queue
from ._sqlite import FSYNC_POLICIES, FsyncPolicy, Run, Writer, unpack

__all__ = ("FSYNC_POLICIES", "DiskQueue", "FsyncPolicy")

_log = logger.getChild("queues.disk")

_NO_ORIGIN = Origin("unknown", "", "", 0.0)


@dataclass(slots=True)
class _Piece:
    """Part of a run taken by the consumer (or evicted by ``drop_oldest``), not yet settled."""

    run: Run
    count: int
    done: bool


class DiskQueue(Queue[bytes]):
    """A queue in ``directory`` (``queue.sqlite3``) that survives ``kill -9`` and restarts.

    ``max_bytes`` bounds the payload bytes held on disk (1 GiB by default), ``capacity`` the
    messages waiting to be taken; the overflow policy applies to both as for every queue,
    except that ``drop_oldest`` evicts whole runs (the messages of one read). ``fsync``:

    * ``"batch"`` (default): every group commit fsyncs the log once; many producers' puts
      share it (group commit).
    * ``"always"``: one transaction and one fsync per put (per read, per request).
    * ``"interval"``: commits reach the kernel's page cache (a killed process loses nothing;
      a power cut loses up to ``fsync_interval`` seconds); the log is fsynced that often.

    Open it (``await queue.open()``; the :class:`~trio_gateway.Gateway` does) before use, and
    ``await queue.aclose()`` after the last consumer: what is still queued stays on disk and
    comes back, in order, at the next :meth:`open` (counted in :attr:`recovered`).

    Consumers that take with :meth:`take_batch_nowait` must :meth:`settle` each batch once it
    is delivered; until then it stays on disk and comes back after a crash. The plain
    :meth:`get_batch_nowait` of the queue contract settles at once.
    """

    kind = "disk"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        capacity: int = 1_000_000,
        policy: PolicyName = "block",
        max_bytes: int | None = 1 << 30,
        fsync: str = "batch",
        fsync_interval: float = 1.0,
        memory_bytes: int = 64 << 20,
    ) -> None:
        super().__init__(capacity, policy=policy, max_bytes=max_bytes or 1 << 30)
        self.directory = os.fspath(directory)
        if not self.directory:
            raise ConfigurationError("dir", "the disk queue needs a directory (disk:DIR)")
        spelled = canonical(fsync)
        if spelled not in FSYNC_POLICIES:
            raise ConfigurationError(
                "fsync", f"must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}"
            )
        if not fsync_interval > 0:
            raise ConfigurationError("fsync_interval", "must be a positive number of seconds")
        if memory_bytes < 1:
            raise ConfigurationError("memory_bytes", "must be a positive integer")
        self.fsync: FsyncPolicy = spelled
        self.fsync_interval = fsync_interval
        self.memory_bytes = memory_bytes
        self.path = os.path.join(self.directory, "queue.sqlite3")
        self._rows: deque[Run] = deque()  # runs with messages not yet taken, oldest first
        self._depth = 0
        self._pieces: deque[_Piece] = deque()  # taken or evicted, not yet settled (FIFO)
        self._takes: deque[list[_Piece]] = deque()  # per take_batch_nowait, for settle()
        self._next_id = 1
        self._seq = 0
        self._stored_seq = 0
        self._stored = ParkingLot()
        self._loaded = 0
        self._unstored = 0  # bytes handed to the writer and not committed yet
        self._reader: sqlite3.Connection | None = None
        self._writer = Writer(
            self.path, self.fsync, fsync_interval, group_bytes=max(memory_bytes // 16, 1)
        )
        self._opened = False
        self.recovered = 0
        """Messages found on disk by :meth:`open` (queued before a crash or a stop)."""
        self.kept = 0
        """Messages left on disk by :meth:`aclose`, for the next start."""

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the database and load the queued runs' metadata (not payloads)."""
        if self._opened:
            return

        def load() -> tuple[sqlite3.Connection, list[tuple[Any, ...]]]:
            os.makedirs(self.directory, exist_ok=True)
            conn = self._writer.connect()
            rows = conn.execute(
                "SELECT id, count, nbytes, skip, transport, listener, peer, received_at,"
                " message_id FROM runs ORDER BY id"
            ).fetchall()
            return conn, rows

        try:
            self._reader, rows = await trio.to_thread.run_sync(load)
            await trio.to_thread.run_sync(
                self._writer.start, self._on_stored, trio.lowlevel.current_trio_token()
            )
        except (sqlite3.Error, OSError) as exc:
            if self._reader is not None:
                self._reader.close()
            raise ConfigurationError("queue.dir", f"{self.path}: {exc}") from exc
        origins: dict[tuple[Any, ...], Origin] = {}
        for run_id, count, nbytes, skip, *where in rows:
            origin = origins.setdefault(tuple(where), Origin(*where))
            self._seq += count - skip
            run = Run(run_id, origin, None, count, nbytes, self._seq)
            run.stored = True
            run.settled = run.taken = skip
            self._rows.append(run)
            self._depth += count - skip
            self._bytes += nbytes
            self._next_id = run_id + 1
        self._stored_seq = self._seq
        self.recovered = self._put = self._depth
        self._opened = True
        if self.recovered:
            _log.info("disk queue %s: %d messages recovered", self.path, self.recovered)

    async def aclose(self) -> None:
        """Close (if not yet), commit what is pending, and release the database."""
        self.close()
        if not self._opened:
            return
        self._opened = False
        self.kept = self._depth + sum(p.count for p in self._pieces if not p.done)
        await trio.to_thread.run_sync(self._writer.stop)
        if self._reader is not None:
            self._reader.close()

    async def __aenter__(self) -> DiskQueue:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    # -- storage --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._depth

    @property
    def position(self) -> int:
        """How many messages have been accepted so far (recovered ones included)."""
        return self._seq

    @property
    def stored_position(self) -> int:
        """How many of them are committed to disk."""
        return self._stored_seq

    @property
    def commits(self) -> int:
        """Transactions committed by the writer thread."""
        return self._writer.commits

    @property
    def problem(self) -> str | None:
        """Why the last commit failed, while it keeps failing; None when commits work."""
        return self._writer.problem

    def _append(self, items: Sequence[bytes]) -> None:
        self._add_run(items, sum(map(len, items)), None)

    def _popleft(self, n: int) -> list[bytes]:
        return self.get_batch_nowait(n)

    def _add_run(self, items: Sequence[bytes], nbytes: int, origin: Origin | None) -> None:
        if not self._opened:
            raise RuntimeError("open the disk queue first (await queue.open())")
        n = len(items)
        self._seq += n
        run = Run(self._next_id, origin or _NO_ORIGIN, list(items), n, nbytes, self._seq)
        self._next_id += 1
        if self._loaded + nbytes > self.memory_bytes:
            run.spill = True
        self._loaded += nbytes
        self._unstored += nbytes
        self._rows.append(run)
        self._depth += n
        self._bytes += nbytes
        self._put += n
        self._writer.hand([run], [], {})

    def _on_stored(self, runs: list[Run]) -> None:
        """In the event loop: the writer committed ``runs``."""
        for run in runs:
            run.stored = True
            if run.payloads is not None and (run.spill or run.settled == run.count):
                run.payloads = None
                self._loaded -= run.nbytes
        self._stored_seq = max(self._stored_seq, runs[-1].seq_end)
        self._unstored -= sum(run.nbytes for run in runs)
        self._stored.unpark_all()
        if self._producers:
            self._producers.unpark_all()

    def _is_full(self) -> bool:
        return self._unstored >= self.memory_bytes or super()._is_full()

    async def wait_stored(self, position: int | None = None) -> None:
        """Wait until every message up to ``position`` (default: all accepted so far) is
        committed to disk, as the ``fsync`` policy commits."""
        await trio.lowlevel.checkpoint_if_cancelled()
        target = self._seq if position is None else position
        while self._stored_seq < target:
            await self._stored.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- producers ------------------------------------------------------------------------

    def put_many_nowait(
        self, items: Sequence[bytes], *, drop: bool = True, origin: Origin | None = None
    ) -> int:
        """As :meth:`Queue.put_many_nowait`; ``origin`` is stored with the messages."""
        if self._closed:
            raise trio.ClosedResourceError("the queue is closed")
        n = len(items)
        if not n:
            return 0
        nbytes = sum(map(len, items))
        max_bytes = self._max_bytes
        assert max_bytes is not None
        if self._unstored >= self.memory_bytes:
            # The writer is a whole memory budget behind (a slow or failing disk): what is
            # not on disk yet must not grow without bound. ``block`` waits, the drop policies
            # drop what is offered (the queued messages wait for the disk, not for room).
            if drop and self._policy != "block":
                self._dropped_newest += n
            return 0
        if self._depth + n <= self._capacity and self._bytes + nbytes <= max_bytes:
            self._add_run(items, nbytes, origin)
            accepted = n
        elif self._policy == "drop_oldest":
            accepted = self._put_evicting(items, origin)
        else:
            accepted = self._put_prefix(items, drop, origin)
        if accepted and self._consumers:
            self._consumers.unpark_all()
        return accepted

    def _put_prefix(self, items: Sequence[bytes], drop: bool, origin: Origin | None) -> int:
        assert self._max_bytes is not None
        room = self._capacity - self._depth
        byte_room = self._max_bytes - self._bytes
        accepted = total = 0
        for size in map(len, items):
            if accepted == room:
                break
            if total + size > byte_room:
                self._refused_size = min(max(size, 1), self._max_bytes)
                break
            accepted += 1
            total += size
        if accepted:
            self._add_run(items[:accepted], total, origin)
        if drop and self._policy == "drop_newest":
            self._dropped_newest += len(items) - accepted
        return accepted

    def _put_evicting(self, items: Sequence[bytes], origin: Origin | None) -> int:
        assert self._max_bytes is not None
        sizes = list(map(len, items))
        n = len(items)
        # Bytes taken by the consumer but not settled cannot be evicted: the rest can.
        in_hand = self._bytes - sum(r.nbytes for r in self._rows if r.settled == r.taken)
        limit = self._max_bytes - max(in_hand, 0)
        start, total = n, 0
        while start > 0 and total + sizes[start - 1] <= limit and n - start < self._capacity:
            start -= 1
            total += sizes[start]
        self._dropped_oldest += start  # the batch's own head, which cannot fit at all
        evicted = 0
        while self._rows and (
            self._bytes + total > self._max_bytes or self._depth + n - start > self._capacity
        ):
            run = self._rows.popleft()
            count = run.count - run.taken
            if run.taken == run.settled:  # nothing of it in the consumer's hands
                run.freed = True
                self._bytes -= run.nbytes
            run.taken = run.count
            self._depth -= count
            evicted += count
            self._pieces.append(_Piece(run, count, True))
            self._advance()
        self._dropped_oldest += evicted
        if n - start and self._bytes + total <= self._max_bytes:
            self._add_run(items[start:], total, origin)
            return n - start
        self._dropped_oldest += n - start  # in the consumer's hands: no room even so
        return 0

    # -- consumers ------------------------------------------------------------------------

    def take_batch_nowait(self, max_items: int) -> Batch:
        """Take up to ``max_items`` with their origins; :meth:`settle` them once delivered.

        Raises :class:`trio.WouldBlock` when empty, :class:`trio.EndOfChannel` when closed
        and empty. A run that only is on disk is read back here (one indexed read).
        """
        if not self._depth:
            if self._closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        payloads: list[bytes] = []
        runs: list[tuple[Origin, int]] = []
        pieces: list[_Piece] = []
        want = max_items
        rows = self._rows
        while want and rows:
            run = rows[0]
            if run.payloads is None:
                self._load(run)
            assert run.payloads is not None
            start = run.taken
            k = min(run.count - start, want)
            if start == 0 and k == run.count:
                payloads += run.payloads
            else:
                payloads += run.payloads[start : start + k]
            runs.append((run.origin, k))
            pieces.append(_Piece(run, k, False))
            run.taken = start + k
            if run.taken == run.count:
                rows.popleft()
            want -= k
        got = max_items - want
        self._depth -= got
        self._got += got
        self._pieces.extend(pieces)
        self._takes.append(pieces)
        if self._producers:
            self._producers.unpark_all()
        return Batch(payloads, runs)

    def settle(self) -> None:
        """The oldest batch taken with :meth:`take_batch_nowait` is done with (delivered or
        given up for good): it leaves the disk at the next commit."""
        for piece in self._takes.popleft():
            piece.done = True
        self._advance()

    def get_batch_nowait(self, max_items: int) -> list[bytes]:
        batch = self.take_batch_nowait(max_items)
        self.settle()
        return batch.payloads

    def _load(self, run: Run) -> None:
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT lengths, data FROM runs WHERE id = ?", (run.id,)
        ).fetchone()
        if row is None:
            raise RuntimeError(f"disk queue {self.path}: run {run.id} is missing")
        run.payloads = unpack(row[0], row[1])
        self._loaded += run.nbytes

    def _advance(self) -> None:
        """Settle the done pieces at the head, in order: finished runs are deleted."""
        pieces = self._pieces
        deletes: list[int] = []
        skips: dict[int, int] = {}
        while pieces and pieces[0].done:
            piece = pieces.popleft()
            run = piece.run
            run.settled += piece.count
            if run.settled == run.count:
                deletes.append(run.id)
                skips.pop(run.id, None)
                if not run.freed:
                    self._bytes -= run.nbytes
                if run.stored and run.payloads is not None:
                    run.payloads = None
                    self._loaded -= run.nbytes
            else:
                skips[run.id] = run.settled
        if deletes or skips:
            self._writer.hand([], deletes, skips)
            if self._producers:
                self._producers.unpark_all()

    def unsettled(self) -> int:
        """Messages taken but not settled (in the consumer's hands)."""
        return sum(p.count for p in self._pieces if not p.done)
