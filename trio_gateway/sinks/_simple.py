"""Local sinks: stdout and file (JSON Lines), and null (counts only)."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

import trio

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._log import logger
from .._message import Batch
from ._base import Sink
from ._jsonl import iter_jsonl

__all__ = ("FileSink", "NullSink", "StdoutSink")

_log = logger.getChild("sinks.local")


class _WriterThread:
    """One thread that runs a sink's blocking writes, one at a time, for the sink's lifetime.

    ``trio.to_thread.run_sync`` costs about 190 us a call here (a capacity limiter, the thread
    cache, a report through the run loop's entry queue, a checkpoint); waking a dedicated thread
    through a :class:`queue.SimpleQueue` and hearing back on a socket pair costs about 60 us.
    With batches of 1024 18-byte records that is 0.13 us a record: a third of the file sink's
    whole cost. Like ``to_thread.run_sync``, a write that started is waited for even when the
    caller is cancelled (the bytes may be in the file: they are not abandoned halfway).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._done, self._signal = socket.socketpair()
        self._done.setblocking(False)
        self._error: BaseException | None = None
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # handed to the waiting task, which re-raises it
                self._error = exc
            self._signal.send(b"\0")

    async def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the thread; its exception, if any, is raised here."""
        if self._busy:
            raise RuntimeError("one write at a time")  # the pump is the only caller
        await trio.lowlevel.checkpoint_if_cancelled()
        self._busy = True
        try:
            self._jobs.put(job)
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(self._done)
            self._done.recv(16)
        finally:
            self._busy = False
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def aclose(self) -> None:
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)
        self._done.close()
        self._signal.close()


_LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "bcachefs",
        "f2fs",
        "jfs",
        "zfs",
        "tmpfs",
        "ramfs",
        "overlay",
    }
)
"""Filesystems whose writes go to the page cache and return: no network, no user-space daemon."""
_INLINE_MAX = 256 << 10
"""Largest write the file sink makes in the event loop (about 0.1 ms into the page cache)."""
_SLOW_WRITE = 0.001
"""An inline write that took longer than this (seconds) sends the next writes to the thread."""
_BACKOFF = (10.0, 300.0)
"""Seconds in the thread after a slow inline write: the first time, and at most (it doubles
while the inline writes it tries stay slow)."""


def _on_local_filesystem(fd: int) -> bool:
    """Whether ``fd`` is a regular file on a local filesystem (Linux: /proc/self/mountinfo).

    A FIFO, a device, a network or FUSE filesystem, or no way to tell, is not: a write there
    can wait on a reader, a server or a daemon for as long as they take.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return False
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                # "ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE ..."
                fields, _, rest = line.partition(" - ")
                if fields.split(" ", 3)[2] == device:
                    return rest.split(" ", 1)[0] in _LOCAL_FILESYSTEMS
    except OSError:
        pass
    return False


class _BatchWriter:
    """Runs a sink's writes of whole batches: in the event loop when the rule of
    :class:`FileSink` allows it (small batches to a regular file on a local filesystem, while
    such writes stay fast), otherwise in one :class:`_WriterThread`, started when first
    needed. Like the thread, a write that started is finished even if the caller is
    cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inline = False
        """Whether small batches may be written in the event loop (:meth:`decide`)."""
        self._thread: _WriterThread | None = None
        self._inline_from = 0.0  # trio.current_time() before which every write is threaded
        self._backoff = _BACKOFF[0]

    def decide(self, fd: int | None) -> None:
        """Allow inline writes if ``fd`` is a regular file on a local filesystem (blocking:
        it reads /proc; call it from a thread)."""
        self.inline = fd is not None and _on_local_filesystem(fd)

    async def write(self, data: bytes, write: Callable[[bytes], None]) -> None:
        """``write(data)``, inline or in the thread; its exception is raised here."""
        if self.inline and len(data) <= _INLINE_MAX and trio.current_time() >= self._inline_from:
            await trio.lowlevel.checkpoint_if_cancelled()
            started = time.perf_counter()
            write(data)
            self._after_inline(time.perf_counter() - started)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._thread is None:
            self._thread = _WriterThread(f"trio_gateway {self.name}")
        await self._thread.run(lambda: write(data))

    def _after_inline(self, seconds: float) -> None:
        if seconds <= _SLOW_WRITE:
            self._backoff = _BACKOFF[0]
            return
        # One slow write is routine (a busy machine): INFO. WARNING only when the writes tried
        # after a stay in the thread are slow again (the backoff has grown): a disk that
        # keeps throttling writers is something to look at.
        persistent = self._backoff > _BACKOFF[0]
        _log.log(
            logging.WARNING if persistent else logging.INFO,
            "%s: a write took %.1f ms in the event loop%s; writing from a thread for %.0f s",
            self.name,
            seconds * 1e3,
            " again" if persistent else "",
            self._backoff,
        )
        self._inline_from = trio.current_time() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF[1])

    async def aclose(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            await thread.aclose()


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
    """Appends JSON Lines to a file; each batch is written and flushed (``fsync`` optional).

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
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigurationError("sink", "file sink needs a path (file:PATH)")
        self.fsync = fsync
        self.name = f"file:{self.path}"
        self._file: BinaryIO | None = None
        self._writes = _BatchWriter(self.name)

    @property
    def inline(self) -> bool:
        """Whether small batches are written in the event loop (known after :meth:`open`)."""
        return self._writes.inline

    async def open(self) -> None:
        """Open the file for appending: a missing directory, a path without write permission
        or a read-only filesystem is :class:`SinkUnavailable`, naming the cause."""

        def open_file() -> BinaryIO:
            file = open(self.path, "ab")  # noqa: SIM115 - open until aclose()
            self._writes.decide(None if self.fsync else file.fileno())
            return file

        try:
            self._file = await trio.to_thread.run_sync(open_file)
        except OSError as exc:
            raise SinkUnavailable(self.name, _file_failure(self.path, exc)) from exc

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()

    def _write_last(self, data: bytes) -> None:
        self._write(data)
        if self.fsync:  # once per batch, after its last piece
            assert self._file is not None
            os.fsync(self._file.fileno())

    async def send(self, batch: Batch) -> None:
        if self._file is None:
            await self.open()
        try:
            # Piece by piece, never the whole batch's encoding at once; one piece ahead, to
            # know which is the last.
            pieces = iter_jsonl(batch)
            piece = next(pieces, b"")
            for after in pieces:
                await self._writes.write(piece, self._write)
                piece = after
            await self._writes.write(piece, self._write_last)
        except OSError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc

    async def aclose(self) -> None:
        await self._writes.aclose()
        if self._file is not None:
            file, self._file = self._file, None
            await trio.to_thread.run_sync(file.close)
