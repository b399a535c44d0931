"""The disk queue on its own: order and origins across a restart, settling, the overflow
policies by bytes on disk, runs read back from disk, a torn log tail, and acknowledgements
that wait for the commit."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_gateway import ConfigurationError
from trio_gateway._ingress import Ingress
from trio_gateway._ledger import SourceCounters
from trio_gateway._message import Origin
from trio_gateway.queues import DiskQueue, _sqlite

A = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1.5)
B = Origin("http", "http:127.0.0.1:8000", "127.0.0.1:6000", 2.5)


async def test_messages_and_origins_come_back_in_order_after_a_restart(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path) as queue:
        assert queue.put_many_nowait([b"a1", b"a2", b"a3"], origin=A) == 3
        assert queue.put_many_nowait([b"b1", b"b2"], origin=B) == 2
        batch = queue.take_batch_nowait(2)
        assert batch.payloads == [b"a1", b"a2"]
        queue.settle()
        batch = queue.take_batch_nowait(2)  # taken, never settled: comes back
        assert batch.payloads == [b"a3", b"b1"]
    assert queue.kept == 3
    async with DiskQueue(tmp_path) as again:
        assert again.recovered == 3
        batch = again.take_batch_nowait(10)
        assert batch.payloads == [b"a3", b"b1", b"b2"]
        assert batch.runs == [(A, 1), (B, 2)]
        again.settle()
    async with DiskQueue(tmp_path) as empty:
        assert empty.recovered == 0
        with pytest.raises(trio.WouldBlock):
            empty.take_batch_nowait(1)


async def test_block_and_drop_newest_take_the_prefix_that_fits_on_disk(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path / "b", max_bytes=10) as queue:
        assert queue.put_many_nowait([b"1234", b"1234", b"1234"], origin=A) == 2
        assert queue.statistics().dropped == {"drop_newest": 0, "drop_oldest": 0}
        queue.take_batch_nowait(2)
        # Taken but not settled: still on disk, so still counted against max_bytes.
        assert queue.put_many_nowait([b"1234"], origin=A) == 0
        queue.settle()
        assert queue.put_many_nowait([b"1234", b"1234"], origin=A) == 2
    async with DiskQueue(tmp_path / "n", max_bytes=10, policy="drop_newest") as queue:
        assert queue.put_many_nowait([b"1234", b"1234", b"1234"], origin=A) == 2
        assert queue.statistics().dropped["drop_newest"] == 1


async def test_drop_oldest_evicts_whole_runs_and_they_stay_gone(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path, max_bytes=12, policy="drop_oldest") as queue:
        queue.put_many_nowait([b"aaaa", b"bbbb"], origin=A)
        queue.put_many_nowait([b"cccc"], origin=B)
        assert queue.put_many_nowait([b"dddd"], origin=B) == 1  # evicts the first run (2)
        assert queue.statistics().dropped["drop_oldest"] == 2
        await queue.wait_stored()
    async with DiskQueue(tmp_path) as again:
        assert again.take_batch_nowait(10).payloads == [b"cccc", b"dddd"]


async def test_runs_beyond_memory_bytes_are_read_back_from_disk(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path, memory_bytes=100) as queue:
        runs = [[b"%03d-%d" % (r, i) for i in range(20)] for r in range(10)]
        for run in runs:
            assert queue.put_many_nowait(run, origin=A) == 20
            await queue.wait_stored()  # memory_bytes also bounds what waits for the disk
        assert queue._loaded < 10 * 20 * 5  # most runs left memory once committed
        out: list[bytes] = []
        while len(queue):
            out += queue.take_batch_nowait(7).payloads
            queue.settle()
        assert out == [p for run in runs for p in run]


async def test_a_torn_log_tail_is_cut_and_the_committed_runs_before_it_kept(
    tmp_path: Path,
) -> None:
    """As after a crash in the middle of a commit: the last frame of the write-ahead log is
    cut short. SQLite checks each frame's checksum and ignores the torn commit."""
    live = tmp_path / "live"
    copy = tmp_path / "copy"
    async with DiskQueue(live) as queue:
        queue.put_many_nowait([b"first"] * 3, origin=A)
        await queue.wait_stored()
        queue.put_many_nowait([b"second" * 1000], origin=B)
        await queue.wait_stored()
        # Copy the files as a crash would leave them (the log not yet checkpointed).
        copy.mkdir()
        for name in os.listdir(live):
            shutil.copy(live / name, copy / name)
    wal = copy / "queue.sqlite3-wal"
    assert wal.stat().st_size > 4096
    with wal.open("r+b") as file:
        file.truncate(wal.stat().st_size - 100)
    async with DiskQueue(copy) as recovered:
        assert recovered.recovered == 3
        assert recovered.take_batch_nowait(10).payloads == [b"first"] * 3


