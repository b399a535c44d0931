"""HTTP: ``POST`` one message (or an NDJSON batch) per request, h11 driven over Trio streams,
one request in flight per keep-alive connection.

``202`` counts as accepted; any other status rejects the request's messages under that
status, except that a ``503`` body's ``{"accepted": k}`` (a partly queued batch) is honoured.
A connection the gateway closes (its ``413`` and ``401`` answers close it) is replaced. If the
gateway answers before the body is written (a ``413`` on the ``Content-Length``), the answer is
still read and counted. httpx stays a test-only dependency: h11 is all a client of one
endpoint needs, and it is already the gateway's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import h11
import trio

from .._errors import ConfigurationError, TransportError
from .._wire import DEFAULT_HTTP_PATH, IDEMPOTENCY_KEY
from ._connect import Misdirected, Peer, client_ssl_context, connect
from ._options import (
    DEFAULT_TIMEOUT,
    MAX_RETRY_WAIT,
    answer_timeout,
    check_common,
    check_ids,
    check_retries,
)
from ._resend import Resender
from ._run import MAX_REPLY, READ_SIZE, USER_AGENT, Run, SendSummary, run_workers

__all__ = ("retry_after", "send_http")


@dataclass(frozen=True, slots=True)
class _HttpTarget:
    peer: Peer
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
    default = 443 if secure else 80
    port = port or default
    path = parts.path or DEFAULT_HTTP_PATH
    target = path + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == default else f"{shown}:{port}"
    return _HttpTarget(Peer("http", host, port, secure), target.encode(), authority.encode())


def retry_after(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """``Retry-After`` as delta-seconds (what the gateway sends); None if absent or a date."""
    for name, value in headers:
        if name == b"retry-after":
            return float(value) if value.isdigit() else None
    return None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes  # its start, at most MAX_REPLY bytes
    reusable: bool  # the connection can carry the next request
    retry_after: float | None


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection driven by h11; one request in flight at a time."""

    def __init__(self, stream: trio.abc.Stream, peer: Peer) -> None:
        self.stream = stream
        self.peer = peer
        self.h11 = h11.Connection(h11.CLIENT)
        self.answered = False  # has this connection carried an answer yet
        self.received = b""  # the first bytes it received, to name a wrong protocol

    async def _receive(self) -> bytes:
        data = cast(bytes, await self.stream.receive_some(READ_SIZE))
        if not self.answered and len(self.received) < 16:
            self.received += data[:16]
        return data

    async def request(
        self, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> _Answer:
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
        retry: float | None = None
        reply: list[bytes] = []
        kept = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._receive())
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    retry = retry_after(event.headers)
                elif isinstance(event, h11.Data):
                    if kept < MAX_REPLY:
                        reply.append(bytes(event.data[: MAX_REPLY - kept]))
                        kept += len(reply[-1])
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    if not self.answered:
                        raise await self.peer.closed_before_answer(received=self.received)
                    raise self.peer.error("connection closed before an answer")
        except h11.RemoteProtocolError as exc:
            if self.answered and not status:  # an HTTP server before, gone (it stopped)
                raise self.peer.error("connection closed before an answer") from exc
            if self.answered:  # an HTTP server before: it broke off inside an answer
                raise self.peer.error(f"the answer broke off (h11: {exc})") from exc
            if not self.received:  # h11's word for an end before any byte of an answer
                raise await self.peer.closed_before_answer() from exc
            raise self.peer.not_ours(self.received, f"bad HTTP answer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            if not self.answered:
                raise await self.peer.closed_before_answer(received=self.received) from exc
            raise self.peer.error(f"connection lost before an answer: {send_error or exc}") from exc
        self.answered = True
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return _Answer(status, b"".join(reply), reusable, retry)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


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
    ids: str | None = None,
) -> SendSummary:
    """``POST`` ``count`` messages to ``url`` (default path ``/ingest``), one per request or
    ``ndjson`` per request as ``application/x-ndjson``, on ``concurrency`` keep-alive
    connections. ``https://`` verifies the gateway against the system CAs or ``cafile``.

    With ``retries``, what a ``503`` or ``429`` refused (for an NDJSON batch: the lines after
    the ones its body says were queued) is sent again after the answer's ``Retry-After``
    (1 s without one, at most :data:`MAX_RETRY_WAIT`), and a request whose connection was lost
    before its answer is sent again on a new connection after a backoff (``_resend``), up to
    ``retries`` times in a row without progress; only what is still refused or unanswered then
    counts as rejected. The run's first answer must come within :data:`FIRST_ANSWER_TIMEOUT`:
    silence means another protocol on that port.

    With ``ids``, each request carries ``Idempotency-Key: {ids}:{n}``, ``n`` the number of
    its first message in the run: message ``n`` gets the id ``{ids}:{n}``, an NDJSON line
    ``{ids}:{n}:{i}``; a retry of what a ``503`` refused starts at its first refused message.
    Running the same command again resends every message with the same id."""
    check_common(count, size, concurrency, step_timeout, rate)
    check_ids(ids)
    check_retries(retries)
    if ndjson is not None and ndjson < 1:
        raise ConfigurationError("--ndjson", "must be at least 1")
    target = _parse_http_url(url)
    peer = target.peer
    if cafile is not None and not peer.secure:
        raise ConfigurationError("--ca", "needs an https:// URL")
    context = client_ssl_context(cafile, alpn=["http/1.1"]) if peer.secure else None
    headers = [
        (b"host", target.authority),
        (b"user-agent", USER_AGENT.encode()),
        (
            b"content-type",
            b"application/x-ndjson" if ndjson is not None else b"application/octet-stream",
        ),
    ]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    per_request = ndjson or 1
    run = Run(count, size, rate=rate, progress=progress)

    async def exchange(conn: _HttpConnection, body: bytes, seq: int) -> _Answer:
        first = not (conn.answered or run.reached)
        seconds = answer_timeout(step_timeout, first=first)
        head = headers
        if ids is not None:
            head = [*headers, (IDEMPOTENCY_KEY.encode(), f"{ids}:{seq}".encode())]
        try:
            with trio.fail_after(seconds):
                return await conn.request(target.target, head, body)
        except trio.TooSlowError as exc:
            if first:
                raise peer.no_answer(seconds) from exc
            raise peer.error(f"no answer within {step_timeout:g} s") from exc

    async def worker() -> None:
        conn: _HttpConnection | None = None
        payloads: list[bytes] = []
        resender = Resender(run, retries)
        try:
            while seqs := run.claim(per_request):
                await run.pace(seqs.start)
                payloads = run.payloads(seqs)
                run.wrote(len(payloads))
                resender.progress()
                again: bool | None = None  # sent before: after a refusal (False), a loss (True)
                while payloads:
                    body = b"\n".join(payloads) + b"\n" if ndjson is not None else payloads[0]
                    try:
                        if conn is None:
                            stream = await connect(
                                peer,
                                ssl_context=context,
                                step_timeout=step_timeout,
                                first=not run.reached,
                            )
                            conn = _HttpConnection(stream, peer)
                            resender.connected()
                        if again is not None:
                            resender.resending(len(payloads), after_loss=again)
                        answer = await exchange(conn, body, seqs.stop - len(payloads))
                    except TransportError as exc:
                        if conn is not None:
                            await conn.aclose()
                            conn = None
                        if not await resender.lost(exc, len(payloads)):
                            raise
                        again = True
                        continue
                    if answer.status in (404, 405):  # every message would meet it
                        raise Misdirected(
                            f"{peer.where}: POST {target.target.decode()} answered "
                            f"{answer.status} (wrong path?)"
                        )
                    run.reached = True
                    if not answer.reusable:
                        await conn.aclose()
                        conn = None
                    accepted = _http_accepted(answer.status, answer.body, len(payloads))
                    run.accept(accepted)
                    payloads = payloads[accepted:]
                    if accepted:
                        resender.progress()
                    if not payloads:
                        break
                    wait = 1.0 if answer.retry_after is None else answer.retry_after
                    if answer.status not in (429, 503) or not await resender.refused(
                        len(payloads), min(wait, MAX_RETRY_WAIT)
                    ):
                        run.reject(str(answer.status), len(payloads))
                        payloads = []
                        break
                    again = False
        except TransportError as exc:
            run.gone(exc, written=len(payloads), unsent=0)
        finally:
            if conn is not None:
                await conn.aclose()

    await run_workers(concurrency, worker)
    return run.summary()
