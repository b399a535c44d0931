"""WebSocket sinks on trio-websocket: forward to another application's endpoint (a client that
reconnects), or serve connected clients, each subscribed to a topic (messages back out).

Both keep a connection or a server open between batches, which needs tasks of their own: each
is also a gateway :class:`~trio_gateway.Service` (``Gateway(sink=s, services=[s])``; a
:class:`~trio_gateway.Pipeline` and ``serve`` add it), whose ``run`` owns those tasks.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._log import RateLimitedLogger, logger
from .._message import Batch, Origin
from .._secrets import redact_url
from ._base import Sink, connect_failure

if TYPE_CHECKING:
    from trio_websocket import WebSocketServer

__all__ = ("WebSocketBroadcastSink", "WebSocketSink")

_log = logger.getChild("sinks.websocket")
_errors = RateLimitedLogger(_log)
_MAX_RECONNECT_WAIT = 5.0


class WebSocketSink(Sink):
    """Sends every message as one WebSocket message to ``url`` (``ws://`` or ``wss://``).

    The connection is kept by :meth:`run` (a service of the gateway), which reconnects with
    backoff (0.1 s doubling to 5 s) whenever it is lost. ``send`` writes a batch's messages in
    order on the current connection; a write waits while the peer does not read (TCP's flow
    control: backpressure reaches the gateway's queue). A lost connection fails the batch,
    which the pump retries once :meth:`run` is connected again: at-least-once, as for TCP
    ("delivered" means written to the socket). ``text=True`` sends text messages (the payload
    as UTF-8) instead of binary ones.
    """

    def __init__(
        self,
        url: str,
        *,
        text: bool = False,
        connect_timeout: float = 5.0,
        max_message_size: int = 1 << 20,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ConfigurationError("sink", f"websocket sink needs ws:// or wss://, got {url!r}")
        if connect_timeout <= 0 or max_message_size < 1:
            raise ConfigurationError("sink", "websocket sink: positive timeouts and sizes")
        self.url = url
        self.text = text
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.name = redact_url(url)
        self.connects = 0
        self.sent = 0
        self._ws: WebSocketConnection | None = None
        self._changed = trio.Event()
        self._closing = False
        self._running = False

    async def open(self) -> None:
        """Connect once to check the endpoint (refused, no WebSocket there: SinkUnavailable)."""
        try:
            with trio.fail_after(self.connect_timeout):
                async with open_websocket_url(self.url, connect_timeout=self.connect_timeout):
                    pass
        except (OSError, HandshakeError, trio.TooSlowError) as exc:
            raise SinkUnavailable(self.name, _failure(exc)) from exc

    async def run(self, gateway: Any, *, task_status: trio.TaskStatus[Any]) -> None:
        """Keep one connection open, reconnecting with backoff, until :meth:`aclose`."""
        self._running = True
        task_status.started()
        attempt = 0
        while not self._closing:
            try:
                async with open_websocket_url(
                    self.url,
                    connect_timeout=self.connect_timeout,
                    max_message_size=self.max_message_size,
                ) as ws:
                    attempt = 0
                    self.connects += 1
                    self._set(ws)
                    while not self._closing:  # read (and drop) what the peer sends
                        await ws.get_message()
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                if not self._closing:
                    _errors.warning("%s: %s; reconnecting", self.name, _failure(exc))
            finally:
                self._set(None)
            if not self._closing:
                attempt += 1
                await trio.sleep(min(_MAX_RECONNECT_WAIT, 0.1 * 2 ** (attempt - 1)))

    def _set(self, ws: WebSocketConnection | None) -> None:
        self._ws = ws
        self._changed.set()
        self._changed = trio.Event()

    async def send(self, batch: Batch) -> None:
        if not self._running:
            raise SinkUnavailable(self.name, "not running: pass it in the gateway's services")
        with trio.move_on_after(self.connect_timeout):
            while self._ws is None:
                await self._changed.wait()
        ws = self._ws
        if ws is None:
            raise SinkError(f"{self.name}: not connected")
        try:
            if self.text:
                for payload in batch.payloads:
                    await ws.send_message(payload.decode("utf-8", "replace"))
            else:
                for payload in batch.payloads:
                    await ws.send_message(payload)
        except ConnectionClosed as exc:
            raise SinkError(f"{self.name}: connection closed ({exc.reason})") from exc
        self.sent += len(batch)

    async def aclose(self) -> None:
        self._closing = True
        if self._ws is not None:
            with trio.move_on_after(self.connect_timeout):
                await self._ws.aclose()


class WebSocketBroadcastSink(Sink):
    """Serves WebSocket clients on ``host:port``; each message goes to every client
    subscribed to its topic.

    A client subscribes by the path it connects to: ``ws://HOST:PORT/room1`` gets the
    messages whose topic is ``room1``; ``ws://HOST:PORT/`` gets every message. A message's
    topic is its origin's peer (``topic="$peer"``: for the NATS source, the subject) or a
    field of the payload as a JSON object (``topic="room"``); a payload without it has no
    topic and reaches only the clients of ``/``.

    Each client has a queue of ``client_queue`` messages written by a task of its own, so a
    slow client never holds up a batch or the other clients: when its queue is full, the
    message is dropped for that client and counted (:attr:`dropped`). At most ``max_clients``
    are served; more are refused (503 in the handshake). ``send`` never waits: a message is
    delivered once it is in the queues of the clients subscribed at that moment (none: it is
    counted in :attr:`unheard`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        topic: str = "$peer",
        max_clients: int = 1024,
        client_queue: int = 1024,
        max_message_size: int = 1 << 20,
    ) -> None:
        if max_clients < 1 or client_queue < 1 or not topic:
            raise ConfigurationError("sink", "websocket broadcast: positive limits and a topic")
        self.host = host
        self.port = port
        self.topic = topic
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.max_message_size = max_message_size
        self.name = f"ws-listen:{host}:{port}"
        self.bound: tuple[str, int] | None = None
        self._clients: dict[str, set[trio.MemorySendChannel[bytes]]] = defaultdict(set)
        self.clients = 0
        self.sent = 0
        """Client-messages queued (one message to three clients: three)."""
        self.dropped = 0
        """Client-messages dropped because that client's queue was full."""
        self.unheard = 0
        """Messages no client was subscribed to."""

    async def run(self, gateway: Any, *, task_status: trio.TaskStatus[Any]) -> None:
        """Serve clients until the gateway cancels its services."""
        async with trio.open_nursery() as nursery:
            server: WebSocketServer = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    self.host,
                    self.port,
                    None,
                    max_message_size=self.max_message_size,
                    task_status=task_status,
                )
            )
            self.bound = (self.host, server.port)
            self.name = f"ws-listen:{self.host}:{server.port}"
            _log.info("websocket broadcast on ws://%s:%d/TOPIC", *self.bound)
            task_status.started(self.bound)

    async def _handle(self, request: WebSocketRequest) -> None:
        if self.clients >= self.max_clients:
            await request.reject(503, body=b"too many clients\n")
            return
        topic = request.path.lstrip("/")
        ws = await request.accept()
        send, receive = trio.open_memory_channel[bytes](self.client_queue)
        self.clients += 1
        self._clients[topic].add(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, ws, receive, nursery.cancel_scope)
                try:
                    while True:  # the client's own messages are not for us: read and drop
                        await ws.get_message()
                except ConnectionClosed:
                    nursery.cancel_scope.cancel()
        finally:
            self._clients[topic].discard(send)
            if not self._clients[topic]:
                del self._clients[topic]
            self.clients -= 1

    async def _write(
        self,
        ws: WebSocketConnection,
        receive: trio.MemoryReceiveChannel[bytes],
        scope: trio.CancelScope,
    ) -> None:
        try:
            async for payload in receive:
                await ws.send_message(payload)
        except ConnectionClosed:
            scope.cancel()

    def _topics(self, batch: Batch) -> list[str | None]:
        topics: list[str | None] = []
        start = 0
        for origin, count in batch.runs:
            run = batch.payloads[start : start + count]
            start += count
            topics += [self._topic(payload, origin) for payload in run]
        return topics

    def _topic(self, payload: bytes, origin: Origin) -> str | None:
        if self.topic == "$peer":
            return origin.peer
        try:
            document = json.loads(payload)
        except ValueError:
            return None
        value = document.get(self.topic) if isinstance(document, dict) else None
        if value is None or isinstance(value, dict | list):
            return None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        return str(value)

    async def send(self, batch: Batch) -> None:
        everyone = self._clients.get("", set())
        for payload, topic in zip(batch.payloads, self._topics(batch), strict=True):
            listeners = everyone | self._clients.get(topic, set()) if topic else everyone
            if not listeners:
                self.unheard += 1
                continue
            for channel in listeners:
                try:
                    channel.send_nowait(payload)
                    self.sent += 1
                except trio.WouldBlock:
                    self.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # that client is leaving
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, int]:
        return {
            "clients": self.clients,
            "sent": self.sent,
            "dropped": self.dropped,
            "unheard": self.unheard,
        }


def _failure(exc: BaseException) -> str:
    if isinstance(exc, HandshakeError):
        # trio-websocket wraps the connect's OSError in a HandshakeError.
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, OSError):
            return connect_failure(inner)
        return f"handshake failed: {exc}" if str(exc) else "handshake failed"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, ConnectionClosed):
        return f"connection closed ({exc.reason})"
    return connect_failure(exc)
