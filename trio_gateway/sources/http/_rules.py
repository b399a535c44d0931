"""The ingest rules of the HTTP source: what ``POST /ingest`` accepts and every answer.

No I/O here: both front ends (the direct h11 path and the ASGI app under hypercorn) ask
:class:`IngestRules` to judge a request's head and to ingest its body, and send the
:class:`Reply` it returns in their own protocol version.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from ..._ingress import Ingress
from ..._message import Origin
from ..._wire import DEFAULT_HTTP_PATH, IDEMPOTENCY_KEY, MAX_KEY_LENGTH, idempotency_key
from .._options import DEFAULT_MAX_MESSAGE_SIZE
from ._cors import Cors

__all__ = ("BodyKind", "IngestRules", "Reply", "json_reply")

NDJSON_TYPES = frozenset({b"application/x-ndjson", b"application/ndjson"})

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class BodyKind:
    """What a request's head says of its body: NDJSON (one message per line) or one message,
    and the sender's ``Idempotency-Key`` (None without one)."""

    ndjson: bool
    key: str | None = None


_KEY_HEADER = IDEMPOTENCY_KEY.encode()
_ONE = BodyKind(False)
_NDJSON = BodyKind(True)


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, independent of the protocol version that carries it."""

    status: int
    headers: Headers
    body: bytes
    close: bool = False
    """Close the connection after answering (the request body was not read)."""


def json_reply(
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
      compared in constant time);
    * with ``cors_origins``, ``OPTIONS`` is a CORS preflight (``204``, or ``403`` for an
      origin not on the list) and every answer gets the headers of :meth:`cors_headers`;
    * ``Idempotency-Key: K`` (visible ASCII, at most :data:`MAX_KEY_LENGTH` characters, bare
      or as a quoted string; else ``400``) gives the message the id ``K``, and the lines of an
      NDJSON body the ids ``K:0``, ``K:1``, ... by position (docs/http.md).
    """

    def __init__(
        self,
        ingress: Ingress,
        *,
        path: str = DEFAULT_HTTP_PATH,
        max_body_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        token: str | None = None,
        queue_wait: float = 0.5,
        retry_after: int = 1,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.ingress = ingress
        self.cors = Cors(cors_origins) if cors_origins else None
        self.path = path.encode()
        self.max_body_size = max_body_size
        self._token = token.encode() if token is not None else None
        self.queue_wait = queue_wait
        retry = (b"retry-after", str(retry_after).encode())
        self._retry = retry
        self.not_found = json_reply(404, {"error": "not found"})
        self.not_allowed = json_reply(405, {"error": "method not allowed"}, (b"allow", b"POST"))
        self.too_large = json_reply(
            413, {"error": "body too large", "limit": max_body_size}, close=True
        )
        self.missing_token = json_reply(
            401, {"error": "unauthorized"}, (b"www-authenticate", b'Bearer realm="trio_gateway"')
        )
        self.wrong_token = json_reply(
            401,
            {"error": "unauthorized"},
            (b"www-authenticate", b'Bearer realm="trio_gateway", error="invalid_token"'),
        )
        self.queue_full = json_reply(503, {"accepted": 0, "error": "queue full"}, retry)
        self.over_budget = json_reply(
            503, {"accepted": 0, "error": "over the memory budget"}, retry, close=True
        )
        self.accepted_one = json_reply(202, {"accepted": 1})
        self.empty = json_reply(400, {"error": "empty body"})
        self.bad_key = json_reply(
            400,
            {"error": f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"},
        )
        self.ambiguous_length = json_reply(
            400, {"error": "both Content-Length and Transfer-Encoding"}, close=True
        )
        self.too_slow = json_reply(408, {"error": "request not complete in time"}, close=True)
        self.too_many_connections = json_reply(
            503, {"error": "too many connections"}, retry, close=True
        )

    def head(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        fields: dict[bytes, bytes] | None = None,
    ) -> tuple[Reply | None, BodyKind]:
        """Judge a request by its head (``fields``: the last value of each name, if the
        caller has them). Returns ``(refusal or None, what its body is)``."""
        path = target.partition(b"?")[0]
        if path != self.path:
            return self.not_found, _ONE
        if method == b"OPTIONS" and self.cors is not None:
            return self._preflight(headers), _ONE
        if method != b"POST":
            return self.not_allowed, _ONE
        if fields is None:
            fields = dict(headers)
        length = fields.get(b"content-length")
        content_type = fields.get(b"content-type")
        ndjson = (
            content_type is not None
            and content_type.partition(b";")[0].strip().lower() in NDJSON_TYPES
        )
        key = fields.get(_KEY_HEADER)
        kind = _NDJSON if ndjson else _ONE
        if length is not None and b"transfer-encoding" in fields:
            # RFC 9112 section 6.3: a sign of request smuggling; refuse it and close.
            self.ingress.reject("malformed")
            return self.ambiguous_length, kind
        if self._token is not None:
            refusal = self._check_token(fields.get(b"authorization"))
            if refusal is not None:
                self.ingress.reject("unauthorized")
                return refusal, kind
        if length is not None and length.isdigit() and int(length) > self.max_body_size:
            self.ingress.reject("oversize")
            return self.too_large, kind
        if key is not None:
            text = idempotency_key(key)
            if text is None:
                self.ingress.reject("malformed")
                return self.bad_key, kind
            kind = BodyKind(ndjson, text)
        return None, kind

    def cors_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        """The CORS headers an answer to a request with ``headers`` carries (none unless
        ``cors_origins`` was given)."""
        return () if self.cors is None else self.cors.response_headers(headers)

    def _preflight(self, headers: Sequence[tuple[bytes, bytes]]) -> Reply:
        assert self.cors is not None
        status, extra = self.cors.preflight(headers)
        if status != 204:
            return json_reply(status, {"error": "origin not allowed"})
        return Reply(status, ((b"content-length", b"0"), *extra), b"")

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

    def _origin(self, peer: str, key: str | None = None) -> Origin:
        return Origin("http", self.ingress.listener, peer, time.time(), id=key)

    def ingest_nowait(self, body: bytes, kind: BodyKind, peer: str) -> Reply | None:
        """The answer to a complete body when it needs no waiting: one message that the queue
        takes at once (``202``). None, with nothing counted or queued, when it may: answer it
        with :meth:`ingest` (an NDJSON batch, an empty body, a queue that is full, on disk or
        answering at delivery)."""
        if kind.ndjson or not body:
            return None
        if not self.ingress.offer_one_nowait(body, self._origin(peer, kind.key)):
            return None
        return self.accepted_one

    async def ingest(self, body: bytes, kind: BodyKind, peer: str) -> Reply:
        """Queue the message(s) of a complete body and answer the sender."""
        ingress = self.ingress
        if kind.ndjson:
            payloads = [line for line in body.split(b"\n") if line.strip()]
            if not payloads:
                ingress.reject("malformed")
                return self.empty
            for number, line in enumerate(payloads, 1):
                try:
                    json.loads(line)
                except ValueError:
                    ingress.reject("malformed")
                    return json_reply(
                        400, {"error": "malformed NDJSON", "line": number, "accepted": 0}
                    )
        elif body:
            payloads = [body]
        else:
            ingress.reject("malformed")
            return self.empty
        ids = None
        if kind.key is not None:
            key = kind.key
            ids = [f"{key}:{i}" for i in range(len(payloads))] if kind.ndjson else [key]
        answer = await ingress.offer_or_reject_later(
            payloads, self._origin(peer), timeout=self.queue_wait, ids=ids
        )
        accepted = await answer.wait()
        if accepted == len(payloads):
            if accepted == 1:
                return self.accepted_one
            return json_reply(202, {"accepted": accepted})
        if not answer.accepted:
            return self.queue_full  # none queued
        # Queued and not confirmed by the sink (ack = "delivered"), or not all queued.
        error = "not delivered" if accepted < answer.accepted else "queue full"
        return json_reply(
            503,
            {"accepted": accepted, "rejected": len(payloads) - accepted, "error": error},
            self._retry,
        )
