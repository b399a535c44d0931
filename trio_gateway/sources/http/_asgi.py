"""The ingest endpoint as an ASGI application, and its serving through hypercorn.

:class:`IngestApp` applies :class:`IngestRules` to ASGI's HTTP scope; it runs under any ASGI
server. The HTTP source serves it with hypercorn's Trio worker for HTTP/1.1 when
``fast_path=False`` (HTTP/2 is served by :mod:`._h2`, which hypercorn could not be made safe
against hostile peers for; see docs/http.md): :func:`hypercorn_server` builds the
per-connection runner, :class:`ReplayStream` gives it a connection whose first bytes were
already read to route it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .._base import format_peer
from ._rules import IngestRules

__all__ = ("IngestApp", "ReplayStream", "hypercorn_server")

_log = logging.getLogger("trio_gateway.sources.http")

Scope: TypeAlias = dict[str, Any]
ASGIMessage: TypeAlias = dict[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[ASGIMessage]]
Send: TypeAlias = Callable[[ASGIMessage], Awaitable[None]]


class IngestApp:
    """The ingest endpoint as an ASGI 3 application (HTTP and lifespan scopes)."""

    def __init__(self, rules: IngestRules) -> None:
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            # Not ours (e.g. a WebSocket upgrade): refuse it politely.
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        rules = self.rules
        client = scope.get("client")
        peer = format_peer(tuple(client)) if client else ""
        refusal, kind = rules.head(
            scope["method"].encode(), scope["raw_path"] or scope["path"].encode(), scope["headers"]
        )
        reply = refusal
        if reply is None:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > rules.max_body_size:
                        reply = rules.body_too_large()
                        break
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            if reply is None:
                reply = await rules.ingest(b"".join(chunks), kind, peer)
        headers = [*reply.headers, *rules.cors_headers(scope["headers"])]
        if reply.close and str(scope.get("http_version", "1.1")).startswith("1"):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


class ReplayStream(trio.abc.Stream):
    """A stream whose first bytes were already read (to route the connection): replays them.

    Exposes ``socket`` like :class:`trio.SocketStream`, which hypercorn reads for addresses.
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes, socket: trio.socket.SocketType):
        self._stream = stream
        self._prefix = prefix
        self.socket = socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def hypercorn_server(
    app: IngestApp,
    *,
    idle_timeout: float,
    grace_period: float,
    max_header_size: int,
    handshake_timeout: float,
) -> tuple[Callable[[trio.abc.Stream], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """``(serve, terminate)``: ``serve(stream)`` runs hypercorn on one connection;
    ``terminate()`` tells every connection the server is stopping (hypercorn then closes idle
    keep-alive connections and adds ``Connection: close``)."""
    config = HypercornConfig()
    config.keep_alive_timeout = idle_timeout
    config.read_timeout = idle_timeout  # type: ignore[assignment]
    config.graceful_timeout = grace_period
    config.h11_max_incomplete_size = max_header_size
    config.ssl_handshake_timeout = handshake_timeout
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = _log
    context = WorkerContext(None)
    wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")

    async def serve(stream: trio.abc.Stream) -> None:
        await TCPServer(wrapped, config, context, {}, cast(Any, stream)).run()

    async def terminate() -> None:
        await context.terminated.set()

    return serve, terminate
