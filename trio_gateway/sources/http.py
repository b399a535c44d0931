"""Unary HTTP source: ``POST /ingest`` over HTTP/1.1, HTTP/2 (h2c and TLS/ALPN).

The request rules (path, method, token, size limit, NDJSON batches, what each refusal looks
like) live in :class:`IngestRules`, which knows nothing about the wire. Two front ends apply
them:

* :class:`IngestApp`, a plain ASGI application served by hypercorn's Trio support. It serves
  HTTP/2 (prior knowledge on cleartext, or ALPN ``h2`` on TLS), and every connection when
  ``fast_path=False``. It is also usable on its own under any ASGI server.
* a lean HTTP/1.1 path that drives h11 directly on the Trio stream. Hypercorn's Trio worker
  spends most of its time per request in its task and event machinery (measured in
  ``bench/http.py`` and ``docs/http.md``), so HTTP/1.1 (cleartext or TLS) takes this path by
  default.

The source owns the listening sockets and the accept loop (:func:`serve_connections`), so
``max_connections``, the shutdown grace period and the per-connection counters are the same
for both front ends. Each connection is routed on its first bytes: the HTTP/2 connection
preface goes to hypercorn, anything else to h11.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any, TypeAlias, cast

import h2.connection
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .._errors import ConfigurationError
from .._ingress import Ingress
from .._message import Origin
from .._tls import resolve_server_tls
from ._base import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Source,
    check_reuse_port,
    connection_errors,
    format_peer,
    linger,
    refuse_http2,
    serve_connections,
)

__all__ = ("HttpSource", "IngestApp", "IngestRules", "Reply")

_log = logging.getLogger("trio_gateway.sources.http")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_RECV = 64 * 1024
NDJSON_TYPES = frozenset({b"application/x-ndjson", b"application/ndjson"})

Scope: TypeAlias = dict[str, Any]
ASGIMessage: TypeAlias = dict[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[ASGIMessage]]
Send: TypeAlias = Callable[[ASGIMessage], Awaitable[None]]
Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, independent of the protocol version that carries it."""

    status: int
    headers: Headers
    body: bytes
    close: bool = False
    """Close the connection after answering (the request body was not read)."""


def _json_reply(
    status: int, payload: dict[str, object], *extra: tuple[bytes, bytes], close: bool = False
) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    )
    return Reply(status, headers, body, close)