async def test_an_answer_through_the_ingress_waits_for_the_commit(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path) as queue:
        ingress = Ingress(queue, SourceCounters("http", "h"), trio.Event(), grace_period=1.0)
        assert not ingress.offer_one_nowait(b"x", A)  # the caller must take the waiting way
        assert await ingress.offer_or_reject([b"x", b"y"], A) == 2
        assert queue.stored_position == queue.position == 2


async def test_an_answer_taken_for_later_waits_for_the_commit(tmp_path: Path) -> None:
    """What a WebSocket ack waits for with a disk queue, while its reader goes on reading."""
    async with DiskQueue(tmp_path) as queue:
        ingress = Ingress(queue, SourceCounters("websocket", "w"), trio.Event(), grace_period=1.0)
        answer = await ingress.offer_later([b"x", b"y"], A)
        assert not answer.final and answer.accepted == 2
        assert await answer.wait() == 2
        assert queue.stored_position == queue.position == 2


async def test_new_databases_get_64_kib_pages_and_older_ones_keep_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def page_size(directory: Path) -> int:
        with sqlite3.connect(directory / "queue.sqlite3") as conn:
            return int(conn.execute("PRAGMA page_size").fetchone()[0])

    async with DiskQueue(tmp_path / "new") as queue:
        queue.put_many_nowait([b"x" * 100_000], origin=A)
    assert page_size(tmp_path / "new") == 65536
    with monkeypatch.context() as patch:
        patch.setattr(_sqlite, "PAGE_SIZE", 4096)  # as databases were made before
        async with DiskQueue(tmp_path / "old") as queue:
            queue.put_many_nowait([b"x" * 100_000, b"y"], origin=A)
    assert page_size(tmp_path / "old") == 4096
    async with DiskQueue(tmp_path / "old") as again:
        assert again.recovered == 2
        assert again.take_batch_nowait(5).payloads == [b"x" * 100_000, b"y"]
    assert page_size(tmp_path / "old") == 4096


async def test_always_commits_each_put_on_its_own(tmp_path: Path) -> None:
    async with DiskQueue(tmp_path, fsync="always") as queue:
        for i in range(5):
            queue.put_many_nowait([b"%d" % i], origin=A)
        await queue.wait_stored()
    async with DiskQueue(tmp_path, fsync="interval", fsync_interval=0.05) as again:
        assert again.recovered == 5


def test_bad_options_name_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="fsync"):
        DiskQueue(tmp_path, fsync="sometimes")
    with pytest.raises(ConfigurationError, match="fsync_interval"):
        DiskQueue(tmp_path, fsync="interval", fsync_interval=0)
    with pytest.raises(ConfigurationError, match="dir"):
        DiskQueue("")


async def test_a_failing_disk_holds_producers_once_memory_bytes_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits fail (a full disk) and are tried again; meanwhile at most ``memory_bytes``
    wait in memory: ``block`` refuses more until the disk takes them."""
    failing = threading.Event()
    failing.set()
    real_commit = _sqlite.Writer._commit

    def commit(self: _sqlite.Writer, *args: Any) -> None:
        if failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(self, *args)

    monkeypatch.setattr(_sqlite.Writer, "_commit", commit)
    async with DiskQueue(tmp_path, memory_bytes=1000) as queue:
        assert queue.put_many_nowait([b"x" * 600], origin=A) == 1
        assert queue.put_many_nowait([b"y" * 600], origin=A) == 1
        assert queue.put_many_nowait([b"z"], origin=A) == 0  # 1,200 bytes not on disk
        with trio.move_on_after(0.2):
            await queue.wait_not_full()
            raise AssertionError("room while nothing reached the disk")
        await trio.sleep(0.1)
        assert queue.problem is not None and "full" in queue.problem
        failing.clear()
        with trio.fail_after(10):
            await queue.wait_not_full()
            await queue.wait_stored()
        assert queue.problem is None
        assert queue.put_many_nowait([b"z"], origin=A) == 1
    async with DiskQueue(tmp_path) as again:
        assert again.take_batch_nowait(10).payloads == [b"x" * 600, b"y" * 600, b"z"]
