"""One connection's reads and writes, without the scheduler trips the kernel does not need.

Trio's ``SocketStream`` takes a scheduler pass after every receive or send that the kernel
completes at once. On a connection answering one small request at a time, that is one more
trip each way per request, a measurable share of its CPU. :class:`StreamIO` reads and writes
plain TCP on the socket's file descriptor: a read that finds data still yields once (shielded,
as trio does, so that the other tasks run and a cancellation never drops bytes already read),
and a write the kernel takes whole costs no checkpoint at all (the caller's next receive is
one). Any other stream (TLS) goes through the stream itself. The HTTP/2 servers (gRPC and the
HTTP source's HTTP/2 path) use it.
"""

from __future__ import annotations

import os

import trio

__all__ = ("StreamIO",)


class StreamIO:
    """Reads of up to ``read_size`` bytes and writes on ``stream``. A broken connection raises
    what trio's streams raise (:class:`trio.BrokenResourceError`, or an :class:`OSError`)."""

    __slots__ = ("_fd", "read_size", "stream")

    def __init__(self, stream: trio.abc.Stream, read_size: int) -> None:
        self.stream = stream
        self.read_size = read_size
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None

    async def receive(self) -> bytes | bytearray:
        """The next bytes the peer sent (``b""``: it closed its side)."""
        fd = self._fd
        if fd is None:
            return await self.stream.receive_some(self.read_size)
        try:
            data = os.read(fd, self.read_size)
        except BlockingIOError:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(fd)  # the checkpoint of this receive
            try:
                return os.read(fd, self.read_size)
            except BlockingIOError:
                continue

    def write_nowait(self, data: bytes | memoryview) -> int:
        """Write what the kernel takes now, without waiting: how many bytes (0 on a stream
        that is not plain TCP, or when the connection is broken: :meth:`send_all` says so)."""
        fd = self._fd
        if fd is None:
            return 0
        try:
            return os.write(fd, data)
        except OSError:  # BlockingIOError, or a broken connection
            return 0

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write everything, waiting for the peer to read when the kernel's buffer is full.
        No checkpoint when the kernel takes it all at once."""
        fd = self._fd
        if fd is None:
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            view = view[sent:]
