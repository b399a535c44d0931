"""``python -m trio_gateway send``: a load-generating client for every transport.

One function per transport; each sends ``count`` messages of ``size`` bytes (see
:func:`make_payload`) and returns a :class:`SendSummary`:

* :func:`send_tcp` (newline or length-prefixed frames, large writes) and :func:`send_udp`
  (one datagram per message). Neither protocol answers, so the summary has no accepted count.
* :func:`send_http`: ``POST`` one message (or an NDJSON batch of ``ndjson`` messages) per
  request, driven by h11 over Trio streams, on ``concurrency`` keep-alive connections.
  ``202`` counts as accepted; any other status rejects the request's messages under that
  status, except that a ``503`` body's ``{"accepted": k}`` (a partly queued batch) is honoured.
* :func:`send_websocket`: every message is one binary WebSocket message, framed by the
  ``websockets`` Sans-I/O :class:`~websockets.client.ClientProtocol` over a Trio stream.
  WebSocket has no per-message acknowledgement: the closing handshake is the receipt. When the
  gateway answers our close with ``1000``, it has read every message before it (TCP keeps
  order), and they count as accepted. When it closes first (``1009`` too big, ``1001``
  stopping) the client cannot tell which were read, so the connection's messages are all
  reported under ``close <code>``. With ``acks=True`` the client offers the subprotocol
  ``trio-gateway.ack.v1`` and counts what the gateway's acks say instead: accepted, or
  refused by reason (``queue_full``, ``gateway_stopping``); messages no ack covered when the
  connection ended count under the close code (``unacknowledged`` after a clean close).
* :func:`send_grpc`: the gateway's own ``trio_gateway.v1.Gateway`` service (``Send``,
  ``Stream``, ``StreamAcked``), over a small HTTP/2 client on ``h2`` (the mirror of
  ``sources/grpc/_server.py``) with the generated message classes. No grpcio and no asyncio:
  the client is Trio all the way, flow control included.

Every message ends in exactly one bucket: ``accepted + sum(rejected.values()) == messages``
for the transports that answer. A refusal that every further message would meet as well (a
WebSocket handshake answered ``401``, a gRPC stream ended with ``UNAUTHENTICATED``, a close
``1009``) stops the run, and the messages not sent yet are counted under the same reason.
Refusals of single requests (HTTP ``401``/``503``, unary ``RESOURCE_EXHAUSTED``, a negative
bidi ack) do not stop it. Failures of the connection itself (refused, reset, TLS, no answer
within ``step_timeout`` seconds) raise :class:`~trio_gateway.TransportError`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import struct
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio
from grpclib.const import Status
from grpclib.metadata import decode_grpc_message, encode_timeout
from h2.settings import SettingCodes
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State as WsState
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI, parse_uri

from ._errors import ConfigurationError, GatewayError, ProtocolError, TransportError
from ._proto import gateway_pb2
from .codecs import GrpcMessageDecoder, encode_length_prefixed, encode_newline
from .sources.websocket import ACK_SUBPROTOCOL

__all__ = (
    "DEFAULT_TIMEOUT",
    "GRPC_MODES",
    "MAX_CONCURRENCY",
    "SendSummary",
    "client_ssl_context",
    "make_payload",
    "resolve_token",
    "send_grpc",
    "send_http",
    "send_tcp",
    "send_udp",
    "send_websocket",
)

DEFAULT_TIMEOUT = 30.0
"""Seconds any one network step (connect, a write, an answer, the close) may take."""
MAX_CONCURRENCY = 1024
"""The most connections one run opens."""
GRPC_MODES = ("unary", "stream", "bidi")

_CHUNK_BYTES = 256 * 1024
_READ_SIZE = 64 * 1024
_MAX_REPLY = 64 * 1024
"""The most of an answer's body kept (the gateway's answers are tiny JSON or protobuf)."""
_USER_AGENT = "trio_gateway-send"


def make_payload(size: int, seq: int) -> bytes:
    """A deterministic JSON document of exactly ``size`` bytes (no newline inside).

    Below 19 bytes the JSON object does not fit: the payload is then the JSON number
    ``seq mod 10**size``, right-aligned with spaces (still valid JSON, for NDJSON batches).
    """
    head = b'{"seq":%d,"data":"' % seq
    tail = b'"}'
    fill = size - len(head) - len(tail)
    if fill < 0:
        return b"%*d" % (size, seq % 10**size) if size else b""
    return head + b"x" * fill + tail


@dataclass(frozen=True, slots=True)
class SendSummary:
    """What one run did. ``accepted`` is ``None`` for TCP and UDP (they never answer)."""

    messages: int
    bytes: int
    seconds: float
    accepted: int | None = None
    rejected: Mapping[str, int] = field(default_factory=dict)
    """Messages refused, by reason: an HTTP status (``"503"``), a gRPC status name
    (``"RESOURCE_EXHAUSTED"``), a bidi ack's reason (``"queue_full"``), ``"close 1009"``."""
    resent: int = 0
    """Messages sent again after a ``503`` or ``429`` (HTTP with ``retries``), each time."""

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    @property
    def all_accepted(self) -> bool:
        """True when the gateway accepted every message (TCP/UDP: every message was written)."""
        if self.accepted is None:
            return True
        return self.accepted == self.messages and not self.rejected_count

    def line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        text = (
            f"sent {self.messages} messages, {self.bytes} bytes in {self.seconds:.3f} s: "
            f"{self.messages / seconds:,.0f} msg/s, {self.bytes / seconds / 1e6:,.2f} MB/s"
        )
        if self.accepted is None:
            return text
        text += f"; accepted {self.accepted}, rejected {self.rejected_count}"
        if self.rejected:
            reasons = sorted(self.rejected.items(), key=lambda item: (-item[1], item[0]))
            text += " (" + ", ".join(f"{reason}: {n}" for reason, n in reasons) + ")"
        if self.resent:
            text += f"; resent {self.resent} after 503/429"
        return text


