"""The HTTP sink against a real HTTP server (hypercorn on Trio, serving a scriptable ASGI app)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve

from trio_gateway import (
    Batch,
    ConfigurationError,
    Gateway,
    Origin,
    RetryPolicy,
    SinkError,
    SinkRefused,
    SinkUnavailable,
    TcpSource,
)
from trio_gateway._config import build_sink, config_from_mapping
from trio_gateway.sinks import HttpSink, decode_jsonl_record

ORIGIN = Origin("tcp", "tcp:127.0.0.1:7000", "127.0.0.1:5000", 1700000000.25)


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]
    at: float


async def request_body(scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
    """An ASGI request's whole body; None for the lifespan scope (answered here)."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]  # lifespan.startup, then lifespan.shutdown
            await send({"type": kind + ".complete"})
            if kind == "lifespan.shutdown":
                return None
    body = bytearray()
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            return bytes(body)


@dataclass
class Destination:
    """Answers with ``script`` in order (status, headers), then 200; records every request."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    @property
    def delivered(self) -> list[Request]:
        return [r for r, status in zip(self.requests, self.statuses, strict=True) if status < 300]

    statuses: list[int] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await request_body(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Request(body, headers, trio.current_time()))
        status, extra = self.script.pop(0) if self.script else (200, {})
        self.statuses.append(status)
        answer = json.dumps({"status": status}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in extra.items()]
                + [(b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})


async def serve_app(nursery: trio.Nursery, app: Any) -> tuple[str, trio.Event]:
    """Serve the ASGI ``app`` with hypercorn on a free port: its URL, and the event to stop."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    shutdown = trio.Event()
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
    return binds[0] + "/ingest", shutdown


@pytest.fixture
async def destination(nursery: trio.Nursery) -> AsyncIterator[Destination]:
    app = Destination()
    app.url, shutdown = await serve_app(nursery, app)
    yield app
    shutdown.set()


def records(request: Request) -> list[bytes]:
    return [decode_jsonl_record(line)[0] for line in request.body.splitlines()]


# -- against a real server ----------------------------------------------------------------------


async def test_gateway_posts_ndjson_batches(destination: Destination) -> None:
    sink = HttpSink(destination.url, token="s3cret")
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, batch_size=100)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as client:
                await client.send_all(b"".join(b'{"n":%d}\n' % i for i in range(250)))
                await client.send_all(b"\xff\xfebinary\n")
            while gateway.ledger.received < 251:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert gateway.ledger.delivered == 251 and gateway.ledger.balanced
    payloads = [p for request in destination.requests for p in records(request)]
    assert payloads == [b'{"n":%d}' % i for i in range(250)] + [b"\xff\xfebinary"]
    first = destination.requests[0]
    assert first.headers["content-type"] == "application/x-ndjson"
    assert first.headers["authorization"] == "Bearer s3cret"
    _, record = decode_jsonl_record(first.body.splitlines()[0])
    assert record["transport"] == "tcp" and record["peer"].startswith("127.0.0.1:")
    keys = [r.headers["idempotency-key"] for r in destination.requests]
    assert len(set(keys)) == len(keys)
    assert sink.failures == {} and sink.requests == len(destination.requests)


async def test_a_message_id_is_the_key_of_its_own_request_and_in_every_record(
    destination: Destination,
) -> None:
    sink = HttpSink(destination.url)
    one = Origin("http", "http:x", "p", 1.0, "client-7")
    await sink.open()
    try:
        await sink.send(Batch.of([(b'{"a":1}', one)]))
        two = Origin("http", "http:x", "p", 1.0, "client-8")
        await sink.send(Batch.of([(b'{"a":2}', two), (b'{"a":3}', ORIGIN)]))
    finally:
        await sink.aclose()
    first, second = destination.requests
    assert first.headers["idempotency-key"] == "client-7"
    assert decode_jsonl_record(first.body)[1]["id"] == "client-7"
    # Two messages: the sink's own key; each record says its message's id, if it has one.
    assert second.headers["idempotency-key"].startswith(sink.sink_id)
    ids = [decode_jsonl_record(line)[1].get("id") for line in second.body.splitlines()]
    assert ids == ["client-8", None]


