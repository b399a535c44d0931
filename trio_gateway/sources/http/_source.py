"""HttpSource: the listener, its accept loop, and the routing of each connection.

The source owns the listening sockets and the accept loop (:func:`serve_connections`), so
``max_connections``, the shutdown grace period and the per-connection counters are the same
for every front end. Each connection is routed on its first bytes: the HTTP/2 connection
preface (or ALPN ``h2``) goes to our HTTP/2 server (:mod:`._h2`), anything else to the
direct HTTP/1.1 path on llhttp (:mod:`._h11`), or to hypercorn (:mod:`._asgi`) with
``fast_path=False``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import h2.connection
import trio

from ..._errors import ConfigurationError
from ..._h11server import reason_phrase
from ..._ingress import Ingress
from ..._wire import DEFAULT_HTTP_PATH
from .._base import (
    Source,
    linger,
    refuse_http2,
    serve_connections,
    tls_and_peer,
)
from .._http2 import PREFACE as H2_PREFACE
from .._options import DEFAULT_MAX_MESSAGE_SIZE, ListenOptions, check_origins
from .._sockets import socket_of
from ._asgi import IngestApp, ReplayStream, hypercorn_server
from ._h2 import serve_http2
from ._h11 import serve_http1
from ._reactor import Reactor, open_reactor
from ._rules import IngestRules, Reply

__all__ = ("HttpSource",)

_log = logging.getLogger("trio_gateway.sources.http")

MAX_RECV = 64 * 1024


def _http1_bytes(reply: Reply) -> bytes:
    """``reply`` as an HTTP/1.1 response that closes the connection (as h11 writes it)."""
    head = [b"HTTP/1.1 %d %s\r\n" % (reply.status, reason_phrase(reply.status))]
    head += [name + b": " + value + b"\r\n" for name, value in reply.headers]
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + reply.body


def _send_http2(reply: Reply, h2conn: h2.connection.H2Connection, stream_id: int) -> None:
    """``reply`` as a complete HTTP/2 response on ``stream_id`` (no connection headers)."""
    h2conn.send_headers(stream_id, ((b":status", b"%d" % reply.status), *reply.headers))
    h2conn.send_data(stream_id, reply.body, end_stream=True)


class HttpSource(Source):
    """``POST /ingest`` on HTTP/1.1 (keep-alive), HTTP/2 cleartext (prior knowledge) and TLS.

    ``max_message_size`` bounds the request body (default 1 MiB). ``token`` requires
    ``Authorization: Bearer <token>``. ``queue_wait`` is how long a request may wait for room
    under the ``block`` policy before it gets ``503``; ``retry_after`` is the ``Retry-After``
    value (seconds) sent with it. TLS comes from ``ssl_context`` or ``certfile``/``keyfile``
    (``client_ca`` for mutual TLS); ALPN offers ``h2`` and ``http/1.1``. HTTP/2 is served by
    our own sans-IO HTTP/2 layer (:mod:`._h2`: deadlines, bounded bodies, rapid-reset limit,
    graceful GOAWAY, the memory budget);
    ``fast_path=False`` sends HTTP/1.1 through hypercorn (slower; see docs/http.md). A
    request must be complete within ``idle_timeout`` of its start, on either version;
    ``max_held`` bounds the body bytes one HTTP/2 connection holds before only its oldest
    request may send more (default: one ``max_message_size``; see :mod:`._h2`). ``reuse_port`` sets
    ``SO_REUSEPORT`` so several processes can listen on the port (``serve --workers N``).
    A connection past ``max_connections`` gets ``503`` with ``Retry-After`` before it is
    closed (on HTTP/2, as the answer to its first request, then ``GOAWAY``).
    ``cors_origins`` lets pages from those origins (``https://app.example.com``; ``*``: any)
    read the answers: preflight ``OPTIONS`` answered, ``Access-Control-Allow-Origin`` on every
    answer to them (see docs/http.md); none of it unless given.
    """

    transport = "http"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str = DEFAULT_HTTP_PATH,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_header_size: int = 16 * 1024,
        token: str | None = None,
        queue_wait: float = 0.5,
        retry_after: int = 1,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        handshake_timeout: float = 10.0,
        fast_path: bool = True,
        reuse_port: bool = False,
        cors_origins: Sequence[str] = (),
        max_held: int | None = None,
    ) -> None:
        self._configure(
            ListenOptions.from_arguments(self.transport, locals(), alpn=("h2", "http/1.1"))
        )
        if not path.startswith("/"):
            raise ConfigurationError("http.path", f"must start with '/', got {path!r}")
        if max_header_size < 1024:
            raise ConfigurationError("http.max_header_size", "must be at least 1024")
        if queue_wait < 0:
            raise ConfigurationError("http.queue_wait", "must not be negative")
        if retry_after < 0:
            raise ConfigurationError("http.retry_after", "must not be negative")
        if max_held is not None and max_held < 1:
            raise ConfigurationError("http.max_held", "must be positive")
        self.max_held = max_held if max_held is not None else self.max_message_size
        self.path = path
        self.max_header_size = max_header_size
        self.token = token
        self.queue_wait = queue_wait
        self.retry_after = retry_after
        self.handshake_timeout = handshake_timeout
        self.fast_path = fast_path
        self.cors_origins = check_origins("http.cors_origins", cors_origins)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await self.listen(https_compatible=True)
        rules = IngestRules(
            ingress,
            path=self.path,
            max_body_size=self.max_message_size,
            token=self.token,
            queue_wait=self.queue_wait,
            retry_after=self.retry_after,
            cors_origins=self.cors_origins,
        )
        self.app = IngestApp(rules)
        serve_hypercorn, terminate = hypercorn_server(
            self.app,
            idle_timeout=self.idle_timeout,
            grace_period=ingress.grace_period,
            max_header_size=self.max_header_size,
            handshake_timeout=self.handshake_timeout,
        )
        refuse = partial(self._refuse, rules.too_many_connections)

        async def announce_stop() -> None:
            await ingress.wait_stopping()
            await terminate()

        async with (
            open_reactor(rules, self.idle_timeout) as reactor,
            trio.open_nursery() as nursery,
        ):
            handler = partial(self._connection, rules, serve_hypercorn, reactor)
            nursery.start_soon(announce_stop)
            await nursery.start(
                partial(
                    serve_connections,
                    handler,
                    listeners,
                    ingress,
                    max_connections=self.max_connections,
                    refuse=refuse,
                )
            )
            task_status.started(list(self.bound))
        _log.debug("%s: stopped", self.label)

    # -- one connection -------------------------------------------------------------------

    @staticmethod
    async def _refuse(reply: Reply, stream: trio.abc.Stream) -> None:
        """Answer a connection past ``max_connections`` with ``reply`` (``503``) in the
        protocol it speaks: HTTP/1.1 with ``Connection: close``, or on HTTP/2 (ALPN ``h2``,
        or the preface on cleartext) as the response to its first request, then ``GOAWAY``.
        ``serve_connections`` bounds the time (TLS handshake included)."""
        data = b""
        if isinstance(stream, trio.SSLStream):
            await stream.do_handshake()
            http2 = stream.selected_alpn_protocol() == "h2"
        else:
            # Cleartext: the first bytes tell HTTP/2 with prior knowledge from HTTP/1.1.
            while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                chunk = await stream.receive_some(MAX_RECV)
                if not chunk:
                    return  # connected and left
                data += chunk
            http2 = data.startswith(H2_PREFACE)
        if http2:
            await refuse_http2(stream, data, partial(_send_http2, reply), whole_requests=True)
            return
        # Answered before the request is read: linger reads it, so that the client can
        # finish sending and then read the answer (a close with unread bytes would reset).
        await stream.send_all(_http1_bytes(reply))
        await linger(stream)

    async def _connection(
        self,
        rules: IngestRules,
        serve_hypercorn: Callable[[trio.abc.Stream], Awaitable[None]],
        reactor: Reactor | None,
        stream: trio.abc.Stream,
    ) -> None:
        peer = await tls_and_peer(
            stream, rules.ingress, handshake_timeout=self.handshake_timeout, label=self.label
        )
        if peer is None:
            return
        if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() == "h2":
            await self._http2(rules, stream, b"", peer)
            return
        # Route on the first bytes: the HTTP/2 preface (prior knowledge) goes to serve_http2.
        data = b""
        with trio.move_on_after(self.idle_timeout):
            while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                chunk = await stream.receive_some(MAX_RECV)
                if not chunk:
                    return
                data += chunk
        if not data:
            rules.ingress.reject("idle_timeout")  # connected, then sent nothing
            return
        if data.startswith(H2_PREFACE):
            await self._http2(rules, stream, data, peer)
            return
        if not self.fast_path:
            await serve_hypercorn(ReplayStream(stream, data, socket_of(stream)))
            return
        if H2_PREFACE.startswith(data):
            rules.ingress.reject("too_slow")  # timed out in the middle of a preface
            return
        await serve_http1(
            rules,
            stream,
            data,
            peer,
            idle_timeout=self.idle_timeout,
            max_header_size=self.max_header_size,
            reactor=reactor,
        )

    async def _http2(
        self, rules: IngestRules, stream: trio.abc.Stream, data: bytes, peer: str
    ) -> None:
        await serve_http2(
            rules,
            stream,
            data,
            peer,
            idle_timeout=self.idle_timeout,
            max_header_size=self.max_header_size,
            max_held=self.max_held,
        )
