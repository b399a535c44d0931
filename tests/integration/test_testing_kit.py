"""The test kit with real sockets: a gateway handle over real listeners, and serve_source.

Without sockets: tests/unit/test_testing_kit_memory.py; the plugin run in a pytest subprocess:
tests/e2e/test_testing_plugin.py."""

from __future__ import annotations

import httpx
import pytest
import trio
from helpers import refuses_connections, wait_until
from trio.testing import MockClock

from trio_gateway import (
    Gateway,
    HttpSource,
    RingBuffer,
    TcpSource,
    WebSocketSource,
)
from trio_gateway.testing import (
    MemorySource,
    RecordingSink,
    open_gateway,
    serve_source,
)

# -- the gateway handle -------------------------------------------------------------------


async def test_handle_reports_real_listeners_and_statistics() -> None:
    sink = RecordingSink()
    tcp = TcpSource(port=0)
    gateway = Gateway(sources=[MemorySource(), tcp], sink=sink)
    with trio.fail_after(10):
        async with open_gateway(gateway) as handle:
            assert handle.bound[0] == []
            with pytest.raises(LookupError):
                handle.address(0)
            host, port = handle.address(1)
            assert (host, port) == tuple(tcp.bound[0])
            assert port != 0
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"one\ntwo\nthree\n")
                await sink.wait_for(3)
                stats = handle.statistics()
                assert (stats.state, stats.accepting) == ("running", True)
                assert stats.connections_active == 1
                assert stats.sink_batches >= 1
                assert stats.ledger.delivered == 3
            assert not handle.stopped
    assert handle.stopped
    assert handle.statistics().state == "stopped"
    assert not handle.statistics().accepting
    assert sink.payloads == [b"one", b"two", b"three"]
    assert {o.transport for o in sink.origins} == {"tcp"}


async def test_idle_timeout_of_a_real_listener_runs_in_virtual_time(
    autojump_clock: MockClock,
) -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[TcpSource(idle_timeout=300.0)], sink=sink)
    async with open_gateway(gateway) as handle:
        stream = await trio.open_tcp_stream(*handle.address())
        async with stream:
            start = trio.current_time()
            with trio.fail_after(1000):
                assert await stream.receive_some(16) == b""  # the gateway closed it
            assert trio.current_time() - start >= 300.0
    assert handle.ledger.rejected == {"idle_timeout": 1}


# -- serve_source: one source on its own ---------------------------------------------------


async def test_serve_source_queues_what_a_real_client_sent() -> None:
    with trio.fail_after(10):
        async with serve_source(HttpSource(port=0)) as served:
            host, port = served.address
            assert served.bound == [(host, port)] and port != 0
            assert served.url == f"http://{host}:{port}/ingest"
            assert served.counters.listener == f"http:{host}:{port}"
            async with httpx.AsyncClient() as client:
                response = await client.post(served.url, content=b"hello")
            assert response.status_code == 202
            assert served.payloads() == [b"hello"]
            assert served.payloads() == []  # taken
            assert served.counters.received == 1
            assert served.counters.connections_total == 1
        with pytest.raises(OSError):  # leaving the block closed the listener
            await trio.open_tcp_stream(host, port)


async def test_serve_source_uses_the_queue_given_with_its_policy() -> None:
    queue: RingBuffer[bytes] = RingBuffer(2, policy="drop_oldest")
    with trio.fail_after(10):
        async with serve_source(TcpSource(port=0), queue) as served:
            assert served.queue is queue and served.ingress.buffer.queue is queue
            stream = await trio.open_tcp_stream(*served.address)
            await stream.send_all(b"a\nb\nc\nd\n")
            await wait_until(lambda: served.counters.received == 4)
            await stream.aclose()
            assert served.payloads() == [b"c", b"d"]
            assert queue.statistics().dropped["drop_oldest"] == 2
        with pytest.raises(AttributeError, match="no URL"):
            served.url  # noqa: B018 - the property raises


async def test_serve_source_re_raises_the_body_error_as_it_is() -> None:
    with pytest.raises(KeyError, match="boom"), trio.fail_after(10):
        async with serve_source(TcpSource(port=0), grace_period=30) as served:
            stream = await trio.open_tcp_stream(*served.address)
            raise KeyError("boom")  # the open connection does not hold the exit for 30 s
    await stream.aclose()


async def test_serve_source_stop_closes_the_listener_before_the_block_ends() -> None:
    with trio.fail_after(10):
        async with serve_source(
            WebSocketSource(port=0), capacity=1, policy="drop_newest", grace_period=0.1
        ) as served:
            assert served.url.startswith("ws://127.0.0.1:") and served.url.endswith("/")
            assert served.queue.capacity == 1 and served.queue.policy == "drop_newest"
            assert not served.stopping
            served.stop()
            assert served.stopping and served.ingress.stopping
            await wait_until(lambda: refuses_connections(served.address))