# -- shared plumbing ------------------------------------------------------------------------


def resolve_token(value: str | None, *, key: str = "--token") -> str | None:
    """``TOKEN`` as it is, or ``env:NAME`` read from the environment."""
    if value is None:
        return None
    if value.startswith("env:"):
        name = value.removeprefix("env:")
        if name not in os.environ:
            raise ConfigurationError(key, f"environment variable {name} is not set")
        value = os.environ[name]
    if not value:
        raise ConfigurationError(key, "must not be empty")
    if any(c in value for c in "\r\n\0"):
        raise ConfigurationError(key, "must not contain line breaks")
    return value


def client_ssl_context(
    cafile: str | None = None, *, alpn: list[str] | None = None, key: str = "--ca"
) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``cafile`` (a private CA)."""
    context = ssl.create_default_context()
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except FileNotFoundError as exc:
            raise ConfigurationError(key, f"cannot read {cafile!r}: {exc.strerror}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(key, f"not a valid CA bundle: {exc}") from exc
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def _connect(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    step_timeout: float,
) -> trio.abc.Stream:
    """A TCP (or TLS) stream with TCP_NODELAY; every failure becomes a TransportError."""
    where = f"{host}:{port}"
    try:
        with trio.fail_after(step_timeout):
            tcp = await trio.open_tcp_stream(host, port)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if ssl_context is None:
                return tcp
            tls = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            return tls
    except trio.TooSlowError as exc:
        raise TransportError(
            f"cannot connect to {where}: no answer within {step_timeout:g} s"
        ) from exc
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        raise TransportError(f"TLS handshake with {where} failed: {cause}") from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


class _Run:
    """The messages of one run, shared by its connections: who sends which, and the tally.

    Connections :meth:`claim` ranges of sequence numbers (so ``concurrency`` connections split
    the work without a lock: nothing awaits between reading and advancing ``_next``), pace
    themselves on the sequence number against ``rate``, and report what became of them.
    """

    def __init__(
        self,
        count: int,
        size: int,
        *,
        rate: float | None,
        progress: Callable[[int], None] | None,
        progress_on_write: bool = False,
    ) -> None:
        self.count = count
        self.size = size
        self.rate = rate
        # The progress bar moves as messages are answered, or, where the answer only comes
        # at the end of a connection (WebSocket, gRPC Stream), as they are written.
        self._progress = progress
        self._on_write = progress_on_write
        self._next = 0
        self.bytes = 0
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.resent = 0
        self.stopped: str | None = None
        self.start = trio.current_time()
        self.wall = time.perf_counter()

    def chunk(self) -> int:
        """How many messages one write carries: ~256 KiB, ~100 writes a second under a rate."""
        n = max(1, _CHUNK_BYTES // max(self.size, 1))
        if self.rate:
            n = max(1, min(n, math.ceil(self.rate / 100)))
        return n

    def claim(self, limit: int) -> range:
        """The next ``limit`` (or fewer) sequence numbers; empty when all are taken."""
        first = self._next
        n = min(limit, self.count - first)
        if n <= 0:
            return range(0)
        self._next = first + n
        return range(first, first + n)

    def payloads(self, seqs: range) -> list[bytes]:
        size = self.size
        return [make_payload(size, seq) for seq in seqs]

    async def pace(self, seq: int) -> None:
        """Wait until message ``seq`` is due under ``rate``."""
        if self.rate:
            delay = self.start + seq / self.rate - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)

    def wrote(self, n: int) -> None:
        self.bytes += n * self.size
        if self._on_write:
            self._advance(n)

    def accept(self, n: int) -> None:
        if n > 0:
            self.accepted += n
            if not self._on_write:
                self._advance(n)

    def reject(self, reason: str, n: int) -> None:
        if n > 0:
            self.rejected[reason] += n
            if not self._on_write:
                self._advance(n)

    def reject_unsent(self, reason: str, n: int) -> None:
        """Reject messages that were claimed but never written (the refusal came first)."""
        self.reject(reason, n)
        if self._on_write:
            self._advance(n)

    def stop(self, reason: str) -> None:
        """A refusal every further message would meet: count the unsent ones under it."""
        if self.stopped is None:
            self.stopped = reason
        rest = self.count - self._next
        self._next = self.count
        self.reject_unsent(reason, rest)

    def _advance(self, n: int) -> None:
        if self._progress is not None and n > 0:
            self._progress(n)

    def summary(self) -> SendSummary:
        return SendSummary(
            self.count,
            self.bytes,
            time.perf_counter() - self.wall,
            accepted=self.accepted,
            rejected=dict(self.rejected),
            resent=self.resent,
        )


def _check_common(count: int, size: int, concurrency: int, step_timeout: float) -> None:
    if count < 0:
        raise ConfigurationError("--count", "must not be negative")
    if size < 0:
        raise ConfigurationError("--size", "must not be negative")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigurationError("--concurrency", f"must be 1-{MAX_CONCURRENCY}")
    if step_timeout <= 0:
        raise ConfigurationError("--timeout", "must be positive")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _run_workers(concurrency: int, worker: Callable[[], Awaitable[None]]) -> None:
    """Run ``concurrency`` workers; a failure of theirs is raised as itself, not as a group
    (the first one: the others are usually the same failure seen by another connection)."""
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if all(isinstance(leaf, GatewayError) for leaf in leaves):
            raise leaves[0] from leaves[0].__cause__
        raise


# -- TCP and UDP ----------------------------------------------------------------------------


async def send_tcp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    framing: str = "newline",
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
) -> SendSummary:
    """Send ``count`` messages of ``size`` bytes over one connection, in large writes.

    At the end the client half-closes and waits for the gateway to close its side: by then
    the gateway has read everything. (TLS cannot half-close: the client closes after writing.)
    """
    encode = {"newline": encode_newline, "length": encode_length_prefixed}.get(framing)
    if encode is None:
        raise ConfigurationError("--framing", f"must be newline or length, got {framing!r}")
    per_chunk = max(1, _CHUNK_BYTES // max(size, 1))
    if rate:
        per_chunk = max(1, min(per_chunk, math.ceil(rate / 100)))  # about 100 writes a second
    stream = await _connect(host, port, ssl_context=ssl_context, step_timeout=step_timeout)
    sent = total = 0
    start = trio.current_time()
    wall = time.perf_counter()
    try:
        async with stream:
            while sent < count:
                n = min(per_chunk, count - sent)
                data = encode([make_payload(size, sent + i) for i in range(n)])
                with trio.fail_after(step_timeout):
                    await stream.send_all(data)
                sent += n
                if progress is not None:
                    progress(n)
                total += n * size
                if rate:
                    delay = start + sent / rate - trio.current_time()
                    if delay > 0:
                        await trio.sleep(delay)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                with trio.fail_after(step_timeout):
                    await stream.send_eof()
                    # The server closes its side once it has read everything we sent.
                    while await stream.receive_some(_READ_SIZE):
                        pass
    except trio.TooSlowError as exc:
        raise TransportError(f"{host}:{port}: no progress for {step_timeout:g} s") from exc
    except (trio.BrokenResourceError, OSError) as exc:
        raise TransportError(f"{host}:{port}: connection lost: {exc}") from exc
    return SendSummary(sent, total, time.perf_counter() - wall)


async def send_udp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send ``count`` datagrams of ``size`` bytes (UDP gives no delivery report)."""
    if size > 65_507:
        raise ConfigurationError("--size", "a UDP datagram carries at most 65507 bytes")
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    sent = 0
    start = trio.current_time()
    wall = time.perf_counter()
    with sock:
        await sock.connect(address)
        while sent < count:
            await sock.send(make_payload(size, sent))
            sent += 1
            if progress is not None and not sent % 1000:
                progress(1000)
            if rate:
                delay = start + sent / rate - trio.current_time()
                if delay > 0:
                    await trio.sleep(delay)
    return SendSummary(sent, sent * size, time.perf_counter() - wall)


