"""Browsers as clients: CORS on the HTTP listener, the Origin allow-list on the WebSocket one.

Real sockets, httpx (HTTP/1.1 on the h11 path and through hypercorn, HTTP/2) and raw WebSocket
handshakes. A real headless Chromium drives the same through a page in
tests/integration/test_browser.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from trio_gateway import Gateway, HttpSource, RingBuffer, WebSocketSource
from trio_gateway._errors import ConfigurationError
from trio_gateway.testing import GatewayHandle, RecordingSink, open_gateway

APP = "https://app.example"
OTHER = "https://evil.example"
# (fast_path, http2): the h11 path, HTTP/1.1 through hypercorn, HTTP/2 through hypercorn
FRONTS = [
    pytest.param(True, False, id="h11"),
    pytest.param(False, False, id="hypercorn-http1"),
    pytest.param(True, True, id="hypercorn-http2"),
]


@asynccontextmanager
async def serving(source: Any, **gateway: Any) -> AsyncIterator[GatewayHandle]:
    sink = gateway.pop("sink", None) or RecordingSink()
    with trio.fail_after(30):
        async with open_gateway(Gateway(sources=[source], sink=sink, **gateway)) as handle:
            yield handle


def url(handle: GatewayHandle) -> str:
    host, port = handle.address()
    return f"http://{host}:{port}/ingest"


async def test_no_cors_unless_configured() -> None:
    async with serving(HttpSource()) as handle, httpx.AsyncClient() as client:
        preflight = await client.options(
            url(handle), headers={"origin": APP, "access-control-request-method": "POST"}
        )
        assert preflight.status_code == 405
        response = await client.post(url(handle), content=b"x", headers={"origin": APP})
        assert response.status_code == 202
        assert not [name for name in response.headers if name.startswith("access-control")]


@pytest.mark.parametrize(("fast_path", "http2"), FRONTS)
async def test_preflight(fast_path: bool, http2: bool) -> None:
    source = HttpSource(cors_origins=[APP], fast_path=fast_path)
    async with (
        serving(source) as handle,
        httpx.AsyncClient(http1=not http2, http2=http2) as client,
    ):
        asked = {
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization, idempotency-key",
        }
        response = await client.options(url(handle), headers={"origin": APP, **asked})
        assert response.status_code == 204
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert response.headers["access-control-allow-origin"] == APP
        assert response.headers["access-control-allow-methods"] == "POST"
        allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
        assert allowed >= {"content-type", "authorization", "idempotency-key"}
        assert int(response.headers["access-control-max-age"]) > 0
        assert response.content == b""
        refused = await client.options(url(handle), headers={"origin": OTHER, **asked})
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers
    assert handle.ledger.received == 0


@pytest.mark.parametrize(("fast_path", "http2"), FRONTS)
async def test_every_answer_carries_the_origin_when_allowed(fast_path: bool, http2: bool) -> None:
    sink = RecordingSink()
    sink.stall()  # the queue fills up, for the 503
    source = HttpSource(
        cors_origins=[APP, "http://localhost:8000"],
        fast_path=fast_path,
        token="s3cret",
        max_message_size=100,
        queue_wait=0,
    )
    queue = RingBuffer[bytes](8, policy="drop_newest")
    async with (
        serving(source, sink=sink, queue=queue, drain_timeout=1) as handle,
        httpx.AsyncClient(http1=not http2, http2=http2) as client,
    ):
        auth = {"authorization": "Bearer s3cret"}
        json_lines = {**auth, "content-type": "application/x-ndjson"}
        cases: list[tuple[int, dict[str, str], bytes]] = [
            (202, {**auth, "content-type": "application/json"}, b'{"t": 21.5}'),
            (202, {**auth, "content-type": "text/plain"}, b"plain text"),
            (400, auth, b""),
            (401, {}, b"no token"),
            (413, auth, b"x" * 101),
            (503, json_lines, b"{}\n" * 20),
        ]
        for status, headers, body in cases:
            for origin, allowed in ((APP, True), (OTHER, False), (None, False)):
                sent = headers if origin is None else {**headers, "origin": origin}
                response = await client.post(url(handle), content=body, headers=sent)
                assert response.status_code == status, (status, origin, response.text)
                if allowed:
                    assert response.headers["access-control-allow-origin"] == APP
                    assert "retry-after" in response.headers["access-control-expose-headers"]
                else:
                    assert "access-control-allow-origin" not in response.headers
                if origin is not None:
                    assert response.headers["vary"].lower() == "origin"
        counters = handle.gateway.source_counters[0]
        assert counters.rejected["unauthorized"] == 3
        assert counters.rejected["oversize"] == 3
        sink.recover()


async def test_any_origin() -> None:
    async with serving(HttpSource(cors_origins=["*"])) as handle, httpx.AsyncClient() as client:
        response = await client.post(url(handle), content=b"x", headers={"origin": OTHER})
        assert response.headers["access-control-allow-origin"] == "*"


def test_origin_lists_are_checked() -> None:
    for bad in ("https://app.example/", "app.example", "ftp://app.example", "HTTPS://APP.example"):
        with pytest.raises(ConfigurationError) as info:
            HttpSource(cors_origins=[bad])
        assert info.value.key == "http.cors_origins"
        with pytest.raises(ConfigurationError) as info:
            WebSocketSource(allowed_origins=[bad])
        assert info.value.key == "websocket.allowed_origins"
    with pytest.raises(ConfigurationError, match="list of origins"):
        HttpSource(cors_origins="https://app.example")  # a string is not a list


# -- WebSocket ------------------------------------------------------------------------------


async def handshake(address: tuple[str, int], origin: str | None) -> bytes:
    """A WebSocket opening handshake (with ``Origin`` if given); the response head."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        lines = [
            b"GET / HTTP/1.1",
            b"Host: x",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(b"Origin: " + origin.encode())
        await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            response += chunk
        return response.partition(b"\r\n\r\n")[0]


async def test_websocket_origin_allow_list() -> None:
    source = WebSocketSource(allowed_origins=[APP])
    async with serving(source) as handle:
        address = handle.address()
        assert b" 101 " in await handshake(address, APP)
        assert b" 101 " in await handshake(address, None)  # not a browser: not checked
        refused = await handshake(address, OTHER)
        assert refused.startswith(b"HTTP/1.1 403 ")
        assert handle.gateway.source_counters[0].rejected == {"unauthorized": 1}


async def test_websocket_accepts_any_origin_unless_configured() -> None:
    async with serving(WebSocketSource()) as handle:
        assert b" 101 " in await handshake(handle.address(), OTHER)


def test_cors_is_a_toml_and_cli_option() -> None:
    from trio_gateway._cli import _parser
    from trio_gateway._config import config_from_mapping
    from trio_gateway._config._flags import config_from_args

    argv = [
        "serve",
        "--http",
        "127.0.0.1:0",
        "--http-cors-origin",
        APP,
        "--http-cors-origin",
        OTHER,
    ]
    args = _parser(argv).parse_args(argv)
    (source,) = config_from_args(args).sources
    assert source.options["cors_origins"] == [APP, OTHER]
    config = config_from_mapping(
        {
            "sources": [
                {"transport": "http", "listen": "127.0.0.1:0", "cors_origins": [APP]},
                {"transport": "websocket", "listen": "127.0.0.1:0", "allowed_origins": [APP]},
            ]
        }
    )
    assert [dict(s.options) for s in config.sources] == [
        {"cors_origins": [APP]},
        {"allowed_origins": [APP]},
    ]
