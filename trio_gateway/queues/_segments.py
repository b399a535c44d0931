"""The disk queue's payload files: append-only segments, and the check that cuts a torn tail.

A *record* is one run: its messages' lengths (uint32, little-endian) then their payloads,
written once, with one ``write`` per group of runs, into the current segment
(``DIR/segments/NNNNNNNNNN.seg``, a new one past :data:`SEGMENT_BYTES`). The index row that
points at a record (in :mod:`._sqlite`) holds its segment, offset, size and CRC-32, so a
record whose bytes did not all reach the disk (a power cut before their ``fsync``, a file cut
short) is found on open and cut, with every run after it. A segment is unlinked once every
run in it is settled and their deletion is durable.

Threads: the writer thread appends and tracks which runs each segment still holds; the
event loop reads records back (``pread``, which never moves the writer's file offset); the
thread that fsyncs unlinks emptied segments once their deletion is on disk.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence

__all__ = ("SEGMENT_BYTES", "Segments", "pack", "unpack")

SEGMENT_BYTES = 16 << 20
"""A segment's size before the writer starts the next one: a settled segment's bytes leave
the disk whole, so this is also how much settled data a drained queue may still hold."""
SPARES = 4
"""Settled segment files kept (``NNNNNNNNNN.spare``) to be written over as the next
segments, as SQLite reuses its log: writing over blocks a file already has needs no new
blocks and no journal commit at each ``fdatasync`` (docs/queues.md#the-disk-queue)."""


def pack(payloads: Sequence[bytes]) -> tuple[bytes, bytes]:
    """A run's record as two buffers: the lengths, the payloads joined."""
    lengths = array("I", map(len, payloads))
    if sys.byteorder == "big":
        lengths.byteswap()  # stored little-endian, so a queue moves between machines
    return lengths.tobytes(), b"".join(payloads)


def unpack(record: bytes, count: int) -> list[bytes]:
    """The payloads of a record of ``count`` messages."""
    lengths = array("I")
    lengths.frombytes(record[: 4 * count])
    if sys.byteorder == "big":
        lengths.byteswap()
    out: list[bytes] = []
    pos = 4 * count
    view = memoryview(record)
    for length in lengths:
        out.append(bytes(view[pos : pos + length]))
        pos += length
    return out


class Segments:
    """The segment files of one queue directory and the file descriptors open on them."""

    def __init__(self, directory: str, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = os.path.join(directory, "segments")
        self.segment_bytes = segment_bytes
        self.fds: dict[int, int] = {}
        self.live: dict[int, int] = {}
        """Runs each segment still holds (written, not deleted): the writer thread's."""
        self.current = 0
        """The segment being appended to (0: none yet, the next append starts one)."""
        self.size = 0

    def _path(self, segment: int, suffix: str = ".seg") -> str:
        return os.path.join(self.directory, f"{segment:010d}{suffix}")

    def _spares(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory) if n.endswith(".spare"))

    def on_disk(self) -> list[int]:
        """The segment numbers found in the directory (created if missing), oldest first."""
        os.makedirs(self.directory, exist_ok=True)
        names = (n for n in os.listdir(self.directory) if n.endswith(".seg"))
        return sorted(int(n[:-4]) for n in names if n[:-4].isdigit())

    def check(self, segment: int, start: int, size: int, crc: int) -> bool:
        """Whether a record's bytes are all there and match their CRC-32 (on open)."""
        fd = self.fds.get(segment)
        if fd is None:
            try:
                fd = self.fds[segment] = os.open(self._path(segment), os.O_RDWR)
            except FileNotFoundError:
                return False
        data = os.pread(fd, size, start)
        return len(data) == size and zlib.crc32(data) == crc

    def keep_only(self, runs: Iterable[int]) -> None:
        """Count the runs each segment holds (one segment number per run) and unlink every
        other segment file (on open: bytes no index row points at, left by a crash before
        their rows were committed, or cut)."""
        for segment in runs:
            self.live[segment] = self.live.get(segment, 0) + 1
        found = self.on_disk()
        for segment in found:
            if segment not in self.live:
                self.drop(segment)
        # Never append to a segment a crash may have torn: the next append starts a new one.
        self.current = max([0, *found, *self.live])
        self.size = self.segment_bytes

    def append(self, records: list[tuple[bytes, bytes]]) -> list[tuple[int, int, int]]:
        """Write ``records`` (as from :func:`pack`) in one call; their (segment, offset,
        CRC-32). On an error the segment is cut back to where it was, and it is raised."""
        if self.size >= self.segment_bytes or not self.current:
            self._start_next()
        fd = self.fds[self.current]
        out = []
        buffers: list[bytes] = []
        pos = self.size
        for lengths, data in records:
            out.append((self.current, pos, zlib.crc32(data, zlib.crc32(lengths))))
            buffers += (lengths, data)
            pos += len(lengths) + len(data)
        try:
            _write_all(fd, buffers)
        except OSError:
            os.ftruncate(fd, self.size)
            raise
        self.size = pos
        self.live[self.current] = self.live.get(self.current, 0) + len(records)
        return out

    def _start_next(self) -> None:
        segment = self.current + 1
        path = self._path(segment)
        spares = self._spares()
        if spares:  # written over from its start: its old bytes fail the new rows' CRCs
            os.rename(os.path.join(self.directory, spares[0]), path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.fds[segment] = fd
        _sync_directory(self.directory)  # the new name survives a power cut
        self.current, self.size = segment, 0

    def read(self, segment: int, start: int, size: int) -> bytes:
        data = os.pread(self.fds[segment], size, start)
        if len(data) != size:
            raise OSError(f"segment {self._path(segment)} is cut short at {start + len(data)}")
        return data

    def release(self, segments: Iterable[int]) -> list[int]:
        """One run of each of ``segments`` is deleted; the segments that hold none now
        (and are not being appended to), which :meth:`drop` may unlink once that is durable."""
        empty = []
        for segment in segments:
            left = self.live[segment] = self.live[segment] - 1
            if not left and segment != self.current:
                del self.live[segment]
                empty.append(segment)
        return empty

    def sync(self, segments: Iterable[int]) -> None:
        """``fdatasync`` ``segments`` (those a group was appended to)."""
        for segment in segments:
            fd = self.fds.get(segment)
            if fd is not None:
                os.fdatasync(fd)

    def drop(self, segment: int) -> None:
        """Unlink a segment that holds no run, or keep it as a spare."""
        fd = self.fds.pop(segment, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            if len(self._spares()) < SPARES:
                os.rename(self._path(segment), self._path(segment, ".spare"))
            else:
                os.unlink(self._path(segment))

    def close(self) -> None:
        """Close every file; unlink the current segment if it holds no run."""
        if self.current and not self.live.get(self.current):
            self.drop(self.current)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_all(fd: int, buffers: list[bytes]) -> None:
    limit = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
    views = [memoryview(b) for b in buffers if b]
    while views:
        written = os.writev(fd, views[:limit])
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
