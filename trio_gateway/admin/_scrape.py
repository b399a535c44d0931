"""Scraping a gateway's ``/metrics`` (for ``top`` and the workers' supervisor)."""

from __future__ import annotations

import h11
import trio

from .._errors import TransportError

__all__ = ("FETCH_TIMEOUT", "MAX_RESPONSE_BYTES", "fetch_metrics")

FETCH_TIMEOUT = 5.0
"""Seconds a scrape may take."""
MAX_RESPONSE_BYTES = 16 << 20
"""The largest ``/metrics`` body read."""


async def fetch_metrics(
    host: str, port: int, *, max_size: int = MAX_RESPONSE_BYTES, time_limit: float = FETCH_TIMEOUT
) -> str:
    """``GET /metrics`` with h11 over a Trio stream; bounded in time (``time_limit``) and size.

    Raises :class:`TransportError` when the endpoint cannot be reached or answers badly.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target="/metrics",
        headers=[("host", f"{host}:{port}"), ("accept", "text/plain"), ("connection", "close")],
    )
    body = bytearray()
    status = 0
    try:
        with trio.fail_after(time_limit):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > max_size:
                            raise TransportError(f"/metrics is larger than {max_size} bytes")
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
    except trio.TooSlowError as exc:
        raise TransportError(f"{host}:{port}: no answer within {time_limit} s") from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise TransportError(f"{host}:{port}: {exc}") from exc
    except h11.ProtocolError as exc:
        raise TransportError(f"{host}:{port}: bad HTTP response: {exc}") from exc
    if status != 200:
        raise TransportError(f"{host}:{port}: /metrics answered {status}")
    return body.decode("utf-8", "replace")