# -- HTTP -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HttpTarget:
    secure: bool
    host: str
    port: int
    target: bytes  # path and query
    authority: bytes


def _parse_http_url(url: str, *, key: str = "--http") -> _HttpTarget:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(key, f"not a valid URL: {url!r} ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(key, f"expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigurationError(key, f"no host in {url!r}")
    if parts.fragment or parts.username or parts.password:
        raise ConfigurationError(key, f"no user or #fragment allowed in {url!r}")
    secure = parts.scheme == "https"
    port = port or (443 if secure else 80)
    path = parts.path or "/ingest"
    target = path + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = 443 if secure else 80
    authority = shown if port == default else f"{shown}:{port}"
    return _HttpTarget(secure, host, port, target.encode(), authority.encode())


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection driven by h11; one request in flight at a time."""

    def __init__(self, stream: trio.abc.Stream, where: str) -> None:
        self.stream = stream
        self.where = where
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(
        self, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, bytes, bool, float | None]:
        """POST ``body``: returns (status, start of the answer's body, connection reusable,
        the answer's ``Retry-After`` in seconds if it has one in that form)."""
        conn = self.h11
        head = [*headers, (b"content-length", b"%d" % len(body))]
        out = conn.send(h11.Request(method=b"POST", target=target, headers=head)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        send_error: BaseException | None = None
        try:
            await self.stream.send_all(out)
        except (trio.BrokenResourceError, OSError) as exc:
            # The gateway may have answered early (413, 401) and closed: read that answer.
            send_error = exc
        status = 0
        retry_after: float | None = None
        reply: list[bytes] = []
        kept = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(cast(bytes, await self.stream.receive_some(_READ_SIZE)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    retry_after = _retry_after(event.headers)
                elif isinstance(event, h11.Data):
                    if kept < _MAX_REPLY:
                        reply.append(bytes(event.data[: _MAX_REPLY - kept]))
                        kept += len(reply[-1])
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise TransportError(f"{self.where}: connection closed before an answer")
        except h11.RemoteProtocolError as exc:
            raise TransportError(f"{self.where}: bad HTTP answer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportError(
                f"{self.where}: connection lost before an answer: {send_error or exc}"
            ) from exc
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return status, b"".join(reply), reusable, retry_after

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


MAX_RETRY_WAIT = 30.0
"""Longest wait for a ``Retry-After`` before sending again (``send --retries``)."""


async def _open_http(
    target: _HttpTarget, context: ssl.SSLContext | None, where: str, step_timeout: float
) -> _HttpConnection:
    stream = await _connect(
        target.host, target.port, ssl_context=context, step_timeout=step_timeout
    )
    return _HttpConnection(stream, where)


def _retry_after(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """``Retry-After`` as delta-seconds (what the gateway sends); None if absent or a date."""
    for name, value in headers:
        if name == b"retry-after":
            return float(value) if value.isdigit() else None
    return None


def _http_accepted(status: int, body: bytes, n: int) -> int:
    """How many of the request's ``n`` messages the gateway queued."""
    if status == 202 or status == 503:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            accepted = answer.get("accepted")
            if isinstance(accepted, int) and not isinstance(accepted, bool):
                return max(0, min(accepted, n))
        return n if status == 202 else 0
    return n if 200 <= status < 300 else 0


async def send_http(
    url: str,
    *,
    count: int,
    size: int,
    concurrency: int = 1,
    ndjson: int | None = None,
    token: str | None = None,
    cafile: str | None = None,
    rate: float | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    retries: int = 0,
) -> SendSummary:
    """``POST`` ``count`` messages to ``url`` (default path ``/ingest``), one per request or
    ``ndjson`` per request as ``application/x-ndjson``, on ``concurrency`` keep-alive
    connections. ``https://`` verifies the gateway against the system CAs or ``cafile``.

    With ``retries``, what a ``503`` or ``429`` refused (for an NDJSON batch: the lines after
    the ones its body says were queued) is sent again after the answer's ``Retry-After``
    (1 s without one, at most :data:`MAX_RETRY_WAIT`), up to ``retries`` times per request;
    only what is still refused then counts as rejected."""
    _check_common(count, size, concurrency, step_timeout)
    if retries < 0:
        raise ConfigurationError("--retries", "must not be negative")
    if ndjson is not None and ndjson < 1:
        raise ConfigurationError("--ndjson", "must be at least 1")
    target = _parse_http_url(url)
    if cafile is not None and not target.secure:
        raise ConfigurationError("--ca", "needs an https:// URL")
    context = client_ssl_context(cafile, alpn=["http/1.1"]) if target.secure else None
    headers = [
        (b"host", target.authority),
        (b"user-agent", _USER_AGENT.encode()),
        (
            b"content-type",
            b"application/x-ndjson" if ndjson is not None else b"application/octet-stream",
        ),
    ]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    per_request = ndjson or 1
    where = f"{target.host}:{target.port}"
    run = _Run(count, size, rate=rate, progress=progress)

    async def worker() -> None:
        conn: _HttpConnection | None = None
        try:
            while seqs := run.claim(per_request):
                await run.pace(seqs.start)
                payloads = run.payloads(seqs)
                run.wrote(len(payloads))
                for attempt in range(retries + 1):
                    if conn is None:
                        conn = await _open_http(target, context, where, step_timeout)
                    body = b"\n".join(payloads) + b"\n" if ndjson is not None else payloads[0]
                    try:
                        with trio.fail_after(step_timeout):
                            status, reply, reusable, retry_after = await conn.request(
                                target.target, headers, body
                            )
                    except trio.TooSlowError as exc:
                        raise TransportError(
                            f"{where}: no answer within {step_timeout:g} s"
                        ) from exc
                    if not reusable:
                        await conn.aclose()
                        conn = None
                    accepted = _http_accepted(status, reply, len(payloads))
                    run.accept(accepted)
                    payloads = payloads[accepted:]
                    if not payloads:
                        break
                    if status not in (429, 503) or attempt == retries:
                        run.reject(str(status), len(payloads))
                        break
                    run.resent += len(payloads)
                    wait = 1.0 if retry_after is None else retry_after
                    await trio.sleep(min(wait, MAX_RETRY_WAIT))
        finally:
            if conn is not None:
                await conn.aclose()

    await _run_workers(concurrency, worker)
    return run.summary()


# -- WebSocket ------------------------------------------------------------------------------


class _AckTally:
    """What one connection's acks said (``trio-gateway.ack.v1``, see ``docs/websocket.md``).

    Every ack settles the messages after the previous one's ``acked`` up to its own: accepted,
    except those in its ``refused`` ranges. An ack that does not fit that (numbers going back,
    past what was sent, ranges out of order) is a :class:`ProtocolError`.
    """

    def __init__(self, run: _Run, where: str) -> None:
        self.run = run
        self.where = where
        self.acked = 0
        self.sent = 0  # messages handed to the protocol so far

    def _bad(self, data: bytes, why: str) -> ProtocolError:
        return ProtocolError(f"{self.where}: bad ack ({why}): {data[:200]!r}")

    def apply(self, data: bytes) -> None:
        try:
            ack = json.loads(data)
        except ValueError as exc:
            raise self._bad(data, "not JSON") from exc
        if not isinstance(ack, dict):
            raise self._bad(data, "not an object")
        acked, refused = ack.get("acked"), ack.get("refused", [])
        if type(acked) is not int or not self.acked < acked <= self.sent:
            raise self._bad(data, f"acked must be in {self.acked + 1}..{self.sent}")
        if not isinstance(refused, list):
            raise self._bad(data, "refused must be a list")
        after = self.acked  # ranges ascend, disjoint, within (previous acked, acked]
        counts: Counter[str] = Counter()
        for entry in refused:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and type(entry[0]) is int
                and type(entry[1]) is int
                and isinstance(entry[2], str)
                and after < entry[0] <= entry[1] <= acked
            ):
                raise self._bad(data, "refused ranges must be [first, last, reason], ascending")
            counts[entry[2]] += entry[1] - entry[0] + 1
            after = entry[1]
        self.run.accept(acked - self.acked - sum(counts.values()))
        for reason, n in counts.items():
            self.run.reject(reason, n)
        self.acked = acked


class _WsConnection:
    """A client WebSocket on a Trio stream: the protocol object, a writer lock, a reader."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ClientProtocol,
        where: str,
        acks: _AckTally | None = None,
    ) -> None:
        self.stream = stream
        self.protocol = protocol
        self.where = where
        self.acks = acks
        self.lock = trio.Lock()
        self.closed = trio.Event()
        self.lost: BaseException | None = None

    async def flush(self) -> None:
        """Write what the protocol has queued (``b""`` means: half-close, if we can)."""
        async with self.lock:
            writes = self.protocol.data_to_send()
            data = b"".join(writes)
            if data:
                await self.stream.send_all(data)
            if writes and not writes[-1] and isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()

    async def handshake(self, token: str | None) -> WsResponse:
        protocol = self.protocol
        request = protocol.connect()
        request.headers["User-Agent"] = _USER_AGENT
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        protocol.send_request(request)
        await self.flush()
        while True:
            data = await self.stream.receive_some(_READ_SIZE)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            for event in protocol.events_received():
                if isinstance(event, WsResponse):
                    return event
            if not data:
                raise TransportError(f"{self.where}: connection closed during the handshake")

    async def read_until_closed(self) -> None:
        """Feed the protocol (it answers pings and the close frame) until the closing
        handshake is complete or the connection ends.

        The close frames are the receipt; the TCP close is not waited for. (Over TLS the
        gateway cannot half-close: it waits for our end of the connection instead.)"""
        protocol = self.protocol
        try:
            while protocol.state is not WsState.CLOSED:
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.lost = exc
                    data = b""
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()  # pings and the close are handled
                if self.acks is not None:  # the server sends no messages but acks
                    for event in events:
                        if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                            self.acks.apply(bytes(event.data))
                try:
                    await self.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.lost = self.lost or exc
                if not data or (protocol.close_rcvd is not None and protocol.close_sent):
                    return
        finally:
            self.closed.set()


def _ws_outcome(
    protocol: ClientProtocol, lost: BaseException | None, where: str, step_timeout: float
) -> str | None:
    """``None`` for a clean close we started and the server confirmed; else the server's
    close code as the reason. No close frame at all is a failure of the connection."""
    received = protocol.close_rcvd
    if received is None:
        if lost is not None or protocol.state is WsState.CLOSED:
            raise TransportError(f"{where}: connection lost without a close frame: {lost}")
        raise TransportError(f"{where}: no close frame within {step_timeout:g} s")
    if protocol.close_rcvd_then_sent or received.code != CloseCode.NORMAL_CLOSURE:
        return f"close {received.code}"
    return None


async def send_websocket(
    url: str,
    *,
    count: int,
    size: int,
    concurrency: int = 1,
    token: str | None = None,
    cafile: str | None = None,
    rate: float | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    acks: bool = False,
) -> SendSummary:
    """Send ``count`` binary messages to ``url`` (``ws://`` or ``wss://``) on ``concurrency``
    connections, then close each cleanly and wait for the gateway's close (the receipt).

    ``acks``: ask for acknowledgements (subprotocol ``trio-gateway.ack.v1``) and count what
    they say; a gateway that does not select it is a :class:`ProtocolError`."""
    _check_common(count, size, concurrency, step_timeout)
    try:
        wsuri: WebSocketURI = parse_uri(url)
    except InvalidURI as exc:
        raise ConfigurationError("--ws", f"not a ws:// or wss:// URL: {url!r}") from exc
    if cafile is not None and not wsuri.secure:
        raise ConfigurationError("--ca", "needs a wss:// URL")
    context = client_ssl_context(cafile, alpn=["http/1.1"]) if wsuri.secure else None
    where = f"{wsuri.host}:{wsuri.port}"
    run = _Run(count, size, rate=rate, progress=progress, progress_on_write=not acks)
    per_write = run.chunk()
    subprotocols = [Subprotocol(ACK_SUBPROTOCOL)] if acks else None

    async def worker() -> None:
        seqs = run.claim(per_write)
        if not seqs:
            return
        stream = await _connect(
            wsuri.host, wsuri.port, ssl_context=context, step_timeout=step_timeout
        )
        async with stream:
            tally = _AckTally(run, where) if acks else None
            connection = _WsConnection(
                stream,
                ClientProtocol(wsuri, subprotocols=subprotocols, max_size=_MAX_REPLY),
                where,
                tally,
            )
            protocol = connection.protocol
            try:
                with trio.fail_after(step_timeout):
                    response = await connection.handshake(token)
            except trio.TooSlowError as exc:
                raise TransportError(
                    f"{where}: no handshake answer within {step_timeout:g} s"
                ) from exc
            except (trio.BrokenResourceError, OSError) as exc:
                raise TransportError(f"{where}: connection lost in the handshake: {exc}") from exc
            failure = protocol.handshake_exc
            if failure is not None:
                reason = (
                    str(response.status_code)
                    if isinstance(failure, InvalidStatus)
                    else f"handshake failed: {failure}"
                )
                run.reject_unsent(reason, len(seqs))
                run.stop(reason)
                return
            if acks and protocol.subprotocol != ACK_SUBPROTOCOL:
                raise ProtocolError(
                    f"{where}: the gateway did not select {ACK_SUBPROTOCOL} (no acks there)"
                )
            written = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.read_until_closed)
                try:
                    while seqs and protocol.state is WsState.OPEN:
                        await run.pace(seqs.start)
                        for payload in run.payloads(seqs):
                            protocol.send_binary(payload)
                        if tally is not None:
                            tally.sent += len(seqs)
                        with trio.fail_after(step_timeout):
                            await connection.flush()
                        written += len(seqs)
                        run.wrote(len(seqs))
                        seqs = run.claim(per_write)
                    if protocol.state is WsState.OPEN:
                        protocol.send_close(CloseCode.NORMAL_CLOSURE)
                        with trio.fail_after(step_timeout):
                            await connection.flush()
                except trio.TooSlowError as exc:
                    raise TransportError(f"{where}: no progress for {step_timeout:g} s") from exc
                except (trio.BrokenResourceError, OSError) as exc:
                    connection.lost = connection.lost or exc
                # Wait for the server's close frame (or the end of the connection).
                with trio.move_on_after(step_timeout):
                    await connection.closed.wait()
                nursery.cancel_scope.cancel()
            outcome = _ws_outcome(protocol, connection.lost, where, step_timeout)
            if tally is not None:
                # Sent, but no ack covered it: its fate is unknown (the gateway closed first;
                # after a clean close there should be none: the last ack precedes its close).
                reason = outcome or "unacknowledged"
                run.reject(reason, tally.sent - tally.acked)
                # Claimed but never handed to the protocol (the loop ended before).
                run.reject_unsent(reason, written + len(seqs) - tally.sent)
                if outcome is not None:
                    run.stop(outcome)
            elif outcome is None:
                run.accept(written)  # sending stops early only when the server closes first
            else:
                run.reject(outcome, written)
                run.reject_unsent(outcome, len(seqs))
                run.stop(outcome)

    await _run_workers(concurrency, worker)
    return run.summary()


# -- gRPC -----------------------------------------------------------------------------------

_GRPC_PREFIX = struct.Struct(">BI")
_GRPC_SERVICE = "/trio_gateway.v1.Gateway/"
_GRPC_WRITE_HIGH_WATER = 512 * 1024
_GRPC_STREAM_WINDOW = 1 << 20
_GRPC_CONNECTION_WINDOW = 16 << 20


def _grpc_frame(message: Any) -> bytes:
    body: bytes = message.SerializeToString()
    return _GRPC_PREFIX.pack(0, len(body)) + body


def _status_name(code: int) -> str:
    try:
        return str(Status(code).name)
    except ValueError:
        return f"status {code}"


class _GrpcCall:
    """One call's stream, as the client sees it: replies in, a status at the end."""

    def __init__(self, conn: _H2Client, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.decoder = GrpcMessageDecoder(_MAX_REPLY)
        self.messages: deque[bytes] = deque()
        self.unacked = 0  # flow-controlled bytes received, handed back when read
        self.headers: dict[str, str] = {}
        self.status: str | None = None  # "OK", a status name, "HTTP 415", "connection lost"
        self.detail = ""
        self.remote_closed = False
        self.done = trio.Event()
        self._readable: trio.Event | None = None

    # fed by the connection's reader
    def _on_headers(self, headers: list[tuple[str, str]]) -> None:
        self.headers.update(headers)

    def _on_data(self, data: bytes, flow_len: int) -> None:
        self.unacked += flow_len
        try:
            for compressed, payload in self.decoder.feed(data):
                if compressed:
                    self._finish("INTERNAL", "compressed reply without grpc-encoding")
                    return
                self.messages.append(payload)
        except ProtocolError as exc:
            self._finish("INTERNAL", str(exc))
            return
        self._wake()

    def _on_end(self) -> None:
        headers = self.headers
        code = headers.get("grpc-status")
        if code is not None and code.isdigit():
            self._finish(
                _status_name(int(code)), decode_grpc_message(headers.get("grpc-message", ""))
            )
        elif headers.get(":status", "200") != "200":
            self._finish(f"HTTP {headers[':status']}", "")
        else:
            self._finish("UNKNOWN", "the call ended without a grpc-status")

    def _finish(self, status: str, detail: str) -> None:
        self.remote_closed = True
        if self.status is None:
            self.status = status
            self.detail = detail
        self._wake()
        self.done.set()

    def _wake(self) -> None:
        event = self._readable
        if event is not None:
            self._readable = None
            event.set()

    # used by the call's owner
    async def recv_batch(self) -> list[bytes]:
        """Every reply received so far; ``[]`` once the call is over."""
        if self.unacked:
            self.conn.release(self, self.unacked)
            self.unacked = 0
        while not self.messages:
            if self.remote_closed:
                return []
            self._readable = event = trio.Event()
            await event.wait()
        batch = list(self.messages)
        self.messages.clear()
        return batch

    async def send(self, data: bytes, *, end: bool = False) -> bool:
        """Send request bytes as flow control allows; False if the call is already over."""
        return await self.conn.send_data(self, data, end)


class _H2Client:
    """HTTP/2 for gRPC calls on one Trio stream: a reader task and a writer task.

    The mirror of the server in ``sources/grpc/_server.py``: the reader feeds ``h2`` and hands
    events to the calls; producers append ``h2``'s output to a buffer that the writer sends in
    one ``send_all`` per wake-up (bounded: producers wait above 512 KiB). Received DATA is
    acknowledged when the call reads it, so a window of replies is the most buffered.
    """

    def __init__(self, stream: trio.abc.Stream, *, authority: str, scheme: str) -> None:
        self.stream = stream
        self.authority = authority
        self.scheme = scheme
        self.h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.calls: dict[int, _GrpcCall] = {}
        self.terminated = False
        self.lost: BaseException | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._wake_writer = trio.Event()
        self._flushed = trio.Event()
        self._window_opened = trio.Event()

    # -- output
    def emit(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
            self._out_size += len(data)
            self._wake_writer.set()

    async def writer(self) -> None:
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                while self._out:
                    data = b"".join(self._out)
                    self._out = []
                    await self.stream.send_all(data)
                    self._out_size -= len(data)
                flushed, self._flushed = self._flushed, trio.Event()
                flushed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._lose(exc)

    async def flush(self) -> None:
        while self._out_size > 0 and self.lost is None:
            await self._flushed.wait()

    # -- input
    async def reader(self) -> None:
        h2conn = self.h2
        try:
            while True:
                data = await self.stream.receive_some(256 * 1024)
                if not data:
                    self._lose(EOFError("the gateway closed the connection"))
                    return
                try:
                    events = h2conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.emit()
                    self._lose(exc)
                    return
                for event in events:
                    self._dispatch(event)
                self.emit()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._lose(exc)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            call = self.calls.get(event.stream_id)
            flow = event.flow_controlled_length or 0
            if call is None:
                self.h2.acknowledge_received_data(flow, event.stream_id)
            else:
                call._on_data(event.data, flow)
        elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            call = self.calls.get(event.stream_id or 0)
            if call is not None:
                call._on_headers(cast("list[tuple[str, str]]", event.headers or []))
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.pop(event.stream_id or 0, None)
            if call is not None:
                call._on_end()
            self._window_opened.set()
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.pop(event.stream_id or 0, None)
            if call is not None:
                call._finish("CANCELLED", f"stream reset by the gateway ({event.error_code!r})")
            self._window_opened.set()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = True
            last = event.last_stream_id or 0
            for stream_id in [s for s in self.calls if s > last]:
                self.calls.pop(stream_id)._finish("UNAVAILABLE", "refused: the gateway is leaving")

    def _lose(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self.terminated = True
        for call in self.calls.values():
            call._finish("connection lost", str(exc))
        self.calls.clear()
        self._window_opened.set()
        self._flushed.set()

    # -- calls
    def start(self) -> None:
        h2conn = self.h2
        h2conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: _GRPC_STREAM_WINDOW,
            },
        )
        h2conn.initiate_connection()
        h2conn.increment_flow_control_window(_GRPC_CONNECTION_WINDOW - 65535)
        self.emit()

    def open_call(self, method: str, *, token: str | None, step_timeout: float) -> _GrpcCall:
        if self.terminated:
            raise TransportError(f"{self.authority}: the connection is closed")
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", _GRPC_SERVICE + method),
            (":authority", self.authority),
            ("content-type", "application/grpc+proto"),
            ("te", "trailers"),
            ("user-agent", _USER_AGENT),
            ("grpc-timeout", encode_timeout(step_timeout)),
        ]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        call = _GrpcCall(self, stream_id)
        self.calls[stream_id] = call
        self.h2.send_headers(stream_id, headers)
        self.emit()
        return call

    def release(self, call: _GrpcCall, size: int) -> None:
        if call.remote_closed or self.lost is not None:
            return
        try:
            self.h2.acknowledge_received_data(size, call.stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self.emit()

    async def send_data(self, call: _GrpcCall, data: bytes, end: bool) -> bool:
        h2conn = self.h2
        total = len(data)
        sent = 0
        while True:
            if call.remote_closed or self.lost is not None:
                return False
            try:
                if sent == total:
                    if end:
                        h2conn.end_stream(call.stream_id)
                        self.emit()
                    break
                window = h2conn.local_flow_control_window(call.stream_id)
                size = min(window, h2conn.max_outbound_frame_size, total - sent)
                if size <= 0:
                    if self._window_opened.is_set():
                        self._window_opened = trio.Event()
                    await self._window_opened.wait()
                    continue
                last = sent + size == total
                h2conn.send_data(call.stream_id, data[sent : sent + size], end_stream=end and last)
            except h2.exceptions.StreamClosedError:
                return False
            sent += size
            self.emit()
            if end and last:
                break
            if self._out_size > _GRPC_WRITE_HIGH_WATER:
                await self.flush()
        if self._out_size > _GRPC_WRITE_HIGH_WATER:
            await self.flush()
        return True

    def goodbye(self) -> None:
        if self.lost is None:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                return
            self.emit()


@asynccontextmanager
async def _grpc_connection(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None, step_timeout: float
) -> AsyncIterator[_H2Client]:
    stream = await _connect(host, port, ssl_context=ssl_context, step_timeout=step_timeout)
    if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() != "h2":
        await trio.aclose_forcefully(stream)
        raise TransportError(f"{host}:{port}: the TLS server did not agree to HTTP/2 (ALPN h2)")
    shown = f"[{host}]" if ":" in host else host
    client = _H2Client(
        stream, authority=f"{shown}:{port}", scheme="https" if ssl_context else "http"
    )
    async with stream, trio.open_nursery() as nursery:
        client.start()
        nursery.start_soon(client.reader)
        nursery.start_soon(client.writer)
        try:
            yield client
            client.goodbye()
            with trio.move_on_after(step_timeout):
                await client.flush()
        finally:
            nursery.cancel_scope.cancel()


async def _grpc_finish(call: _GrpcCall, where: str, step_timeout: float) -> tuple[str, list[bytes]]:
    """Wait for the end of the call: its status and every reply not read yet."""
    replies: list[bytes] = []
    try:
        with trio.fail_after(step_timeout):
            while batch := await call.recv_batch():
                replies += batch
    except trio.TooSlowError as exc:
        raise TransportError(f"{where}: no answer within {step_timeout:g} s") from exc
    assert call.status is not None
    return call.status, replies


async def send_grpc(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    mode: str = "unary",
    concurrency: int = 1,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    rate: float | None = None,
    step_timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send ``count`` messages to the gateway's ``trio_gateway.v1.Gateway`` service.

    ``mode``: ``unary`` (one ``Send`` call per message; its status is the answer), ``stream``
    (one ``Stream`` call per connection; the final ``Ack`` counts accepted and rejected) or
    ``bidi`` (one ``StreamAcked`` call per connection; an ``Ack`` per message). Each message's
    ``sequence`` is its number in the run. TLS when ``ssl_context`` is given (ALPN ``h2``).
    """
    _check_common(count, size, concurrency, step_timeout)
    if mode not in GRPC_MODES:
        raise ConfigurationError("--mode", f"must be one of {', '.join(GRPC_MODES)}")
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2"])
    where = f"{host}:{port}"
    run = _Run(count, size, rate=rate, progress=progress, progress_on_write=mode == "stream")
    message = gateway_pb2.Message

    def frames(seqs: range) -> bytes:
        return b"".join(
            _grpc_frame(message(payload=make_payload(size, seq), sequence=seq)) for seq in seqs
        )

    async def unary() -> None:
        seqs = run.claim(1)
        while seqs:
            async with _grpc_connection(
                host, port, ssl_context=ssl_context, step_timeout=step_timeout
            ) as conn:
                while seqs and not conn.terminated:
                    await run.pace(seqs.start)
                    call = conn.open_call("Send", token=token, step_timeout=step_timeout)
                    try:
                        with trio.fail_after(step_timeout):
                            await call.send(frames(seqs), end=True)
                    except trio.TooSlowError as exc:
                        raise TransportError(
                            f"{where}: no progress for {step_timeout:g} s"
                        ) from exc
                    status, replies = await _grpc_finish(call, where, step_timeout)
                    if status == "connection lost":
                        raise TransportError(f"{where}: connection lost: {call.detail}")
                    if status == "UNAVAILABLE" and conn.terminated:
                        break  # refused by a GOAWAY: resend on a new connection
                    run.wrote(1)
                    accepted = status == "OK" and bool(replies)
                    if accepted:
                        ack = gateway_pb2.Ack.FromString(replies[0])
                        accepted = ack.accepted
                    run.accept(1 if accepted else 0)
                    run.reject(status if status != "OK" else "not accepted", 0 if accepted else 1)
                    seqs = run.claim(1)

    async def streaming(acked: bool) -> None:
        per_write = run.chunk()
        seqs = run.claim(per_write)
        if not seqs:
            return
        async with _grpc_connection(
            host, port, ssl_context=ssl_context, step_timeout=step_timeout
        ) as conn:
            call = conn.open_call(
                "StreamAcked" if acked else "Stream", token=token, step_timeout=step_timeout
            )
            written = answered = 0

            async def read_acks() -> None:
                nonlocal answered
                while batch := await call.recv_batch():
                    for data in batch:
                        ack = gateway_pb2.Ack.FromString(data)
                        answered += 1
                        if ack.accepted:
                            run.accept(1)
                        else:
                            run.reject(ack.reason or "not accepted", 1)

            async with trio.open_nursery() as nursery:
                if acked:
                    nursery.start_soon(read_acks)
                try:
                    while seqs:
                        await run.pace(seqs.start)
                        with trio.fail_after(step_timeout):
                            if not await call.send(frames(seqs)):
                                break
                        written += len(seqs)
                        run.wrote(len(seqs))
                        seqs = run.claim(per_write)
                    else:
                        with trio.fail_after(step_timeout):
                            await call.send(b"", end=True)
                except trio.TooSlowError as exc:
                    raise TransportError(f"{where}: no progress for {step_timeout:g} s") from exc
                try:
                    with trio.fail_after(step_timeout):
                        await call.done.wait()
                except trio.TooSlowError as exc:
                    raise TransportError(f"{where}: no answer within {step_timeout:g} s") from exc
            status, replies = await _grpc_finish(call, where, step_timeout)
            if status == "connection lost":
                raise TransportError(f"{where}: connection lost: {call.detail}")
            if status == "OK" and not acked and replies:
                ack = gateway_pb2.Ack.FromString(replies[-1])
                run.accept(ack.accepted_count)
                run.reject("dropped", ack.rejected_count)
                answered = ack.accepted_count + ack.rejected_count
            reason = "no ack" if status == "OK" else status
            run.reject(reason, written - answered)
            run.reject_unsent(reason, len(seqs))
            if status != "OK":
                run.stop(status)

    if mode == "unary":
        await _run_workers(concurrency, unary)
    else:
        acked = mode == "bidi"
        await _run_workers(concurrency, lambda: streaming(acked))
    return run.summary()
