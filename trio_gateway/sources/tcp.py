"""Streaming TCP: newline or 4-byte length-prefixed frames, chosen per listener."""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from typing import Any

import trio

from .._budget import ConnectionShare
from .._errors import ConfigurationError, FrameTooLarge, ProtocolError
from .._frames import Frames
from .._ingress import Ingress
from .._message import Origin
from ..codecs import FRAMINGS, NewlineDecoder
from ._base import Source, connection_errors, peer_of, serve_connections
from ._options import ListenOptions
from ._sockets import unread_bytes

__all__ = ("TcpSource",)

READ_SIZE = 256 * 1024


class TcpSource(Source):
    """Accepts TCP connections; each one is a stream of frames.

    Per connection: reads of up to ``read_size`` bytes (twice that, into one reused buffer,
    once newline frames average 512 bytes or more), decoded with the listener's framing
    (``"newline"`` or ``"length"``), every frame of a read offered to the queue in one call
    (short newline frames packed, still in the chunk they came in: ``_frames.Frames``).
    Under the ``block`` policy a full queue stops the reading, so the kernel's receive window
    fills and the client's ``send`` blocks: real backpressure. A frame over
    ``max_message_size`` closes that connection only (counted as ``oversize``); so does a
    stream that ends mid-frame (``truncated``), a connection silent for ``idle_timeout``
    seconds (``idle_timeout``) and one whose partial frame does not complete within
    ``idle_timeout`` seconds of the previous frame, however many bytes trickle in
    (``too_slow``: slowloris). A failed TLS handshake is counted as ``tls_handshake``.
    TLS from ``ssl_context`` or ``certfile``/``keyfile`` (with
    ``client_ca``, clients must present a certificate: mutual TLS). ``reuse_port`` sets
    ``SO_REUSEPORT`` so several processes can listen on the port (``serve --workers N``).
    """

    transport = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        framing: str = "newline",
        max_connections: int = 1024,
        idle_timeout: float = 300.0,
        max_message_size: int = 1 << 20,
        read_size: int = READ_SIZE,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        backlog: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._configure(ListenOptions.from_arguments(self.transport, locals()))
        if framing not in FRAMINGS:
            choices = ", ".join(FRAMINGS)
            raise ConfigurationError("tcp.framing", f"must be one of {choices}, got {framing!r}")
        if read_size < 1:
            raise ConfigurationError("tcp.read_size", "must be positive")
        self.framing = framing
        self.read_size = read_size
        self.backlog = backlog

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await self.listen(backlog=self.backlog)

        async def handle(stream: trio.abc.Stream) -> None:
            with ingress.budget.connection() as share:
                await self._handle(stream, ingress, share)

        await serve_connections(
            handle,
            listeners,
            ingress,
            max_connections=self.max_connections,
            bound=self.bound,
            task_status=task_status,
        )

    async def _handle(
        self, stream: trio.abc.Stream, ingress: Ingress, share: ConnectionShare
    ) -> None:
        peer = peer_of(stream)
        listener = ingress.listener
        idle_timeout = self.idle_timeout
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(idle_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                ingress.reject("tls_handshake")
                connection_errors.info("%s: %s: TLS handshake failed: %r", listener, peer, exc)
                return
        decoder = FRAMINGS[self.framing](self.max_message_size)
        receive = stream.receive_some
        read_size = self.read_size
        offer = ingress.offer
        # Long newline frames are copied out of one reused receive buffer instead of a new
        # chunk per read (NewlineDecoder.feed_buffer); plain TCP only (TLS reads its own way).
        # That buffer is twice read_size: with frames of kilobytes, the per-read costs (the
        # scheduler, the offer, the pump's wake-up) are what is left to spread, and reads of
        # 512 KiB cost 0.6-0.75x the CPU per message of 256 KiB ones at 4,266 and 79,435 bytes
        # (measured here; 1 MiB was worse than either: the buffer and the copies out of it no
        # longer stay in cache). Short frames keep read_size: a bigger chunk only makes a
        # bigger split and offer.
        newline = decoder if isinstance(decoder, NewlineDecoder) else None
        sock = stream.socket if type(stream) is trio.SocketStream else None
        buffer = bytearray()
        size = 0
        data: bytes | bytearray = b""
        # A frame must complete within idle_timeout of the last complete one (or of the
        # start): bytes that only extend a partial frame do not push the deadline back, so
        # a client trickling one byte at a time (slowloris) cannot hold the connection.
        deadline = trio.current_time() + idle_timeout
        while True:
            if sock is not None and share.budget.crowded and not unread_bytes(sock):
                # Nothing to read and the budget half taken: wait holding only the partial
                # frame (and no buffer), so that idle connections do not take the budget from
                # those that send. (Not always: a read after such a wait costs one more
                # scheduler round.)
                share.hold_nowait(decoder.buffered)
                buffer = bytearray()
                with trio.move_on_at(deadline):  # past it, the read below times out
                    await trio.lowlevel.wait_readable(sock)
            # Over the memory budget, stop reading (counted once per pause) until room frees:
            # what a read can bring in is charged before it, with the partial frame.
            holding = 2 * read_size + decoder.buffered
            if not share.hold_nowait(holding):
                ingress.reject("over_budget")
                await share.hold(holding)
                deadline = trio.current_time() + idle_timeout  # the pause was ours
            use_buffer = sock is not None and newline is not None and newline.long_frames
            with trio.move_on_at(deadline) as idle:
                if use_buffer:
                    assert sock is not None
                    if not buffer:
                        buffer = bytearray(2 * read_size)
                    size = await sock.recv_into(buffer)
                else:
                    data = await receive(read_size)
                    size = len(data)
            if idle.cancelled_caught:
                reason = "too_slow" if decoder.buffered else "idle_timeout"
                ingress.reject(reason)
                connection_errors.info(
                    "%s: %s: no complete frame for %.0f s (%s), closed",
                    listener,
                    peer,
                    idle_timeout,
                    reason,
                )
                return
            frames: Sequence[bytes]
            try:
                if not size:
                    frames = decoder.close()
                elif use_buffer:
                    assert newline is not None
                    frames = newline.feed_buffer(buffer, size)
                elif newline is not None:
                    # Short frames stay packed in their chunk: counted, not split (_frames.py).
                    chunk, end, count = newline.feed_packed(data)
                    frames = Frames(chunk, count, 0, end, marks=newline.marks)
                else:
                    frames = decoder.feed(data)
            except FrameTooLarge as exc:
                if exc.frames:  # whole frames before the bad one were well formed
                    await offer(exc.frames, Origin("tcp", listener, peer, time.time()))
                ingress.reject("oversize")
                connection_errors.info("%s: %s: %s; connection closed", listener, peer, exc)
                return
            except ProtocolError as exc:
                ingress.reject("truncated")
                connection_errors.info("%s: %s: %s", listener, peer, exc)
                return
            if frames:
                await offer(
                    frames,
                    Origin("tcp", listener, peer, time.time()),
                    nbytes=decoder.payload_bytes,
                )
            if not size:
                return
            if frames or not decoder.buffered:
                deadline = trio.current_time() + idle_timeout
