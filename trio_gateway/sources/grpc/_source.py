"""GrpcSource: the gateway's gRPC listener (unary, client-streaming and bidi ingest)."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Sequence
from typing import Any

import trio

from ..._errors import ConfigurationError
from ..._ingress import Ingress
from .._base import Source, peer_of, serve_connections
from .._http2 import DEFAULT_WINDOW
from .._options import ListenOptions
from ._server import DEFAULT_MAX_MESSAGE_SIZE, GrpcServer, ServerLimits, ServiceHandlers
from ._services import (
    GatewayService,
    HealthService,
    StreamingInputterService,
    UnaryInputterService,
)

__all__ = ("GrpcSource",)

_HEALTH_PATHS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
_SERVICE_NAMES = (
    "trio_gateway.v1.Gateway",
    "model.GrpcUnaryInputterService",
    "model.GrpcStreamingInputterService",
)


class GrpcSource(Source):
    """Serves ``trio_gateway.v1.Gateway``, the talk's ``model`` services and gRPC health.

    * ``Send`` and the talk's unary ``MakeRequest``: the reply is sent once the message is in
      the queue; RESOURCE_EXHAUSTED when the queue refuses it within ``queue_timeout``.
    * ``Stream`` and the talk's streaming ``MakeRequest``: every complete message of a read
      is offered at once; under ``block`` a full queue keeps the HTTP/2 window closed.
    * ``StreamAcked``: one Ack per message, accepted or rejected (``queue_full``).
    * ``grpc.health.v1.Health``: SERVING, NOT_SERVING once draining (exempt from the token).

    ``ssl_context`` enables TLS; ALPN ``h2`` is set on it. ``token`` requires
    ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED otherwise). ``services`` adds
    grpclib-style implementations of your own services to the same server. ``reuse_port`` sets
    ``SO_REUSEPORT`` so several processes can listen on the port (``serve --workers N``).
    The first calls of a connection past ``max_connections`` end ``UNAVAILABLE`` ("too many
    connections"), then ``GOAWAY`` closes it.
    """

    transport = "grpc"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_concurrent_streams: int = 128,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        token: str | None = None,
        queue_timeout: float = 1.0,
        services: Sequence[ServiceHandlers] = (),
        reuse_port: bool = False,
    ) -> None:
        self._configure(ListenOptions.from_arguments(self.transport, locals(), alpn=("h2",)))
        if max_concurrent_streams < 1:
            raise ConfigurationError("grpc.max_concurrent_streams", "must be at least 1")
        if queue_timeout < 0:
            raise ConfigurationError("grpc.queue_timeout", "must not be negative")
        if self.ssl_context is not None:
            self.ssl_context.set_alpn_protocols(["h2"])
        self.max_concurrent_streams = max_concurrent_streams
        self.token = token
        self.queue_timeout = queue_timeout
        self.services = tuple(services)

    def limits(self) -> ServerLimits:
        """The server's bounds; a connection's budget grows with ``max_message_size`` (the
        connection window plus four messages, 32 MiB at the default 4 MiB)."""
        defaults = ServerLimits()
        return ServerLimits(
            max_message_size=self.max_message_size,
            max_concurrent_streams=self.max_concurrent_streams,
            idle_timeout=self.idle_timeout,
            connection_budget=max(
                defaults.connection_budget,
                defaults.connection_window + 4 * self.max_message_size,
            ),
        )

    def server(self, ingress: Ingress) -> GrpcServer:
        """The h2 server with this source's services, wired to ``ingress``.

        The connection window is at most half of a connection's share of the memory budget:
        complete messages waiting for their handler (a full queue) are then held back by flow
        control, as the client sees it, before they could take the share; the other half is
        for partial and inflated messages.
        """
        limits = self.limits()
        window = max(DEFAULT_WINDOW, ingress.budget.connection_share // 2)
        if window < limits.connection_window:
            limits = dataclasses.replace(limits, connection_window=window)
        services: list[ServiceHandlers] = [
            GatewayService(ingress, queue_timeout=self.queue_timeout),
            UnaryInputterService(ingress, queue_timeout=self.queue_timeout),
            StreamingInputterService(ingress),
            HealthService(ingress, _SERVICE_NAMES),
            *self.services,
        ]
        return GrpcServer(
            services,
            wait_stopping=ingress.wait_stopping,
            reject=ingress.reject,
            limits=limits,
            bearer_token=self.token,
            public_paths=_HEALTH_PATHS,
            label=ingress.listener,
        )

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await self.listen()
        server = self.server(ingress)

        async def serve(stream: trio.abc.Stream) -> None:
            with ingress.budget.connection() as share:
                await server.serve_connection(stream, peer_of(stream), share=share)

        task_status.started(self.bound)
        await serve_connections(
            serve,
            listeners,
            ingress,
            max_connections=self.max_connections,
            refuse=server.refuse_connection,
        )
