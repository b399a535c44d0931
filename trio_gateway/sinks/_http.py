"""An HTTP sink: each batch POSTed as NDJSON (the file sink's JSON Lines records) with httpx.

httpx runs on Trio natively (through anyio), so no bridge is needed. One keep-alive connection,
one request at a time: the pump sends batches in order, and so does this sink.
"""

from __future__ import annotations

import email.utils
import math
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from .._errors import ConfigurationError, SinkError, SinkRefused, SinkUnavailable
from .._message import Batch
from .._secrets import redact_url
from ._base import Sink, connect_failure
from ._jsonl import encode_jsonl

if TYPE_CHECKING:
    import httpx

__all__ = ("HttpSink", "parse_retry_after", "split_body")

CONTENT_TYPE = "application/x-ndjson"
_TRANSIENT_4XX = frozenset({408, 429})
"""4xx answers about timing (Request Timeout, Too Many Requests): retried, not refusals."""
_SPLIT_ON = frozenset({400, 413, 422})
"""Refusals of a body's content or size: split in two to find the records refused alone.
Other 4xx (401, 403, 404 ...) are about the request itself: the whole body is refused."""


class _Refusal(SinkError):
    """A 4xx answer that refuses the body for good (see :class:`HttpSink`)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


_MAX_ANSWER = 64 * 1024


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise ConfigurationError(
            "sink", f"the http sink needs httpx (pip install httpx): {exc}"
        ) from exc
    return httpx


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date; None when absent or
    unparseable (then the pump's backoff alone applies)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is always GMT; a date without a zone is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(unknown status)"


def split_body(body: bytes, max_bytes: int) -> list[bytes]:
    """Cut NDJSON into bodies of at most ``max_bytes`` at line ends (a longer line goes alone)."""
    if len(body) <= max_bytes:
        return [body]
    chunks: list[bytes] = []
    start = 0
    end = len(body)
    while start < end:
        if end - start <= max_bytes:
            chunks.append(body[start:])
            break
        cut = body.rfind(b"\n", start, start + max_bytes)
        if cut < 0:  # one record longer than max_bytes: it goes alone
            cut = body.find(b"\n", start + max_bytes)
            cut = end - 1 if cut < 0 else cut
        chunks.append(body[start : cut + 1])
        start = cut + 1
    return chunks


class HttpSink(Sink):
    """POSTs each batch to ``url`` as NDJSON: one JSON Lines record per message
    (``{"transport", "peer", "received_at", "payload"}``, ``"payload_b64"`` for binary).

    Any 2xx answer delivers the body. Connection errors, timeouts, 408, 429, 5xx and other
    answers raise :class:`SinkError` and the pump retries with its backoff; 429 and 503 with
    ``Retry-After`` make the pump wait at least that long (capped at ``max_retry_after``).
    Any other 4xx is a refusal for good of what the body holds (a poison batch): a body that
    gets 413, 400 or 422 is split in two and each half sent on its own, down to single
    records; what is still refused (a record that alone gets one of those, or a body that gets
    401, 403, 404 ...: about the request, not its records) is not sent again:
    ``send`` delivers the rest and raises :class:`SinkRefused` naming the refused messages,
    which the pump hands to the dead-letter sink. ``failures`` counts failed requests by
    reason, ``splits`` the bodies split. A batch whose NDJSON is larger than ``max_body_bytes``
    goes as several requests; a retry resumes at the request that failed. Each request
    carries an ``Idempotency-Key`` that a retry repeats (a split half adds ``.0`` or ``.1``),
    so a receiver can drop copies. A message's own id (:attr:`Origin.id`) is in its record
    (``"id"``), and a batch of one message with an id uses that id as the key: a gateway
    downstream then gives the message the same id (``<id>:0``, line 0 of an NDJSON body)
    whichever upstream process sends it.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_body_bytes: int = 8 * 1024 * 1024,
        max_retry_after: float = 60.0,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        verify: bool | str = True,
        http2: bool = False,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                "sink", f"http sink needs http(s)://HOST[:PORT]/PATH, got {redact_url(url)!r}"
            )
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ConfigurationError("sink", f"http sink: {exc}: {redact_url(url)!r}") from exc
        if timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("sink", "http sink: timeouts must be positive")
        if max_body_bytes < 1024:
            raise ConfigurationError("sink", "http sink: max_body_bytes must be at least 1024")
        if max_retry_after < 0:
            raise ConfigurationError("sink", "http sink: max_retry_after must not be negative")
        _import_httpx()  # a missing httpx is a configuration error, found before serving
        self.url = url
        self.name = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_body_bytes = max_body_bytes
        self.max_retry_after = max_retry_after
        self.headers = {"Content-Type": CONTENT_TYPE, **(headers or {})}
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.verify = verify
        self._verify: bool | ssl.SSLContext = verify if isinstance(verify, bool) else True
        if isinstance(verify, str):  # a CA bundle: httpx takes it as a context
            try:
                self._verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(
                    "sink", f"http sink: cannot load CA {verify}: {exc}"
                ) from exc
        self.http2 = http2
        self.sink_id = secrets.token_urlsafe(9)
        self.requests = 0
        """Requests sent (each attempt counts)."""
        self.failures: Counter[str] = Counter()
        """Failed requests by reason: ``connect``, ``timeout``, ``transport``, ``http_<status>``."""
        self.splits = 0
        """Bodies split in two after a 413, 400 or 422."""
        self._refusal = ("", "")
        self._client: httpx.AsyncClient | None = None
        self._batches = 0
        self._resume: tuple[Batch, int, list[bytes], int, list[int]] | None = None
        """The batch that failed last: (batch, its number, its bodies, the first body not sent,
        the messages refused for good so far)."""

    async def open(self) -> None:
        """Check that the destination answers (a TCP connection, and the TLS handshake for
        ``https://``), then make the client; a refusal is :class:`SinkUnavailable`."""
        if self._client is not None:
            return
        await self._check_reachable()
        self._make_client()

    async def _check_reachable(self) -> None:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with trio.fail_after(self.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                try:
                    if parts.scheme == "https":
                        stream = trio.SSLStream(
                            stream, self._ssl_context(), server_hostname=host, https_compatible=True
                        )
                        await stream.do_handshake()
                finally:
                    await trio.aclose_forcefully(stream)
        except trio.TooSlowError as exc:
            raise SinkUnavailable(
                self.name, f"no answer within {self.connect_timeout:g} s"
            ) from exc
        except ssl.SSLError as exc:
            raise SinkUnavailable(self.name, f"TLS handshake failed: {exc.reason or exc}") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, ssl.SSLError):
                reason = f"TLS handshake failed: {cause.reason or cause}"
            else:
                reason = connect_failure(cause or exc)
            raise SinkUnavailable(self.name, reason) from exc

    def _ssl_context(self) -> ssl.SSLContext:
        if isinstance(self._verify, ssl.SSLContext):
            return self._verify
        context = ssl.create_default_context()
        if not self._verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _make_client(self) -> None:
        httpx = _import_httpx()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers=self.headers,
            verify=self._verify,
            http2=self.http2,
            follow_redirects=False,
            trust_env=False,
        )

    async def send(self, batch: Batch) -> None:
        if self._client is None:
            self._make_client()
        if self._resume is not None and self._resume[0] is batch:
            _, number, bodies, first, refused = self._resume
        else:
            self._batches += 1
            number, bodies, first = (
                self._batches,
                split_body(encode_jsonl(batch), self.max_body_bytes),
                0,
            )
            refused = []
        message_id = batch[0].origin.id if len(batch) == 1 else None
        for index in range(first, len(bodies)):
            key = message_id or f"{self.sink_id}-{number}-{index}"
            try:
                refused += await self._post_or_split(bodies[index], key, bodies, index)
            except SinkError:
                self._resume = (batch, number, bodies, index, refused)
                raise
        self._resume = None
        if refused:
            reason, answer = self._refusal
            raise SinkRefused(
                f"{self.name}: {len(refused)} of {len(batch)} messages refused for good "
                f"(last: {answer})",
                indices=refused,
                reason=reason,
            )

    async def _post_or_split(
        self, body: bytes, key: str, bodies: list[bytes], index: int, offset: int = 0
    ) -> list[int]:
        """POST ``body``; the positions (in the batch) of the messages refused for good.

        ``body`` starts ``offset`` lines into ``bodies[index]``."""
        try:
            await self._post(body, key)
        except _Refusal as exc:
            lines = body.count(b"\n")
            if exc.status in _SPLIT_ON and lines > 1:
                self.splits += 1
                middle = body.rfind(b"\n", 0, len(body) // 2) + 1 or body.find(b"\n") + 1
                left, right = body[:middle], body[middle:]
                return await self._post_or_split(
                    left, key + ".0", bodies, index, offset
                ) + await self._post_or_split(
                    right, key + ".1", bodies, index, offset + left.count(b"\n")
                )
            self._refusal = (f"http_{exc.status}", str(exc).removeprefix(f"{self.name}: "))
            first = sum(b.count(b"\n") for b in bodies[:index]) + offset
            return list(range(first, first + lines))
        return []

    async def _post(self, body: bytes, key: str) -> None:
        httpx = _import_httpx()
        client = self._client
        assert client is not None
        self.requests += 1
        try:
            async with client.stream(
                "POST", self.url, content=body, headers={"Idempotency-Key": key}
            ) as response:
                # Read at most _MAX_ANSWER bytes of the answer: a reply is a status, not data
                # (an answer left unread closes the connection instead of keeping it alive).
                answer = bytearray()
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) >= _MAX_ANSWER:
                        break
        except httpx.ConnectError as exc:
            raise self._fail("connect", f"connect failed: {exc!r}", exc) from exc
        except httpx.TimeoutException as exc:
            raise self._fail("timeout", f"timed out: {exc!r}", exc) from exc
        except httpx.HTTPError as exc:  # read/write errors, protocol errors
            raise self._fail("transport", f"request failed: {exc!r}", exc) from exc
        status = response.status_code
        if 200 <= status < 300:
            return
        retry_after = None
        if status in (429, 503):
            asked = parse_retry_after(response.headers.get("Retry-After"))
            if asked is not None and math.isfinite(asked):
                retry_after = min(asked, self.max_retry_after)
        detail = bytes(answer[:200]).decode(errors="replace").strip()
        error = self._fail(
            f"http_{status}",
            f"answered {status} {_phrase(status)}" + (f": {detail}" if detail else ""),
            retry_after=retry_after,
        )
        if 400 <= status < 500 and status not in _TRANSIENT_4XX:
            refusal = _Refusal(str(error), status=status)
            refusal.__cause__ = error.__cause__
            raise refusal
        raise error

    def _fail(
        self,
        reason: str,
        message: str,
        cause: BaseException | None = None,
        *,
        retry_after: float | None = None,
    ) -> SinkError:
        self.failures[reason] += 1
        error = SinkError(f"{self.name}: {message}", retry_after=retry_after)
        error.__cause__ = cause
        return error

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
