"""Local sinks: stdout and file (JSON Lines), and null (counts only)."""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

import trio

from .._errors import ConfigurationError, SinkError
from .._message import Batch
from ._base import Sink
from ._jsonl import encode_jsonl

__all__ = ("FileSink", "NullSink", "StdoutSink")


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

    The write runs in a worker thread so a slow reader of the pipe cannot stall the event loop.
    """

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream

    def _write(self, data: bytes) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        stream.write(data)
        stream.flush()

    async def send(self, batch: Batch) -> None:
        data = encode_jsonl(batch)
        try:
            await trio.to_thread.run_sync(self._write, data)
        except OSError as exc:
            raise SinkError(f"stdout: {exc}") from exc


class FileSink(Sink):
    """Appends JSON Lines to a file; each batch is written and flushed (``fsync`` optional).

    File I/O runs in a worker thread, one hop per batch.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigurationError("sink", "file sink needs a path (file:PATH)")
        self.fsync = fsync
        self.name = f"file:{self.path}"
        self._file: BinaryIO | None = None

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
        try:
            await trio.to_thread.run_sync(self._write, data)
        except OSError as exc:
            raise SinkError(f"{self.name}: {exc}") from exc

    async def aclose(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            await trio.to_thread.run_sync(file.close)
