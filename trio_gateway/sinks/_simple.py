"""Local sinks: stdout and file (JSON Lines), and null (counts only)."""

from __future__ import annotations

import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

import trio

from .._errors import ConfigurationError, SinkError
from .._message import Batch
from ._base import Sink
from ._jsonl import encode_jsonl

__all__ = ("FileSink", "NullSink", "StdoutSink")


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
    """Writes JSON Lines to standard output, one write and flush per batch.

    The write runs in the sink's writer thread so a slow reader of the pipe cannot stall the
    event loop.
    """

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._writer: _WriterThread | None = None

    def _write(self, data: bytes) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        stream.write(data)
        stream.flush()

    async def send(self, batch: Batch) -> None:
        data = encode_jsonl(batch)
        if self._writer is None:
            self._writer = _WriterThread("trio_gateway stdout sink")
        try:
            await self._writer.run(lambda: self._write(data))
        except OSError as exc:
            raise SinkError(f"stdout: {exc}") from exc

    async def aclose(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.aclose()


class FileSink(Sink):
    """Appends JSON Lines to a file; each batch is written and flushed (``fsync`` optional).

    File I/O runs in the sink's writer thread (one per sink), one hop per batch, so a slow
    disk cannot stall the event loop.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigurationError("sink", "file sink needs a path (file:PATH)")
        self.fsync = fsync
        self.name = f"file:{self.path}"
        self._file: BinaryIO | None = None
        self._writer: _WriterThread | None = None

    async def open(self) -> None:
        try:
            self._file = await trio.to_thread.run_sync(open, self.path, "ab")
        except OSError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    async def send(self, batch: Batch) -> None:
        if self._file is None:
            await self.open()
        data = encode_jsonl(batch)
        if self._writer is None:
            self._writer = _WriterThread(f"trio_gateway {self.name}")
        try:
            await self._writer.run(lambda: self._write(data))
        except OSError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc

    async def aclose(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.aclose()
        if self._file is not None:
            file, self._file = self._file, None
            await trio.to_thread.run_sync(file.close)
