"""Local sinks: stdout and file (JSON Lines), and null (counts only)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import sys
from typing import BinaryIO

import trio

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._log import logger
from .._message import Batch
from ._base import Sink
from ._jsonl import iter_jsonl
from ._writes import _BatchWriter

__all__ = ("FileSink", "NullSink", "StdoutSink")

_log = logger.getChild("sinks.local")


def _file_failure(path: str, exc: OSError) -> str:
    """Why ``open(path, "ab")`` failed, in a few words naming what to fix."""
    directory = os.path.dirname(os.path.abspath(path))
    if isinstance(exc, FileNotFoundError) and not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied (not writable by this user)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    reason = exc.strerror or str(exc)
    return reason[:1].lower() + reason[1:]


def _check_writable(fd: int, name: str) -> None:
    """Raise :class:`SinkUnavailable` unless ``fd`` is open for writing."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:  # EBADF: closed
        raise SinkUnavailable(name, "standard output is closed") from exc
    if mode == os.O_RDONLY:
        raise SinkUnavailable(name, "standard output is open for reading only")


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null once its reader is gone, so the interpreter's
    last flush of ``sys.stdout`` at exit does not fail on the broken pipe again (the
    recipe of Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


class NullSink(Sink):
    """Discards batches, counting messages (for benchmarks and dry runs).

    Bytes are not summed here: the sources already count received bytes (see /metrics).
    """

    name = "null"

    def __init__(self) -> None:
        self.messages = 0

    async def send(self, batch: Batch) -> None:
        self.messages += len(batch)


class StdoutSink(Sink):
    """Writes JSON Lines to standard output, one write and flush per piece of a batch
    (about 192 KiB: ``_jsonl.iter_jsonl``).

    Where the write runs follows :class:`FileSink`'s rule: redirected to a regular file on a
    local filesystem (``serve > out.jsonl``), small batches are written in the event loop;
    to a pipe or a terminal, in the sink's writer thread, so a slow reader cannot stall the
    event loop.
    """

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._writes = _BatchWriter("stdout sink")
        self._decided = False

    @property
    def inline(self) -> bool:
        """Whether small batches are written in the event loop (known after :meth:`open`)."""
        return self._writes.inline

    def _target(self) -> BinaryIO:
        if self._stream is not None:
            return self._stream
        if sys.stdout is None:  # started with stdout closed (``>&-``)
            raise SinkUnavailable(self.name, "standard output is closed")
        return sys.stdout.buffer

    async def open(self) -> None:
        """Check that standard output is open for writing, and decide where writes run."""

        def decide() -> None:
            try:
                fd: int | None = self._target().fileno()
            except (OSError, AttributeError, ValueError):  # io.UnsupportedOperation: no fd
                fd = None
            if fd is not None:
                _check_writable(fd, self.name)
            self._writes.decide(fd)

        await trio.to_thread.run_sync(decide)
        self._decided = True

    def _write(self, data: bytes) -> None:
        stream = self._target()
        stream.write(data)
        stream.flush()

    async def send(self, batch: Batch) -> None:
        if not self._decided:
            await self.open()
        try:
            for piece in iter_jsonl(batch):  # never the whole batch's encoding at once
                await self._writes.write(piece, self._write)
        except BrokenPipeError as exc:
            # ``serve | head -2``: the reader is gone, and no retry brings it back.
            if self._stream is None:
                _discard_stdout()
            raise SinkUnavailable(self.name, "broken pipe: its reader has exited") from exc
        except OSError as exc:
            raise SinkError(f"stdout: {exc}") from exc

    async def aclose(self) -> None:
        await self._writes.aclose()


class FileSink(Sink):
    """Appends JSON Lines to a file; each batch is written whole or not at all (``fsync``
    optional).

    Where the write goes:

    A batch is written in pieces of about 192 KiB of JSON Lines (``_jsonl.iter_jsonl``).

    * A piece of at most 256 KiB, to a regular file on a local filesystem
      (ext4, xfs, btrfs, tmpfs, overlay, ...) and without ``fsync``, is written in the event
      loop: the kernel copies it into the page cache and returns, in about 0.1 ms. The hop to
      a thread would cost more than the write: two threads taking turns at the GIL made the
      whole server use 1.4x the CPU per 18-byte record (measured; docs/sinks.md).
    * Anything else (a larger piece, ``fsync``, a FIFO or device, NFS, SMB, FUSE: a write
      that can wait on someone else) goes to the sink's writer thread, one hop per piece.
    * An inline write that takes more than 1 ms (a disk that is throttling writers) sends the
      next writes to the thread for 10 s, doubling up to 5 min while the next inline write
      tried is slow again, so a slow disk stalls the loop for one write at a time, rarely.

    What a failure leaves (docs/sinks.md#when-a-write-fails): the file is written with
    ``os.write`` on an ``O_APPEND`` descriptor, in pieces of whole records; a piece that
    fails (ENOSPC, EIO, EFBIG) is cut off again with ``ftruncate``, so the file only ever
    holds whole records. The pump retries the same batch object: the records already written
    stay, the rest follows, so freed space smaller than a batch is enough to go on. A batch
    given up (the pump moves on to another) is cut back out: the file holds exactly the
    batches counted as delivered. A failed ``fsync`` rewrites the whole batch (after a failed
    fsync the kernel may have dropped the dirty pages). A file removed or renamed underneath
    is noticed before each batch and created again at the path. At open, a torn last line
    (a crash in the middle of a write) is cut.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigurationError("sink", "file sink needs a path (file:PATH)")
        self.fsync = fsync
        self.name = f"file:{self.path}"
        self._fd: int | None = None
        self._identity = (0, 0)  # (st_dev, st_ino) of the file the descriptor is on
        self._size = 0
        """The file's length after the last whole piece written: where a failure cuts back to."""
        self._batch: Batch | None = None  # the batch being written, across the pump's retries
        self._start = 0  # the file's length before it
        self._done = 0  # bytes of it in the file
        self._dirty = False  # a failed write may have left bytes past _size
        self._writes = _BatchWriter(self.name)

    @property
    def inline(self) -> bool:
        """Whether small batches are written in the event loop (known after :meth:`open`)."""
        return self._writes.inline

    async def open(self) -> None:
        """Open the file for appending: a missing directory, a path without write permission
        or a read-only filesystem is :class:`SinkUnavailable`, naming the cause."""

        def open_file() -> None:
            self._open_path()
            self._writes.decide(None if self.fsync else self._fd)

        try:
            await trio.to_thread.run_sync(open_file)
        except OSError as exc:
            raise SinkUnavailable(self.name, _file_failure(self.path, exc)) from exc

    def _open_path(self) -> None:
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        readable = True
        try:
            fd = os.open(self.path, os.O_RDWR | flags, 0o666)
        except PermissionError:  # writable, not readable: no torn-line check at open
            fd, readable = os.open(self.path, os.O_WRONLY | flags, 0o666), False
        try:
            st = os.fstat(fd)
            size = _cut_torn_line(fd, st.st_size, self.name) if readable else st.st_size
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), size
        self._dirty = False

    def _same_file(self) -> bool:
        """Whether the path still names the file the descriptor writes to."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _write(self, base: int, last: bool, data: bytes) -> None:
        """Write what is not in the file yet of ``data``: the batch's JSON Lines from offset
        ``base`` (a piece of whole records), whole records at a time; ``fsync`` after the
        ``last`` piece."""
        if not self._same_file():
            if self._done and self._fd is not None:
                with contextlib.suppress(OSError):  # the old file keeps only whole batches
                    os.ftruncate(self._fd, self._start)
            _log.warning("%s: the file was removed or replaced; creating it again", self.name)
            self._open_path()
            self._start, self._done = self._size, 0
            if base:  # the pieces before this one went to the old file: the retry rewrites all
                raise OSError(errno.ESTALE, "the file was replaced in the middle of a batch")
        fd = self._fd
        assert fd is not None
        if self._dirty:
            os.ftruncate(fd, self._size)
            self._dirty = False
        view = memoryview(data)
        try:
            while self._done < base + len(data):
                start = self._done - base
                end = _piece_end(data, start)
                piece = view[start:end]
                while piece:
                    self._dirty = True
                    piece = piece[_write_fd(fd, piece) :]
                self._size += end - start
                self._done = base + end
                self._dirty = False
            if last and self.fsync:
                try:
                    os.fsync(fd)
                except OSError:
                    # Whether the pages reached the disk is unknown: write the batch again.
                    self._size, self._done, self._dirty = self._start, 0, True
                    raise
        except OSError:
            with contextlib.suppress(OSError):  # else _dirty: cut before the next write
                os.ftruncate(fd, self._size)
                self._dirty = False
            raise

    def _give_up(self) -> None:
        """The pump moved on from a batch it gave up: cut its records back out."""
        if self._done and self._fd is not None:
            self._size, self._dirty = self._start, True
        self._batch, self._done = None, 0

    async def send(self, batch: Batch) -> None:
        if self._fd is None:
            await self.open()
        if batch is not self._batch:
            if self._batch is not None:
                self._give_up()
            self._batch = batch
            self._start, self._done = self._size, 0
        try:
            # Piece by piece, never the whole batch's encoding at once (the encoding is the
            # same on a retry: the pieces already in the file are skipped); one piece ahead,
            # to know which is the last.
            pieces = iter_jsonl(batch)
            piece, base = next(pieces, b""), 0
            while True:
                after = next(pieces, None)
                last = after is None
                if last or base + len(piece) > self._done:
                    await self._writes.write(piece, functools.partial(self._write, base, last))
                if after is None:
                    break
                base += len(piece)
                piece = after
        except OSError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc
        self._batch = None

    async def aclose(self) -> None:
        await self._writes.aclose()
        if self._batch is not None and self._fd is not None:
            self._give_up()
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await trio.to_thread.run_sync(os.close, fd)


_PIECE = 64 << 10
"""Largest piece the file sink writes with one ``os.write`` (it ends on a record's end)."""
_write_fd = os.write
"""The file sink's ``os.write`` (tests put a failing one in its place)."""


def _piece_end(data: bytes, start: int) -> int:
    """Where the piece of ``data`` from ``start`` ends: a record's end, at most ``_PIECE``
    on, or the end of the one longer record that starts there."""
    if len(data) - start <= _PIECE:
        return len(data)
    end = data.rfind(b"\n", start, start + _PIECE)
    if end < 0:
        end = data.find(b"\n", start + _PIECE)
    return len(data) if end < 0 else end + 1


def _cut_torn_line(fd: int, size: int, name: str) -> int:
    """Cut a last line without its newline (a write torn by a crash); return the length."""
    if not size:
        return 0
    position = size
    while position > 0:
        start = max(0, position - _PIECE)
        chunk = os.pread(fd, position - start, start)
        if position == size and chunk.endswith(b"\n"):
            return size
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            position = start + newline + 1
            break
        position = start
    os.ftruncate(fd, position)
    _log.warning(
        "%s: cut a torn last line (%d bytes) left by an earlier crash", name, size - position
    )
    return position
