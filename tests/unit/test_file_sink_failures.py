"""The file sink when writes fail: whole records only, no copies, progress as space returns,
a given-up batch cut back out, a file removed underneath, a torn line from a crash, and a
failed fsync. A full disk is played by a write that stops after a budget of bytes (the
kernel's partial write, then ENOSPC)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from trio_gateway import SinkError
from trio_gateway._message import Batch, Origin
from trio_gateway.sinks import FileSink, _simple, decode_jsonl_record, encode_jsonl

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1.0)


def batch_of(prefix: str, n: int, size: int = 100) -> Batch:
    return Batch([f"{prefix}{i:06d}".encode().ljust(size, b".") for i in range(n)], [(ORIGIN, n)])


class FullDisk:
    """``os.write`` on a disk with ``free`` bytes left."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = os.write(fd, data[: self.free])
        self.free -= written
        return written


def whole_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a torn line"
    return [decode_jsonl_record(line)[0] for line in data.splitlines()]


async def test_a_full_disk_leaves_whole_records_and_space_smaller_than_a_batch_is_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    await sink.open()
    first, second = batch_of("a", 10), batch_of("b", 3000)  # second: about 450 KiB
    await sink.send(first)
    disk = FullDisk(100_000)
    monkeypatch.setattr(_simple, "_write_fd", disk)
    attempts = 0
    while True:
        attempts += 1
        try:
            await sink.send(second)  # the pump's retry: the same batch object
            break
        except SinkError as exc:
            assert "No space left" in str(exc)
            records = whole_records(path)  # never a torn line, never a copy
            assert records == first.payloads + second.payloads[: len(records) - 10]
            disk.free = 100_000  # space returns, less than the batch
    assert attempts > 3
    await sink.aclose()
    assert whole_records(path) == first.payloads + second.payloads


async def test_a_batch_given_up_is_cut_back_out_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    await sink.open()
    monkeypatch.setattr(_simple, "_write_fd", FullDisk(70_000))
    failed = batch_of("x", 2000)
    with pytest.raises(SinkError):
        await sink.send(failed)
    assert whole_records(path)  # part of it is there
    monkeypatch.setattr(_simple, "_write_fd", os.write)
    following = batch_of("y", 5)
    await sink.send(following)  # another batch: the pump gave the first up
    await sink.aclose()
    assert whole_records(path) == following.payloads


async def test_a_file_removed_underneath_is_created_again(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(path)
    await sink.open()
    await sink.send(batch_of("a", 3))
    path.rename(tmp_path / "rotated.jsonl")  # logrotate
    await sink.send(batch_of("b", 2))
    path.unlink()
    await sink.send(batch_of("c", 1))
    await sink.aclose()
    assert whole_records(tmp_path / "rotated.jsonl") == batch_of("a", 3).payloads
    assert whole_records(path) == batch_of("c", 1).payloads


async def test_a_torn_last_line_from_a_crash_is_cut_at_open(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    whole = encode_jsonl(batch_of("a", 2))
    path.write_bytes(whole + b'{"transport":"tcp","pe')
    sink = FileSink(path)
    await sink.open()
    await sink.send(batch_of("b", 1))
    await sink.aclose()
    assert path.read_bytes() == whole + encode_jsonl(batch_of("b", 1))


async def test_a_failed_fsync_writes_the_batch_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.jsonl"
    sink = FileSink(path, fsync=True)
    await sink.open()
    calls = 0
    real_fsync = os.fsync

    def failing_once(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_simple.os, "fsync", failing_once)
    batch = batch_of("a", 50)
    with pytest.raises(SinkError, match="Input/output"):
        await sink.send(batch)
    assert path.read_bytes() == b""
    await sink.send(batch)
    await sink.aclose()
    assert whole_records(path) == batch.payloads
