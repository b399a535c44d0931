"""The WebSocket client sink on trio-websocket: forward to another application's endpoint,
reconnecting (the server that serves connected clients by topic is in ``_wsbroadcast.py``).

Both WebSocket sinks keep a connection or a server open between batches, which needs tasks of
their own: each is also a gateway :class:`~trio_gateway.Service`
(``Gateway(sink=s, services=[s])``; a :class:`~trio_gateway.Pipeline` and ``serve`` add it),
whose ``run`` owns those tasks.
"""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .._errors import ConfigurationError, SinkError, SinkUnavailable
from .._log import RateLimitedLogger, logger
from .._message import Batch
from .._secrets import redact_url
from ._base import Sink, connect_failure

__all__ = ("WebSocketSink",)

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
