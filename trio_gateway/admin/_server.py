"""The admin endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

A small HTTP/1.1-on-Trio server (low traffic: a scraper every few seconds and a load balancer's
probes), run as a gateway :class:`~trio_gateway._gateway.Service` so it lives in the gateway's
root nursery and keeps answering ``/readyz`` with 503 through the whole drain. Bounded: at most
``max_connections`` connections, ``max_header_size`` bytes of request head, ``timeout`` seconds
to read a request (also the keep-alive idle limit) and to write a response.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from .._errors import ConfigurationError, TransportError
from .._h11server import BadRequest, H11Server, Request, RequestTooSlow
from .._log import RateLimitedLogger, logger
from .._wire import DEFAULT_ADMIN
from ._collector import make_registry

if TYPE_CHECKING:
    from .._gateway import Gateway

__all__ = ("DEFAULT_ADMIN", "AdminServer")

_log = logger.getChild("admin")
_connection_errors = RateLimitedLogger(_log)
_scrape_errors = RateLimitedLogger(_log)

_ALLOWED = b"GET, HEAD"
_INDEX = b"trio_gateway admin endpoint: /metrics /healthz /readyz\n"


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [
            (b"content-type", content_type.encode()),
            (b"cache-control", b"no-store"),
            (b"content-length", b"%d" % len(body)),
            *extra,
        ]


class AdminServer:
    """Serves a gateway's metrics and health; pass it as ``Gateway(services=[AdminServer()])``.

    * ``GET /metrics``: Prometheus text format (OpenMetrics if the scraper asks for it in
      ``Accept``) from a registry of this gateway's own, read at scrape time.
    * ``GET /healthz``: 200 while the process runs.
    * ``GET /readyz``: 200 while the gateway accepts messages; 503 from the moment shutdown
      starts, through the drain (a load balancer stops sending new clients).
    * Anything else: 404; another method on those paths: 405 with ``Allow: GET, HEAD``.

    The value reported through ``task_status.started`` (and kept in :attr:`bound`) is the bound
    ``(host, port)``; port 0 picks a free port.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9100,
        *,
        max_connections: int = 64,
        max_header_size: int = 16 * 1024,
        timeout: float = 10.0,
        process_metrics: bool = True,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigurationError("admin.port", f"must be 0-65535, got {port}")
        if max_connections < 1:
            raise ConfigurationError("admin.max_connections", "must be at least 1")
        if max_header_size < 1024:
            raise ConfigurationError("admin.max_header_size", "must be at least 1024 bytes")
        if timeout <= 0:
            raise ConfigurationError("admin.timeout", "must be positive")
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_header_size = max_header_size
        self.timeout = timeout
        self.process_metrics = process_metrics
        self.bound: tuple[str, int] | None = None
        self.addresses: list[tuple[str, int]] = []
        self.registry: CollectorRegistry | None = None
        """The gateway's registry, created by :meth:`run` (usable after it too)."""
        self._active = 0

    def __repr__(self) -> str:
        return f"<AdminServer {self.host}:{self.port}>"

    async def run(
        self, gateway: Gateway, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled (the gateway cancels its services once the ledger is final)."""
        registry = make_registry(gateway, process_metrics=self.process_metrics)
        await self.serve(gateway, registry, task_status=task_status)

    async def serve(
        self,
        health: Gateway,
        registry: CollectorRegistry,
        *,
        what: str = "",
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, then serve ``registry`` on /metrics and ``health``'s state on /readyz.

        ``health`` needs only ``accepting`` and ``state`` (the workers' supervisor has both).
        """
        self.registry = registry
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise TransportError(
                f"admin endpoint: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self.addresses = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
        self.bound = self.addresses[0]
        _log.info("admin endpoint on http://%s:%d/metrics%s", *self.bound, what)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, health, registry, nursery)
            task_status.started(self.bound)

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        gateway: Gateway,
        registry: CollectorRegistry,
        nursery: trio.Nursery,
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of file descriptors and the like: wait and try again, as trio does.
                    _connection_errors.warning("admin: accept failed (%s); retrying", exc)
                    await trio.sleep(0.1)
                    continue
                if self._active >= self.max_connections:
                    _connection_errors.info("admin: connection refused: limit reached")
                    await trio.aclose_forcefully(stream)
                    continue
                self._active += 1
                nursery.start_soon(self._serve_connection, stream, gateway, registry)

    async def _serve_connection(
        self, stream: trio.SocketStream, gateway: Gateway, registry: CollectorRegistry
    ) -> None:
        try:
            async with stream:
                await self._exchange(stream, gateway, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            _connection_errors.info("admin: connection ended: %r", exc)
        finally:
            self._active -= 1

    async def _exchange(
        self, stream: trio.SocketStream, gateway: Gateway, registry: CollectorRegistry
    ) -> None:
        http = H11Server(stream, max_header_size=self.max_header_size)
        while True:
            try:
                request = await http.receive_request(trio.current_time() + self.timeout)
            except RequestTooSlow:
                return
            except BadRequest as exc:
                if http.can_respond:
                    await self._send(http, None, _Reply(exc.status, f"{exc}\n".encode()))
                return
            if request is None:
                return  # timed out or the peer closed between requests
            http.skip_buffered_body()  # our endpoints take none
            await self._send(http, request, self._route(request, gateway, registry))
            if not http.next_cycle():
                return  # asked to close, or a request body we did not read

    def _route(self, request: Request, gateway: Gateway, registry: CollectorRegistry) -> _Reply:
        path = request.target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/healthz", b"/readyz", b"/"):
            return _Reply(404, b"not found\n")
        if request.method not in (b"GET", b"HEAD"):
            return _Reply(405, b"method not allowed\n", extra=((b"allow", _ALLOWED),))
        if path == b"/metrics":
            accept = b",".join(v for k, v in request.headers if k == b"accept")
            try:
                if b"application/openmetrics-text" in accept:
                    body = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
                    return _Reply(200, body, OPENMETRICS_CONTENT_TYPE)
                return _Reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            except Exception as exc:
                # A broken collector (a user's, registered on this registry) fails the scrape,
                # never the gateway.
                _scrape_errors.warning("admin: /metrics failed: %r", exc)
                return _Reply(500, b"metrics collection failed; see the gateway's log\n")
        if path == b"/healthz":
            return _Reply(200, b"ok\n")
        if path == b"/readyz":
            if gateway.accepting:
                return _Reply(200, b"ready\n")
            # The reason (``readiness``: "waiting for the sink: ..."); the workers' supervisor,
            # which serves this endpoint too, has only its state.
            body = f"not ready: {getattr(gateway, 'readiness', gateway.state)}\n".encode()
            return _Reply(503, body, extra=((b"retry-after", b"5"),))
        return _Reply(200, _INDEX)

    async def _send(self, http: H11Server, request: Request | None, reply: _Reply) -> None:
        await http.respond(
            reply.status,
            reply.headers,
            reply.body,
            close=request is None,
            head_only=request is not None and request.method == b"HEAD",
            deadline=trio.current_time() + self.timeout,
        )
        if _log.isEnabledFor(logging.DEBUG) and request is not None:
            _log.debug(
                "admin: %s %s -> %d", request.method.decode(), request.target.decode(), reply.status
            )