class IngestRules:
    """What ``POST {path}`` accepts and how every refusal is answered (no I/O here).

    * the body is one message; with ``Content-Type: application/x-ndjson`` each non-blank
      line is one message and must be valid JSON (else ``400``, nothing is queued);
    * a body over ``max_body_size`` gets ``413`` (Content-Length is checked before reading);
    * when the queue refuses (``drop_newest`` full, or ``block`` still full after
      ``queue_wait`` seconds) the answer is ``503`` with ``Retry-After``. An NDJSON batch is
      queued in order, so a partial acceptance means "the first ``accepted`` lines are in":
      the body says ``{"accepted": k, "rejected": n - k}`` and the client resends from line k;
    * with a ``token``, ``Authorization: Bearer <token>`` is required (``401`` otherwise;
      compared in constant time).
    """

    def __init__(
        self,
        ingress: Ingress,
        *,
        path: str = "/ingest",
        max_body_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        token: str | None = None,
        queue_wait: float = 0.5,
        retry_after: int = 1,
    ) -> None:
        self.ingress = ingress
        self.path = path.encode()
        self.max_body_size = max_body_size
        self._token = token.encode() if token is not None else None
        self.queue_wait = queue_wait
        retry = (b"retry-after", str(retry_after).encode())
        self._retry = retry
        self.not_found = _json_reply(404, {"error": "not found"})
        self.not_allowed = _json_reply(405, {"error": "method not allowed"}, (b"allow", b"POST"))
        self.too_large = _json_reply(
            413, {"error": "body too large", "limit": max_body_size}, close=True
        )
        self.missing_token = _json_reply(
            401, {"error": "unauthorized"}, (b"www-authenticate", b'Bearer realm="trio_gateway"')
        )
        self.wrong_token = _json_reply(
            401,
            {"error": "unauthorized"},
            (b"www-authenticate", b'Bearer realm="trio_gateway", error="invalid_token"'),
        )
        self.queue_full = _json_reply(503, {"accepted": 0, "error": "queue full"}, retry)
        self.accepted_one = _json_reply(202, {"accepted": 1})
        self.empty = _json_reply(400, {"error": "empty body"})
        self.ambiguous_length = _json_reply(
            400, {"error": "both Content-Length and Transfer-Encoding"}, close=True
        )
        self.too_slow = _json_reply(408, {"error": "request not complete in time"}, close=True)
        self.too_many_connections = _json_reply(
            503, {"error": "too many connections"}, retry, close=True
        )

    def head(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> tuple[Reply | None, bool]:
        """Judge a request by its head. Returns ``(refusal or None, is_ndjson)``."""
        path = target.partition(b"?")[0]
        if path != self.path:
            return self.not_found, False
        if method != b"POST":
            return self.not_allowed, False
        authorization = None
        length = None
        ndjson = False
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                ndjson = value.partition(b";")[0].strip().lower() in NDJSON_TYPES
            elif name == b"authorization":
                authorization = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and chunked:
            # RFC 9112 section 6.3: a sign of request smuggling; refuse it and close.
            self.ingress.reject("malformed")
            return self.ambiguous_length, ndjson
        if self._token is not None:
            refusal = self._check_token(authorization)
            if refusal is not None:
                self.ingress.reject("unauthorized")
                return refusal, ndjson
        if length is not None and length.isdigit() and int(length) > self.max_body_size:
            self.ingress.reject("oversize")
            return self.too_large, ndjson
        return None, ndjson

    def _check_token(self, authorization: bytes | None) -> Reply | None:
        assert self._token is not None
        if authorization is None:
            return self.missing_token
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return self.missing_token
        if not hmac.compare_digest(credentials.strip(), self._token):
            return self.wrong_token
        return None

    def body_too_large(self) -> Reply:
        """Count and answer a body that grew past the limit while streaming."""
        self.ingress.reject("oversize")
        return self.too_large

    async def ingest(self, body: bytes, ndjson: bool, peer: str) -> Reply:
        """Queue the message(s) of a complete body and answer the sender."""
        ingress = self.ingress
        if ndjson:
            payloads = [line for line in body.split(b"\n") if line.strip()]
            if not payloads:
                ingress.reject("malformed")
                return self.empty
            for number, line in enumerate(payloads, 1):
                try:
                    json.loads(line)
                except ValueError:
                    ingress.reject("malformed")
                    return _json_reply(
                        400, {"error": "malformed NDJSON", "line": number, "accepted": 0}
                    )
        elif body:
            payloads = [body]
        else:
            ingress.reject("malformed")
            return self.empty
        origin = Origin("http", ingress.listener, peer, time.time())
        accepted = await ingress.offer_or_reject(payloads, origin, timeout=self.queue_wait)
        if accepted == len(payloads):
            if accepted == 1:
                return self.accepted_one
            return _json_reply(202, {"accepted": accepted})
        if not accepted:
            return self.queue_full
        return _json_reply(
            503,
            {"accepted": accepted, "rejected": len(payloads) - accepted, "error": "queue full"},
            self._retry,
        )


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
        refusal, ndjson = rules.head(
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
                reply = await rules.ingest(b"".join(chunks), ndjson, peer)
        headers = list(reply.headers)
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


class _ReplayStream(trio.abc.Stream):
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


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def _http1_bytes(reply: Reply) -> bytes:
    """``reply`` as an HTTP/1.1 response that closes the connection (as h11 writes it)."""
    head = [b"HTTP/1.1 %d %s\r\n" % (reply.status, _REASONS.get(reply.status, b""))]
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
    (``client_ca`` for mutual TLS); ALPN offers ``h2`` and ``http/1.1``. ``fast_path=False``
    sends HTTP/1.1 through hypercorn too (slower; see docs/http.md). ``reuse_port`` sets
    ``SO_REUSEPORT`` so several processes can listen on the port (``serve --workers N``).
    A connection past ``max_connections`` gets ``503`` with ``Retry-After`` before it is
    closed (on HTTP/2, as the answer to its first request, then ``GOAWAY``).
    """

    transport = "http"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str = "/ingest",
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
    ) -> None:
        super().__init__(
            host,
            port,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            max_message_size=max_message_size,
        )
        if not path.startswith("/"):
            raise ConfigurationError("http.path", f"must start with '/', got {path!r}")
        if max_header_size < 1024:
            raise ConfigurationError("http.max_header_size", "must be at least 1024")
        if queue_wait < 0:
            raise ConfigurationError("http.queue_wait", "must not be negative")
        if retry_after < 0:
            raise ConfigurationError("http.retry_after", "must not be negative")
        if token is not None and not token:
            raise ConfigurationError("http.token", "must not be empty")
        if handshake_timeout <= 0:
            raise ConfigurationError("http.handshake_timeout", "must be positive")
        ssl_context = resolve_server_tls(
            "http", ssl_context, certfile, keyfile, client_ca, alpn=("h2", "http/1.1")
        )
        self.path = path
        self.max_header_size = max_header_size
        self.token = token
        self.queue_wait = queue_wait
        self.retry_after = retry_after
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.fast_path = fast_path
        check_reuse_port("http.reuse_port", reuse_port)
        self.reuse_port = reuse_port
        self.bound: list[tuple[str, int]] = []

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def _hypercorn_config(self, grace_period: float) -> HypercornConfig:
        config = HypercornConfig()
        config.keep_alive_timeout = self.idle_timeout
        config.read_timeout = self.idle_timeout  # type: ignore[assignment]
        config.graceful_timeout = grace_period
        config.h11_max_incomplete_size = self.max_header_size
        config.ssl_handshake_timeout = self.handshake_timeout
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = _log
        return config

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
        )
        self.app = IngestApp(rules)
        config = self._hypercorn_config(ingress.grace_period)
        context = WorkerContext(None)
        hypercorn_app = wrap_app(cast(Any, self.app), config.wsgi_max_body_size, "asgi")

        async def serve_hypercorn(stream: trio.abc.Stream) -> None:
            await TCPServer(hypercorn_app, config, context, {}, cast(Any, stream)).run()

        handler = partial(self._connection, rules, serve_hypercorn)
        refuse = partial(self._refuse, rules.too_many_connections)

        async def announce_stop() -> None:
            await ingress.wait_stopping()
            # Hypercorn closes idle keep-alive connections and adds "Connection: close".
            await context.terminated.set()

        async with trio.open_nursery() as nursery:
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
        stream: trio.abc.Stream,
    ) -> None:
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                rules.ingress.reject("tls_handshake")
                connection_errors.info("%s: TLS handshake failed: %r", self.label, exc)
                return
            if stream.selected_alpn_protocol() == "h2":
                await serve_hypercorn(stream)
                return
            sock = stream.transport_stream.socket
        else:
            assert isinstance(stream, trio.SocketStream)
            sock = stream.socket
        try:
            peer = format_peer(sock.getpeername())
        except OSError:
            return  # already gone
        # Route on the first bytes: the HTTP/2 preface (prior knowledge) goes to hypercorn.
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
        if data.startswith(H2_PREFACE) or not self.fast_path:
            await serve_hypercorn(_ReplayStream(stream, data, sock))
            return
        if H2_PREFACE.startswith(data):
            rules.ingress.reject("too_slow")  # timed out in the middle of a preface
            return
        await self._serve_h11(rules, stream, data, peer)

    async def _serve_h11(
        self, rules: IngestRules, stream: trio.abc.Stream, data: bytes, peer: str
    ) -> None:
        """HTTP/1.1 with keep-alive, driven by h11 (one ``send_all`` per response)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_size)
        conn.receive_data(data)
        idle = self.idle_timeout
        max_body = rules.max_body_size
        ingress = rules.ingress

        async def next_event(deadline: float) -> Any:
            """The next h11 event; None at the deadline (answered 408 if a request began).

            A request (head and body) must be complete within ``idle_timeout`` of the end of
            the previous response: bytes trickling in do not extend it (slowloris).
            """
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                with trio.move_on_at(deadline):
                    conn.receive_data(cast(bytes, await stream.receive_some(MAX_RECV)))
                    continue
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    ingress.reject("too_slow")
                    connection_errors.info(
                        "%s: %s: request not complete within %.0f s", self.label, peer, idle
                    )
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await answer(rules.too_slow)
                return None

        async def answer(reply: Reply) -> None:
            headers = list(reply.headers)
            if reply.close:
                headers.append((b"connection", b"close"))
            out = conn.send(
                h11.Response(
                    status_code=reply.status,
                    headers=headers,
                    reason=_REASONS.get(reply.status, b""),
                )
            )
            assert out is not None
            out += conn.send(h11.Data(data=reply.body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)

        try:
            while True:
                deadline = trio.current_time() + idle
                event = await next_event(deadline)
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                reply, ndjson = rules.head(event.method, event.target, event.headers)
                if reply is None:
                    if conn.they_are_waiting_for_100_continue:
                        await stream.send_all(
                            conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                        )
                    chunks: list[bytes] = []
                    size = 0
                    while True:
                        event = await next_event(deadline)
                        if isinstance(event, h11.Data):
                            size += len(event.data)
                            if size > max_body:
                                reply = rules.body_too_large()
                                break
                            chunks.append(event.data)
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        else:
                            return  # closed or idle in the middle of the body
                    if reply is None:
                        # h11 hands over bytearrays: a payload is immutable bytes
                        body = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
                        reply = await rules.ingest(body, ndjson, peer)
                elif conn.their_state is h11.SEND_BODY:
                    # Refused before reading the body: answer and close rather than drain it.
                    reply = Reply(reply.status, reply.headers, reply.body, close=True)
                await answer(reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            ingress.reject("malformed")
            connection_errors.info("%s: bad HTTP/1.1 from %s: %s", self.label, peer, exc)
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                await answer(_json_reply(status, {"error": str(exc)}, close=True))
