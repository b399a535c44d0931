"""Scraping a gateway's ``/metrics`` over HTTP (for ``top`` and the workers' supervisor).

httpx speaks the HTTP; this module adds what a scraper of an endpoint it does not control
needs: a bound on the body (streamed and counted, refused past ``max_size``, and never
compressed, so the count is what is held), one deadline on the whole exchange, and nothing
from the environment (``trust_env=False``: an ``HTTP_PROXY`` meant for the outside world must
not capture a scrape of a loopback port). Every failure is a :class:`TransportError`.
"""

from __future__ import annotations

from types import TracebackType

import httpx
import trio

from .._errors import TransportError

__all__ = ("FETCH_TIMEOUT", "MAX_RESPONSE_BYTES", "MetricsClient", "fetch_metrics")

FETCH_TIMEOUT = 5.0
"""Seconds a scrape may take."""
MAX_RESPONSE_BYTES = 16 << 20
"""The largest ``/metrics`` body read."""

_HEADERS = {"accept": "text/plain", "accept-encoding": "identity"}
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""What a kept-alive connection that the server closed meanwhile fails with: tried again once."""


class MetricsClient:
    """Scrapes ``/metrics`` from admin endpoints, keeping one connection alive per endpoint.

    Hold one for as long as you scrape (the supervisor scrapes every worker every second):
    a kept-alive connection saves the TCP handshake, and the server an accept, on each scrape.
    ``max_connections`` bounds the connections open at once (idle ones included; one per
    endpoint scraped concurrently is enough). Use it as an async context manager, or call
    :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        max_size: int = MAX_RESPONSE_BYTES,
        time_limit: float = FETCH_TIMEOUT,
        max_connections: int = 1,
    ) -> None:
        if max_size < 1 or time_limit <= 0 or max_connections < 1:
            raise ValueError("need max_size >= 1, time_limit > 0 and max_connections >= 1")
        self.max_size = max_size
        self.time_limit = time_limit
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        # Admin endpoints speak plain HTTP and every URL is built here as http://, so no TLS
        # context is ever used: verify=False only spares loading the CA bundle (~40 ms).
        self._client = httpx.AsyncClient(
            headers=_HEADERS, timeout=time_limit, limits=limits, trust_env=False, verify=False
        )

    async def __aenter__(self) -> MetricsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):  # closing local sockets is immediate; close all
            await self._client.aclose()

    async def fetch(self, host: str, port: int) -> str:
        """``GET /metrics`` from ``host:port``, bounded in time and size.

        Raises :class:`TransportError` when the endpoint cannot be reached or answers badly.
        """
        url = httpx.URL(scheme="http", host=host, port=port, path="/metrics")
        where = f"{host}:{port}"
        try:
            with trio.fail_after(self.time_limit):
                try:
                    return await self._get(url, where)
                except _STALE:  # the pooled connection was closed by the server: once more
                    return await self._get(url, where)
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            raise TransportError(f"{where}: no answer within {self.time_limit} s") from exc
        except httpx.HTTPError as exc:
            raise TransportError(f"{where}: {exc}") from exc

    async def _get(self, url: httpx.URL, where: str) -> str:
        too_large = f"{where}: /metrics is larger than {self.max_size} bytes"
        async with self._client.stream("GET", url) as response:
            if response.status_code != 200:
                raise TransportError(f"{where}: /metrics answered {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity")
            if encoding != "identity":
                raise TransportError(f"{where}: /metrics came {encoding}-encoded, not plain")
            announced = response.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > self.max_size:
                raise TransportError(too_large)
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.max_size:
                    raise TransportError(too_large)
        return body.decode("utf-8", "replace")


async def fetch_metrics(
    host: str, port: int, *, max_size: int = MAX_RESPONSE_BYTES, time_limit: float = FETCH_TIMEOUT
) -> str:
    """One ``GET /metrics`` on a connection of its own (see :class:`MetricsClient`)."""
    async with MetricsClient(max_size=max_size, time_limit=time_limit) as client:
        return await client.fetch(host, port)
