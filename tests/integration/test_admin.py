"""The admin endpoint: /healthz, /readyz through the drain, 404/405, limits, isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
import prometheus_client
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_gateway import Gateway, Item, NullSink, Sink, TcpSource, TransportError
from trio_gateway.admin import AdminServer
from trio_gateway.loadgen import send_tcp


class GatedSink(Sink):
    """Holds every batch until ``release`` is set: a slow destination, in-process."""

    name = "gated"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.waiting = trio.Event()
        self.messages = 0

    async def send(self, batch: Sequence[Item]) -> None:
        self.waiting.set()
        await self.release.wait()
        self.messages += len(batch)


@asynccontextmanager
async def running(
    gateway: Gateway,
) -> AsyncIterator[tuple[tuple[list[tuple[str, int]], ...], str]]:
    """Start ``gateway`` (whose first service is an AdminServer); yield (bound, admin URL)."""
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(gateway.run)
        host, port = gateway.service_values[0]
        yield bound, f"http://{host}:{port}"
        gateway.shutdown()


def make_gateway(sink: Sink | None = None, **admin_options: object) -> Gateway:
    admin = AdminServer("127.0.0.1", 0, **admin_options)  # type: ignore[arg-type]
    return Gateway(
        sources=[TcpSource()], sink=sink or NullSink(), services=[admin], drain_timeout=5.0
    )


async def test_healthz_and_readyz_while_running() -> None:
    gateway = make_gateway()
    with trio.fail_after(10):
        async with running(gateway) as (_, url), httpx.AsyncClient(base_url=url) as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
            assert (health.status_code, health.text) == (200, "ok\n")
            assert (ready.status_code, ready.text) == (200, "ready\n")
            assert health.headers["cache-control"] == "no-store"


async def test_readyz_is_503_from_shutdown_through_the_drain() -> None:
    sink = GatedSink()
    gateway = make_gateway(sink)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            host, port = gateway.service_values[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                await send_tcp(*bound[0][0], count=100, size=18)
                await sink.waiting.wait()  # the pump is stuck on the slow sink
                assert (await client.get("/readyz")).status_code == 200

                gateway.shutdown()
                while gateway.state != "draining":
                    await trio.sleep(0.01)
                # Listeners are closed and the grace period is over; the drain is waiting on
                # the sink: a load balancer must see "not ready" all along, the process alive.
                for _ in range(3):
                    ready = await client.get("/readyz")
                    assert ready.status_code == 503
                    assert ready.text == "not ready: draining\n"
                    assert ready.headers["retry-after"] == "5"
                    assert (await client.get("/healthz")).status_code == 200
                    metrics = await client.get("/metrics")
                    assert "trio_gateway_accepting 0.0" in metrics.text
                    await trio.sleep(0.05)
                assert gateway.state == "draining"
                sink.release.set()
    assert sink.messages == 100
    assert gateway.ledger.delivered == 100


async def test_unknown_path_is_404_and_other_methods_405() -> None:
    gateway = make_gateway()
    with trio.fail_after(10):
        async with running(gateway) as (_, url), httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/nope")).status_code == 404
            assert (await client.get("/metrics/extra")).status_code == 404
            for method in ("POST", "PUT", "DELETE"):
                response = await client.request(method, "/metrics", content=b"x" * 70_000)
                assert response.status_code == 405
                assert response.headers["allow"] == "GET, HEAD"
            # The connection survives a 405 with an unread body (it is closed, a new one opens).
            assert (await client.get("/healthz")).status_code == 200
            head = await client.head("/metrics")
            assert head.status_code == 200
            assert head.content == b""
            assert int(head.headers["content-length"]) > 100
            with_query = await client.get("/readyz?verbose=1")
            assert with_query.status_code == 200
            index = await client.get("/")
            assert "/metrics" in index.text


async def test_metrics_content_negotiation() -> None:
    gateway = make_gateway()
    with trio.fail_after(10):
        async with running(gateway) as (_, url), httpx.AsyncClient(base_url=url) as client:
            plain = await client.get("/metrics")
            assert plain.headers["content-type"].startswith("text/plain; version=")
            om = await client.get(
                "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.rstrip().endswith("# EOF")


async def _raw_exchange(host: str, port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        return received


async def test_malformed_request_is_400_and_huge_head_431() -> None:
    gateway = make_gateway(max_header_size=2048)
    with trio.fail_after(10):
        async with running(gateway):
            host, port = gateway.service_values[0]
            garbage = await _raw_exchange(host, port, b"NOT HTTP AT ALL\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.1 400 ")
            big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
            too_large = await _raw_exchange(host, port, big)
            assert too_large.startswith(b"HTTP/1.1 431 ")
            ok = await _raw_exchange(
                host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert ok.startswith(b"HTTP/1.1 200 ") and ok.endswith(b"ok\n")


async def test_connection_limit_and_idle_timeout() -> None:
    gateway = make_gateway(max_connections=2, timeout=0.5)
    with trio.fail_after(10):
        async with running(gateway) as (_, url):
            host, port = gateway.service_values[0]
            idle = [await trio.open_tcp_stream(host, port) for _ in range(2)]
            for stream in idle:  # an answer proves the connection was accepted and counted
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
            # A third connection is closed at once, without an answer.
            refused = await _raw_exchange(host, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert refused == b""
            # The idle keep-alive connections are closed by the server after the timeout...
            start = trio.current_time()
            for stream in idle:
                assert await stream.receive_some(100) == b""
                await stream.aclose()
            assert trio.current_time() - start < 2
            # ...and there is room again.
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz")).status_code == 200


def _metric_value(text: str, sample_name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name:
                return sample.value
    raise AssertionError(f"{sample_name} not in the scrape")


async def test_two_gateways_in_one_process_keep_separate_registries() -> None:
    first, second = make_gateway(), make_gateway()
    with trio.fail_after(10):
        async with running(first) as (bound1, url1), running(second) as (_, url2):
            await send_tcp(*bound1[0][0], count=321, size=10)
            while first.ledger.delivered < 321:
                await trio.sleep(0.01)
            async with httpx.AsyncClient() as client:
                text1 = (await client.get(url1 + "/metrics")).text
                text2 = (await client.get(url2 + "/metrics")).text
    assert _metric_value(text1, "trio_gateway_received_messages_total") == 321
    assert _metric_value(text2, "trio_gateway_received_messages_total") == 0
    # Nothing leaked into prometheus-client's global registry.
    assert "trio_gateway_" not in prometheus_client.generate_latest().decode()


async def test_port_in_use_is_a_transport_error() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        admin = AdminServer("127.0.0.1", port)
        gateway = Gateway(sources=[TcpSource()], sink=NullSink(), services=[admin])
        with (
            trio.fail_after(10),
            pytest.RaisesGroup(
                pytest.RaisesExc(TransportError, match="cannot listen"), flatten_subgroups=True
            ),
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.run)


def test_bad_options_are_configuration_errors() -> None:
    from trio_gateway import ConfigurationError

    for options in (
        {"port": 70000},
        {"max_connections": 0},
        {"timeout": 0},
        {"max_header_size": 10},
    ):
        with pytest.raises(ConfigurationError, match="admin"):
            AdminServer(**options)  # type: ignore[arg-type]


async def test_a_failing_collector_fails_the_scrape_not_the_gateway() -> None:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    class Broken(Collector):
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("boom")

    gateway = make_gateway()
    with trio.fail_after(10):
        async with running(gateway) as (_, url), httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/metrics")).status_code == 200
            admin = gateway.services[0]
            assert isinstance(admin, AdminServer) and admin.registry is not None
            admin.registry.register(Broken())
            assert (await client.get("/metrics")).status_code == 500
            assert (await client.get("/readyz")).status_code == 200
            assert gateway.accepting
