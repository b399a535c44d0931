"""The writing half of the HTTP source's HTTP/2 connection (``_h2``): answers onto the
:class:`Http2Server`, and its output onto the stream.

An answer's HPACK block is encoded once per distinct reply (the last one is kept: a run of
``202``s costs one encoding), a body the client's flow-control window cannot take yet waits
for its ``WINDOW_UPDATE``, and one writer at a time puts the server's queued output on the
stream, so that the frames of every task go out in order. Apart from the reading half
(requests, their bodies and deadlines), which knows of this only ``respond`` and ``flush``.
"""

from __future__ import annotations

import trio

from .._http2 import ErrorCode, Http2Server, StreamClosed, encode_headers
from .._streamio import StreamIO
from ._rules import Headers, Reply

__all__ = ("Http2Answers",)


class Http2Answers:
    """The answers of one connection and the writer of its output."""

    def __init__(self, h2: Http2Server, io: StreamIO, idle_timeout: float) -> None:
        self.h2 = h2
        self.io = io
        self.idle_timeout = idle_timeout
        self.unsent: dict[int, bytes] = {}  # answers' bodies waiting for the client's window
        self.reply_of: Reply | None = None  # the last answer's HPACK block, without CORS
        self.reply_block = b""
        self.sending = False
        self.sent = trio.lowlevel.ParkingLot()  # who waits for another task's write

    def on_window(self) -> None:
        """The client opened a window: send what waited for it."""
        for stream_id in list(self.unsent):
            self.send_body(stream_id, self.unsent.pop(stream_id))

    def drop(self, stream_id: int) -> None:
        """The stream was reset: its waiting body will never be read."""
        self.unsent.pop(stream_id, None)

    def respond(self, stream_id: int, reply: Reply, cors: Headers) -> None:
        """Send ``reply`` on ``stream_id``. If the request is still coming, the stream is
        then reset with ``NO_ERROR`` ("stop sending, the answer is final", RFC 9113 8.1)."""
        if cors:
            block = encode_headers(((b":status", b"%d" % reply.status), *reply.headers, *cors))
        elif reply is self.reply_of:
            block = self.reply_block
        else:
            block = encode_headers(((b":status", b"%d" % reply.status), *reply.headers))
            self.reply_of, self.reply_block = reply, block
        try:
            self.h2.send_headers(stream_id, block, end_stream=not reply.body)
        except StreamClosed:
            return  # the client reset it meanwhile
        if reply.body:
            self.send_body(stream_id, reply.body)
        else:
            self.h2.reset_stream(stream_id, ErrorCode.NO_ERROR)  # nothing if it has ended

    def send_body(self, stream_id: int, body: bytes) -> None:
        """As much of ``body`` as the client's windows let through; the rest waits for its
        WINDOW_UPDATE (an answer is small: at most ``_h2.MAX_STREAMS`` of them wait)."""
        h2 = self.h2
        try:
            room = h2.send_window(stream_id)
            if room < len(body):
                if room > 0:
                    h2.send_data(stream_id, body[:room])
                    body = body[room:]
                self.unsent[stream_id] = body
                return
            h2.send_data(stream_id, body, end_stream=True)
        except StreamClosed:
            return  # reset or closed meanwhile
        h2.reset_stream(stream_id, ErrorCode.NO_ERROR)  # nothing if the request has ended

    async def flush(self) -> bool:
        """Write what :class:`Http2Server` has queued, in order, at once when the kernel
        takes it. Else shielded: bytes taken are written whole or the connection is dead, so
        a cancellation (the connection ending) waits for a write in progress, at most
        ``idle_timeout``. Meanwhile the reader waits too (bounded output). False when the
        client read nothing for ``idle_timeout``: the caller cuts it (``too_slow``)."""
        while self.sending:
            await self.sent.park()
        out = self.h2.output
        if not out:
            return True
        data = bytes(out)
        out.clear()
        sent = self.io.write_nowait(data)
        if sent == len(data):
            return True
        self.sending = True
        try:
            deadline = trio.current_time() + self.idle_timeout
            with trio.CancelScope(deadline=deadline, shield=True) as scope:
                await self.io.send_all(memoryview(data)[sent:])
                while out:  # queued by the others meanwhile
                    data = bytes(out)
                    out.clear()
                    await self.io.send_all(data)
        finally:
            self.sending = False
            self.sent.unpark_all()
        return not scope.cancelled_caught
