"""Streaming TCP: newline or 4-byte length-prefixed frames, chosen per listener."""

from __future__ import annotations

import ssl
import time
from typing import Any

import trio

from .._errors import ConfigurationError, FrameTooLarge, ProtocolError
from .._ingress import Ingress
from .._message import Origin
from .._tls import resolve_server_tls
from ..codecs import FRAMINGS
from ._base import Source, connection_errors, format_peer, serve_connections

__all__ = ("TcpSource",)

READ_SIZE = 256 * 1024


def _peer_of(stream: trio.abc.Stream) -> str:
    inner: Any = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    sock = getattr(inner, "socket", None)
    try:
        return format_peer(sock.getpeername()) if sock is not None else ""
    except OSError:
        return ""


class TcpSource(Source):
    """Accepts TCP connections; each one is a stream of frames.

    Per connection: reads of up to ``read_size`` bytes, decoded with the listener's framing
    (``"newline"`` or ``"length"``), every frame of a read offered to the queue in one call.
    Under the ``block`` policy a full queue stops the reading, so the kernel's receive window
    fills and the client's ``send`` blocks: real backpressure. A frame over
    ``max_message_size`` closes that connection only (counted as ``oversize``); so does a
    stream that ends mid-frame (``truncated``) and a connection silent for ``idle_timeout``
    seconds (``idle_timeout``). TLS from ``ssl_context`` or ``certfile``/``keyfile`` (with
    ``client_ca``, clients must present a certificate: mutual TLS).
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
    ) -> None:
        super().__init__(
            host,
            port,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            max_message_size=max_message_size,
        )
        if framing not in FRAMINGS:
            choices = ", ".join(FRAMINGS)
            raise ConfigurationError("tcp.framing", f"must be one of {choices}, got {framing!r}")
        if read_size < 1:
            raise ConfigurationError("tcp.read_size", "must be positive")
        self.framing = framing
        self.read_size = read_size
        self.ssl_context = resolve_server_tls(
            "tcp", ssl_context, certfile, keyfile, client_ca, alpn=None
        )
        self.backlog = backlog
        self.bound: list[tuple[str, int]] = []

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners: list[Any] = await trio.open_tcp_listeners(
            self.port, host=self.host, backlog=self.backlog
        )
        self.bound = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
        if self.ssl_context is not None:
            listeners = [
                trio.SSLListener(ln, self.ssl_context, https_compatible=False) for ln in listeners
            ]

        async def handle(stream: trio.abc.Stream) -> None:
            await self._handle(stream, ingress)

        await serve_connections(
            handle,
            listeners,
            ingress,
            max_connections=self.max_connections,
            bound=self.bound,
            task_status=task_status,
        )

    async def _handle(self, stream: trio.abc.Stream, ingress: Ingress) -> None:
        peer = _peer_of(stream)
        listener = ingress.listener
        decoder = FRAMINGS[self.framing](self.max_message_size)
        receive = stream.receive_some
        read_size = self.read_size
        idle_timeout = self.idle_timeout
        offer = ingress.offer
        while True:
            with trio.move_on_after(idle_timeout) as idle:
                data = await receive(read_size)
            if idle.cancelled_caught:
                ingress.reject("idle_timeout")
                connection_errors.info(
                    "%s: %s idle for %.0f s, closed", listener, peer, idle_timeout
                )
                return
            try:
                frames = decoder.feed(data) if data else decoder.close()
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
                await offer(frames, Origin("tcp", listener, peer, time.time()))
            if not data:
                return
