"""Scraping ``/metrics`` (admin/_scrape.py): bounded in size and time, no proxy, kept alive.

Each test runs a scripted HTTP server on port 0 that answers the way a broken or hostile
endpoint would; the real admin endpoint is scraped in tests/unit/test_top.py and by the
workers' supervisor (tests/e2e/test_workers.py).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from trio_gateway import TransportError
from trio_gateway.admin._scrape import MetricsClient, fetch_metrics

BODY = b"# TYPE up gauge\nup 1\n"


class Endpoint:
    """A scripted HTTP endpoint: its port, and every request head it read."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[bytes] = []

    async def next_request(self, stream: trio.SocketStream) -> bytes:
        """One request head (the scraper sends no body); b"" once the client closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return b""
            data += chunk
            assert len(data) < 16384
        self.requests.append(data)
        return data


Handler = Callable[[Endpoint, trio.SocketStream, int], Awaitable[None]]
"""(endpoint, stream, connection number from 0) -> None"""


def ok(body: bytes = BODY, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Endpoint]:
    """Serve ``handler`` on a loopback port (0: the kernel picks it) for the block."""
    endpoint = Endpoint()
    connections = 0

    async def serve_one(stream: trio.SocketStream) -> None:
        nonlocal connections
        number, connections = connections, connections + 1
        async with stream:
            await handler(endpoint, stream, number)

    async with trio.open_nursery() as nursery:
        serve_tcp = functools.partial(trio.serve_tcp, host="127.0.0.1")
        listeners = await nursery.start(serve_tcp, serve_one, 0)
        endpoint.port = listeners[0].socket.getsockname()[1]
        yield endpoint
        nursery.cancel_scope.cancel()


async def test_kept_alive_and_a_connection_the_server_closed_is_tried_once_more() -> None:
    async def handler(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        # The first connection answers once, then takes the next request and closes without a
        # word (what an idle timeout racing the next scrape looks like to the client).
        while await endpoint.next_request(stream):
            if number == 0 and len(endpoint.requests) == 2:
                return
            await stream.send_all(ok())

    async with scripted(handler) as endpoint, MetricsClient() as client:
        with trio.fail_after(10):
            assert await client.fetch("127.0.0.1", endpoint.port) == BODY.decode()
            assert await client.fetch("127.0.0.1", endpoint.port) == BODY.decode()
            assert await client.fetch("127.0.0.1", endpoint.port) == BODY.decode()
    assert len(endpoint.requests) == 4  # one answered, one dropped (tried again), two answered
    head = endpoint.requests[0].lower()
    assert head.startswith(b"get /metrics http/1.1\r\n")
    assert b"accept-encoding: identity" in head and b"connection: close" not in head


async def test_a_body_past_the_limit_is_refused_while_it_streams() -> None:
    sent = 0

    async def endless(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        nonlocal sent
        await endpoint.next_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        with pytest.raises(trio.BrokenResourceError):  # the client hangs up
            while True:
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)

    async with scripted(endless) as endpoint:
        with trio.fail_after(10), pytest.raises(TransportError, match="larger than 65536 bytes"):
            await fetch_metrics("127.0.0.1", endpoint.port, max_size=65536)
    assert sent < 16 << 20  # it stopped reading, not at the end of a never-ending body


async def test_an_announced_length_past_the_limit_is_refused_before_the_body() -> None:
    async def big(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        await endpoint.next_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n")
        await trio.sleep_forever()

    async with scripted(big) as endpoint:
        with trio.fail_after(10), pytest.raises(TransportError, match="larger than 1024 bytes"):
            await fetch_metrics("127.0.0.1", endpoint.port, max_size=1024)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", "answered 503"),
        (ok(b"\x1f\x8b...", b"content-encoding: gzip"), "gzip-encoded"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", ""),
    ],
)
async def test_a_bad_answer_is_a_transport_error_naming_the_endpoint(
    answer: bytes, message: str
) -> None:
    async def handler(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        await endpoint.next_request(stream)
        await stream.send_all(answer)

    async with scripted(handler) as endpoint:
        with trio.fail_after(10), pytest.raises(TransportError, match=message or None) as caught:
            await fetch_metrics("127.0.0.1", endpoint.port)
    assert str(caught.value).startswith(f"127.0.0.1:{endpoint.port}: ")


async def test_an_endpoint_that_never_answers_times_out() -> None:
    async def silent(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        await endpoint.next_request(stream)
        await trio.sleep_forever()

    async with scripted(silent) as endpoint:
        start = trio.current_time()
        with trio.fail_after(10), pytest.raises(TransportError, match=r"no answer within 0\.2 s"):
            await fetch_metrics("127.0.0.1", endpoint.port, time_limit=0.2)
        assert trio.current_time() - start < 5


async def test_proxy_settings_in_the_environment_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.socket.socket() as unused:  # a proxy that is not there
        await unused.bind(("127.0.0.1", 0))
        proxy = "http://127.0.0.1:%d" % unused.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def handler(endpoint: Endpoint, stream: trio.SocketStream, number: int) -> None:
        await endpoint.next_request(stream)
        await stream.send_all(ok())

    async with scripted(handler) as endpoint:
        with trio.fail_after(10):
            assert await fetch_metrics("127.0.0.1", endpoint.port) == BODY.decode()
    assert endpoint.requests[0].startswith(b"GET /metrics ")  # asked directly, not through a proxy


async def test_an_unreachable_endpoint_is_a_transport_error() -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with trio.fail_after(10), pytest.raises(TransportError, match=f"127.0.0.1:{port}: "):
        await fetch_metrics("127.0.0.1", port)