async def test_5xx_is_retried_with_backoff_and_the_same_idempotency_key(
    destination: Destination,
) -> None:
    destination.script = [(500, {}), (502, {}), (503, {})]  # 503 without Retry-After
    sink = HttpSink(destination.url)
    gateway = Gateway(
        sources=[TcpSource(port=0)],
        sink=sink,
        retry=RetryPolicy(initial=0.05, maximum=0.1),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as client:
                await client.send_all(b"one\ntwo\n")
            while gateway.ledger.delivered < 2:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert destination.statuses == [500, 502, 503, 200]
    assert {r.body for r in destination.requests} == {destination.requests[0].body}
    assert len({r.headers["idempotency-key"] for r in destination.requests}) == 1
    assert sink.failures == {"http_500": 1, "http_502": 1, "http_503": 1}
    assert gateway.pump_counters.sink_errors == 3 and gateway.pump_counters.sink_retries == 3
    gaps = [b.at - a.at for a, b in pairwise(destination.requests)]
    assert all(gap >= 0.025 for gap in gaps)  # full jitter: at least half the backoff


async def test_429_retry_after_is_honoured(destination: Destination) -> None:
    destination.script = [(429, {"Retry-After": "1"})]
    sink = HttpSink(destination.url)
    gateway = Gateway(
        sources=[TcpSource(port=0)],
        sink=sink,
        retry=RetryPolicy(initial=0.01, maximum=0.02),  # far shorter than Retry-After
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as client:
                await client.send_all(b"hello\n")
            while gateway.ledger.delivered < 1:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert destination.statuses == [429, 200]
    assert destination.requests[1].at - destination.requests[0].at >= 1.0
    assert sink.failures == {"http_429": 1}


async def test_retry_after_is_capped_and_carried_on_the_error(destination: Destination) -> None:
    destination.script = [(503, {"Retry-After": "3600"}), (429, {})]
    sink = HttpSink(destination.url, max_retry_after=2.5)
    batch = Batch([b"x"], [(ORIGIN, 1)])
    with trio.fail_after(10):
        with pytest.raises(SinkError) as first:
            await sink.send(batch)
        assert first.value.retry_after == 2.5
        with pytest.raises(SinkError) as second:
            await sink.send(batch)
        assert second.value.retry_after is None  # 429 without Retry-After: backoff alone
        await sink.send(batch)
        await sink.aclose()
    assert destination.statuses == [503, 429, 200]


async def test_connection_refused_then_server_up(nursery: trio.Nursery) -> None:
    with trio.socket.socket() as probe:  # a port with nothing listening yet
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Destination()
    sink = HttpSink(f"http://127.0.0.1:{port}/ingest", connect_timeout=1.0)
    batch = Batch([b"a", b"b"], [(ORIGIN, 2)])
    with trio.fail_after(20):
        with pytest.raises(SinkError, match="connect failed"):
            await sink.send(batch)
        assert sink.failures == {"connect": 1}
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = config.errorlog = None
        shutdown = trio.Event()
        await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        await sink.send(batch)
        await sink.aclose()
        shutdown.set()
    assert [records(r) for r in app.requests] == [[b"a", b"b"]]


async def test_large_batch_is_split_and_a_retry_resumes_where_it_failed(
    destination: Destination,
) -> None:
    destination.script = [(200, {}), (500, {})]  # the second body fails once
    sink = HttpSink(destination.url, max_body_bytes=4096)
    payloads = [b"%0100d" % i for i in range(200)]  # ~25 KiB of NDJSON
    batch = Batch(list(payloads), [(ORIGIN, 200)])
    with trio.fail_after(10):
        with pytest.raises(SinkError, match="500"):
            await sink.send(batch)
        await sink.send(batch)  # the pump's retry: same batch object
        await sink.aclose()
    assert all(len(r.body) <= 4096 for r in destination.requests)
    assert destination.statuses[:3] == [200, 500, 200]
    keys = [r.headers["idempotency-key"] for r in destination.requests]
    assert keys[1] == keys[2] and len(set(keys)) == len(keys) - 1
    delivered = [p for r in destination.delivered for p in records(r)]
    assert delivered == payloads  # nothing twice, nothing lost, in order


async def test_4xx_is_a_refusal_for_good_counted_with_the_answer(
    destination: Destination,
) -> None:
    destination.script = [(401, {})]
    sink = HttpSink(destination.url)
    with trio.fail_after(10):
        with pytest.raises(SinkRefused, match=r'answered 401 Unauthorized: \{"status": 401\}'):
            await sink.send(Batch([b"x"], [(ORIGIN, 1)]))
        await sink.aclose()
    assert sink.failures == {"http_401": 1}


async def test_slow_server_times_out(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def never_answer(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, never_answer, listeners)
    sink = HttpSink(f"http://127.0.0.1:{port}/", timeout=0.3)
    with trio.fail_after(10):
        with pytest.raises(SinkError, match="timed out"):
            await sink.send(Batch([b"x"], [(ORIGIN, 1)]))
        await sink.aclose()
    assert sink.failures == {"timeout": 1}


async def test_sink_options_from_the_config_file_reach_the_wire(
    destination: Destination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[sink]`` keys besides url are the sink's own options; ``env:NAME`` reads a secret."""
    monkeypatch.setenv("TG_TEST_SINK_TOKEN", "from-the-env")
    config = config_from_mapping(
        {
            "sink": {
                "url": destination.url,
                "token": "env:TG_TEST_SINK_TOKEN",
                "headers": {"X-Tenant": "blue"},
                "timeout": 7,
                "max_body_bytes": 4096,
            }
        }
    )
    sink = build_sink(config.sink)
    assert isinstance(sink, HttpSink)
    with trio.fail_after(10):
        await sink.send(Batch([b"x" * 3000, b"y" * 3000], [(ORIGIN, 2)]))
        await sink.aclose()
    assert [records(r) for r in destination.requests] == [[b"x" * 3000], [b"y" * 3000]]
    headers = destination.requests[0].headers
    assert headers["authorization"] == "Bearer from-the-env" and headers["x-tenant"] == "blue"


async def _https_destination(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[Destination, str, trio.Event]:
    """A destination on HTTPS with a certificate of a private CA (``tmp_path/ca.pem``): the
    app, its URL, and the event that stops it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    app = Destination()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = config.keyfile = str(tmp_path / "server.pem")
    config.accesslog = config.errorlog = None
    shutdown = trio.Event()
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
    url = binds[0].replace("http://", "https://") + "/ingest"
    return app, url, shutdown


async def test_https_with_a_ca_bundle(nursery: trio.Nursery, tmp_path: Path) -> None:
    app, url, shutdown = await _https_destination(nursery, tmp_path)
    with trio.fail_after(10):
        trusting = HttpSink(url, verify=str(tmp_path / "ca.pem"))
        await trusting.send(Batch([b"secret"], [(ORIGIN, 1)]))
        await trusting.aclose()
        doubting = HttpSink(url)  # the system roots do not know this CA
        with pytest.raises(SinkError):
            await doubting.send(Batch([b"x"], [(ORIGIN, 1)]))
        await doubting.aclose()
    shutdown.set()
    assert [records(r) for r in app.requests] == [[b"secret"]]
    assert doubting.failures.total() == 1
    with pytest.raises(ConfigurationError, match="cannot load CA"):
        HttpSink(url, verify=str(tmp_path / "missing.pem"))


async def test_ca_and_timeouts_from_the_config_file_and_the_check_at_open(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``[sink] verify = "ca.pem"`` and the timeouts come from TOML; ``open()`` (the check the
    gateway makes before it is ready) shakes hands over TLS, so an untrusted certificate is
    found at start, not at the first batch."""
    app, url, shutdown = await _https_destination(nursery, tmp_path)
    sink_config = config_from_mapping(
        {
            "sink": {
                "url": url,
                "verify": str(tmp_path / "ca.pem"),
                "timeout": 4,
                "connect_timeout": 2.5,
                "max_retry_after": 9,
            }
        }
    ).sink
    trusting = build_sink(sink_config)
    assert isinstance(trusting, HttpSink)
    assert (trusting.timeout, trusting.connect_timeout, trusting.max_retry_after) == (4, 2.5, 9)
    with trio.fail_after(10):
        await trusting.open()
        await trusting.send(Batch([b"over tls"], [(ORIGIN, 1)]))
        await trusting.aclose()
        doubting = build_sink(config_from_mapping({"sink": {"url": url}}).sink)
        with pytest.raises(SinkUnavailable, match="TLS handshake failed") as caught:
            await doubting.open()
        await doubting.aclose()
    shutdown.set()
    assert caught.value.sink == f"https://127.0.0.1:{url.split(':')[2].split('/')[0]}/ingest"
    assert [records(r) for r in app.requests] == [[b"over tls"]]


# -- poison batches -----------------------------------------------------------------------------


@dataclass
class Picky:
    """Answers 413 to bodies over ``limit`` bytes, 400 to a body with a ``poison`` record, and
    200 to the rest; records the bodies it took."""

    limit: int = 1200
    delivered: list[bytes] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await request_body(scope, receive, send)
        if body is None:
            return
        status = 413 if len(body) > self.limit else 400 if b"poison" in body else 200
        if status == 200:
            self.delivered += [decode_jsonl_record(line)[0] for line in body.splitlines()]
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def picky(nursery: trio.Nursery) -> AsyncIterator[Picky]:
    app = Picky()
    app.url, shutdown = await serve_app(nursery, app)
    yield app
    shutdown.set()


async def test_413_splits_and_what_is_still_refused_goes_to_the_dead_letter(
    picky: Picky, tmp_path: Path
) -> None:
    """The upstream of two chained gateways sends a batch too large for the downstream: it is
    split until it fits; a record refused alone (too large, or a 400) is not retried but
    written to the dead letter, counted under its own reason; the others are delivered once."""
    payloads = [b'{"n":%d}' % i for i in range(40)]
    payloads[7] = b'{"poison":true}'
    payloads[23] = b'{"big":"%s"}' % (b"x" * 1500)
    dead = tmp_path / "dead.jsonl"
    sink = HttpSink(picky.url)
    gateway = Gateway(
        sources=[TcpSource(port=0, max_message_size=4096)],
        sink=sink,
        batch_size=100,
        dead_letter=str(dead),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as client:
                await client.send_all(b"".join(p + b"\n" for p in payloads))
            while gateway.ledger.received < 40:
                await trio.sleep(0.01)
            gateway.shutdown()
    ledger = gateway.ledger
    assert ledger.balanced
    assert ledger.delivered == 38
    assert ledger.dropped["dead_letter"] == 2
    delivered = picky.delivered
    assert sorted(delivered) == sorted(p for i, p in enumerate(payloads) if i not in (7, 23))
    assert len(delivered) == 38  # each once
    with dead.open("rb") as file:
        assert [decode_jsonl_record(line)[0] for line in file] == [payloads[7], payloads[23]]
    assert sink.splits > 0 and sink.failures["http_413"] > 0 and sink.failures["http_400"] > 0


async def test_a_refusal_without_a_dead_letter_is_dropped_and_counted(picky: Picky) -> None:
    gateway = Gateway(sources=[TcpSource(port=0)], sink=HttpSink(picky.url))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            async with await trio.open_tcp_stream(*address) as client:
                await client.send_all(b'{"ok":1}\n{"poison":1}\n')
            while gateway.ledger.received < 2:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert gateway.ledger.balanced
    assert gateway.ledger.dropped["refused"] + gateway.ledger.delivered == 2
    assert gateway.ledger.dropped["refused"] >= 1
