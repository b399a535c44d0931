"""CORS for the ingest endpoint: which browser origins may read its answers (no I/O here).

A page served from another origin can ``fetch`` ``POST /ingest`` only if the answer carries
``Access-Control-Allow-Origin`` for it; a body that is not a "simple" one (``application/json``,
or an ``Authorization`` header) is sent only after a preflight ``OPTIONS`` has been answered.
Without them the browser hides the answer (``Failed to fetch``) although the gateway queued
the message, and a web app that retries duplicates it. :class:`Cors` holds the allow-list; the
front ends add :meth:`Cors.response_headers` to every answer and :class:`IngestRules` answers
the preflight with :meth:`Cors.preflight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

__all__ = ("ALLOWED_HEADERS", "MAX_AGE", "Cors")

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]

ALLOWED_HEADERS = b"content-type, authorization, idempotency-key"
"""The request headers a page may send (the preflight's ``Access-Control-Allow-Headers``)."""
MAX_AGE = 600
"""Seconds a browser may cache a preflight answer."""
_EXPOSED = (b"access-control-expose-headers", b"retry-after")  # a page may read Retry-After


class Cors:
    """An allow-list of origins (``*``: every origin)."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origin.encode() for origin in origins)

    @staticmethod
    def origin_of(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
        for name, value in headers:
            if name == b"origin":
                return value
        return None

    def allows(self, origin: bytes | None) -> bool:
        return origin is not None and (self._any or origin in self._origins)

    def response_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        """What an answer to a request with ``headers`` adds: ``Access-Control-Allow-Origin``
        for an allowed ``Origin``, nothing for another one or none."""
        origin = self.origin_of(headers)
        if not self.allows(origin):
            return ((b"vary", b"origin"),) if origin is not None and not self._any else ()
        if self._any:
            return ((b"access-control-allow-origin", b"*"), _EXPOSED)
        assert origin is not None
        return ((b"access-control-allow-origin", origin), (b"vary", b"origin"), _EXPOSED)

    def preflight(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, Headers]:
        """The status and headers answering ``OPTIONS`` (without the ones of
        :meth:`response_headers`): ``204`` with the methods and headers a page may use, or
        ``403`` for an origin not on the list."""
        if not self.allows(self.origin_of(headers)):
            return 403, ()
        return 204, (
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", str(MAX_AGE).encode()),
        )
