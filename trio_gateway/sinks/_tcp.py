"""A TCP sink: length-prefixed frames to another gateway's TCP source (or any such reader)."""

from __future__ import annotations

import select

import trio

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._message import Batch
from ..codecs import encode_length_prefixed
from ._base import Sink, connect_failure

__all__ = ("TcpSink",)


def encode_batch(batch: Batch) -> bytes:
    """4-byte big-endian length + payload per message, joined once."""
    return encode_length_prefixed(batch.payloads)


class TcpSink(Sink):
    """Sends each batch as length-prefixed frames over one TCP connection.

    On any connection error the stream is dropped and :class:`SinkError` raised; the gateway's
    pump retries the batch with exponential backoff, and the next attempt reconnects. A batch
    cut off mid-write is sent again whole, so delivery is at-least-once, with one limit: TCP has
    no acknowledgement from the destination's application, so "sent" means "written to the
    socket". Before each batch the sink checks whether the destination has closed its side
    (a clean exit or restart sends FIN) and reconnects instead of writing into a dead
    connection; what was in the kernel's buffers when a destination crashed is lost.
    """

    def __init__(
        self, host: str, port: int, *, connect_timeout: float = 5.0, send_timeout: float = 30.0
    ) -> None:
        if not host or not 0 < port <= 65535:
            raise ConfigurationError("sink", f"tcp sink needs HOST:PORT, got {host}:{port}")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.name = f"tcp:{host}:{port}"
        self.connects = 0
        self._stream: trio.SocketStream | None = None

    async def _connect(self) -> trio.SocketStream:
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            raise SinkError(f"{self.name}: connect failed: {exc!r}") from exc
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
        self.connects += 1
        return stream

    async def open(self) -> None:
        """Connect: a destination that refuses (or does not answer) is :class:`SinkUnavailable`."""
        try:
            self._stream = await self._connect()
        except SinkError as exc:
            cause = exc.__cause__
            if isinstance(cause, trio.TooSlowError):
                reason = f"no answer within {self.connect_timeout:g} s"
            else:
                reason = connect_failure(cause if cause is not None else exc)
            raise SinkUnavailable(self.name, reason) from exc

    @staticmethod
    def _peer_closed(stream: trio.SocketStream) -> bool:
        """True if the destination has closed its side.

        It never sends us anything, so a readable socket means EOF or a reset: one ``poll``
        with no timeout, once per batch.
        """
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(0))

    async def send(self, batch: Batch) -> None:
        if self._stream is not None and self._peer_closed(self._stream):
            # Writing now would "succeed" into the kernel and be lost when the RST comes back.
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)
        if self._stream is None:
            self._stream = await self._connect()
        data = encode_batch(batch)
        try:
            with trio.fail_after(self.send_timeout):
                await self._stream.send_all(data)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ) as exc:
            stream, self._stream = self._stream, None
            await trio.aclose_forcefully(stream)
            raise SinkError(f"{self.name}: send failed: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
