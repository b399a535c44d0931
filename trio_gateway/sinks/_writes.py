"""Where a local sink's write runs: in the event loop, or on the sink's writer thread.

:class:`_BatchWriter` decides per write (see :class:`~._simple.FileSink` for the rule and its
figures): a small write to a regular file on a local filesystem goes inline, anything that can
wait on someone else (``fsync``, a FIFO, NFS, FUSE) to one long-lived thread per sink, and a
slow inline write sends the next ones to the thread for a while.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable

import trio

from .._log import logger

__all__ = ("_BatchWriter", "_WriterThread", "_on_local_filesystem")

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
