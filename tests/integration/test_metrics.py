"""/metrics end to end: counters equal what was sent, dropped, rejected and delivered.

Messages go through real sockets; the scrape goes through httpx and is parsed with
prometheus-client's own text parser.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import trio
from helpers import Samples, parse_samples, sample_value, wait_until
from prometheus_client import generate_latest

from trio_gateway import (
    FanOutSink,
    Gateway,
    Item,
    Ledger,
    NullSink,
    RingBuffer,
    Sink,
    SqliteSink,
    TcpSource,
    UdpSource,
    WebSocketBroadcastSink,
)
from trio_gateway.admin import AdminServer
from trio_gateway.admin._collector import _sink_statistics
from trio_gateway.loadgen import send_tcp, send_udp


async def scrape(gateway: Gateway) -> Samples:
    host, port = gateway.service_values[0]
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{host}:{port}/metrics")
    assert response.status_code == 200
    return parse_samples(response.text)


class GatedSink(Sink):
    name = "gated"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.messages = 0
        self.held = 0
        """Sends waiting for the release now."""

    async def send(self, batch: Sequence[Item]) -> None:
        self.held += 1
        await self.release.wait()
        self.held -= 1
        self.messages += len(batch)


async def wait_delivered(gateway: Gateway, n: int) -> None:
    while gateway.ledger.delivered < n:
        await trio.sleep(0.005)


async def test_tcp_and_udp_counters_equal_what_was_sent() -> None:
    tcp_count, udp_count, size = 20_000, 300, 25
    gateway = Gateway(
        sources=[TcpSource(), UdpSource()], sink=NullSink(), services=[AdminServer(port=0)]
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            await send_tcp(*bound[0][0], count=tcp_count, size=size)
            await send_tcp(*bound[0][0], count=tcp_count, size=size, framing="newline")
            await send_udp(*bound[1][0], count=udp_count, size=size, rate=20_000)
            total = 2 * tcp_count + udp_count
            await wait_delivered(gateway, total)
            m = await scrape(gateway)
            gateway.shutdown()
    tcp = {"transport": "tcp"}
    udp = {"transport": "udp"}
    assert sample_value(m, "trio_gateway_received_messages_total", **tcp) == 2 * tcp_count
    assert sample_value(m, "trio_gateway_received_bytes_total", **tcp) == 2 * tcp_count * size
    assert sample_value(m, "trio_gateway_received_messages_total", **udp) == udp_count
    assert sample_value(m, "trio_gateway_received_bytes_total", **udp) == udp_count * size
    assert sample_value(m, "trio_gateway_connections_total", **tcp) == 2
    assert sample_value(m, "trio_gateway_connections_active", **tcp) == 0
    assert sample_value(m, "trio_gateway_delivered_messages_total") == total
    assert sample_value(m, "trio_gateway_sink_sent_messages_total", sink="null") == total
    assert sample_value(m, "trio_gateway_sink_batches_total", sink="null") >= total / 1024
    assert sample_value(m, "trio_gateway_dropped_messages_total") == 0
    assert sample_value(m, "trio_gateway_queue_depth", queue="ring") == 0
    assert sample_value(m, "trio_gateway_queue_capacity", queue="ring") == 10_000
    assert sample_value(m, "trio_gateway_accepting") == 1
    listener = gateway.sources[0].label
    assert (
        sample_value(m, "trio_gateway_received_messages_total", listener=listener) == 2 * tcp_count
    )


async def test_drops_and_rejections_are_counted_by_reason() -> None:
    sink = GatedSink()
    gateway = Gateway(
        sources=[TcpSource(max_message_size=100)],
        queue=RingBuffer(50, policy="drop_newest"),
        sink=sink,
        batch_size=10,
        services=[AdminServer(port=0)],
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            address = bound[0][0]
            await send_tcp(*address, count=1000, size=20)
            # Three connections that each send one frame over the limit.
            for _ in range(3):
                stream = await trio.open_tcp_stream(*address)
                async with stream:
                    await stream.send_all(b"x" * 500 + b"\n")
                    assert await stream.receive_some(10) == b""
            m = await scrape(gateway)
            # The queue holds 50 and the stuck pump at most one batch of 10; the rest dropped.
            dropped = sample_value(m, "trio_gateway_dropped_messages_total", reason="drop_newest")
            assert sample_value(m, "trio_gateway_received_messages_total") == 1000
            assert 0 < sample_value(m, "trio_gateway_queue_depth") <= 50
            assert 940 <= dropped < 1000
            assert sample_value(m, "trio_gateway_rejected_messages_total", reason="oversize") == 3
            assert sample_value(m, "trio_gateway_connections_total") == 4
            assert sample_value(m, "trio_gateway_delivered_messages_total") == 0
            sink.release.set()
            await wait_delivered(gateway, 1000 - int(dropped))
            m = await scrape(gateway)
            # Everything that was not dropped is delivered.
            assert sample_value(m, "trio_gateway_delivered_messages_total") == 1000 - dropped
            assert sample_value(m, "trio_gateway_queue_depth") == 0
            gateway.shutdown()


def check_agreement(m: Samples, ledger: Ledger) -> None:
    """The shutdown ledger and the metrics read the same counters."""
    assert sample_value(m, "trio_gateway_received_messages_total") == ledger.received
    assert sample_value(m, "trio_gateway_delivered_messages_total") == ledger.delivered
    for reason, n in ledger.dropped.items():
        assert sample_value(m, "trio_gateway_dropped_messages_total", reason=reason) == n, reason
    for reason, n in ledger.rejected.items():
        assert sample_value(m, "trio_gateway_rejected_messages_total", reason=reason) == n, reason
    assert (
        sample_value(m, "trio_gateway_abandoned_messages_total")
        + sample_value(m, "trio_gateway_queue_depth")
        + sample_value(m, "trio_gateway_pump_in_flight_messages")
        == ledger.abandoned
    )


async def test_final_metrics_agree_with_the_shutdown_ledger() -> None:
    sink = GatedSink()
    admin = AdminServer(port=0)
    gateway = Gateway(
        sources=[TcpSource(max_message_size=64), UdpSource()],
        queue=RingBuffer(100, policy="drop_oldest"),
        sink=sink,
        batch_size=7,
        drain_timeout=0.3,
        grace_period=0.1,
        services=[admin],
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            await send_tcp(*bound[0][0], count=500, size=30)
            await send_udp(*bound[1][0], count=50, size=30)
            stream = await trio.open_tcp_stream(*bound[0][0])
            async with stream:
                await stream.send_all(b"y" * 200)
                assert await stream.receive_some(10) == b""
            await wait_until(lambda: sink.held == 1, what="the pump holding one batch")
            live = await scrape(gateway)
            check_agreement(live, gateway.ledger)
            assert (
                sample_value(live, "trio_gateway_pump_in_flight_messages") == 7
            )  # one stuck batch
            gateway.shutdown()  # the sink never releases: the drain deadline abandons the rest
    ledger = gateway.ledger
    assert ledger.balanced
    assert ledger.abandoned > 0
    assert ledger.dropped["drop_oldest"] > 0
    assert admin.registry is not None
    final = parse_samples(generate_latest(admin.registry).decode())
    check_agreement(final, ledger)
    assert sample_value(final, "trio_gateway_pump_in_flight_messages") == 0
    assert sample_value(final, "trio_gateway_accepting") == 0


async def test_the_pump_times_every_sink_batch() -> None:
    gateway = Gateway(sources=[TcpSource()], sink=NullSink(), services=[AdminServer(port=0)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            await send_tcp(*bound[0][0], count=5000, size=20)
            await wait_delivered(gateway, 5000)
            m = await scrape(gateway)
            gateway.shutdown()
    batches = sample_value(m, "trio_gateway_sink_batches_total")
    assert batches >= 5
    assert sample_value(m, "trio_gateway_sink_batch_seconds_count") == batches
    assert sample_value(m, "trio_gateway_sink_batch_seconds_bucket", le="+Inf") == batches


async def test_a_flood_of_bad_frames_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connections = 1000
    gateway = Gateway(
        sources=[TcpSource(max_message_size=32, max_connections=2000)],
        sink=NullSink(),
        services=[AdminServer(port=0)],
    )
    caplog.set_level(logging.DEBUG, logger="trio_gateway")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            address = bound[0][0]
            limit = trio.CapacityLimiter(50)

            async def bad_client() -> None:
                async with limit:
                    stream = await trio.open_tcp_stream(*address)
                    async with stream:
                        await stream.send_all(b"z" * 100)
                        while await stream.receive_some(100):
                            pass

            caplog.clear()
            async with trio.open_nursery() as clients:
                for _ in range(connections):
                    clients.start_soon(bad_client)
            while gateway.source_counters[0].connections_active:
                await trio.sleep(0.01)
            m = await scrape(gateway)
            flood_lines = [r for r in caplog.records if r.name.startswith("trio_gateway.sources")]
            gateway.shutdown()
    # Every bad frame is counted...
    assert sample_value(m, "trio_gateway_rejected_messages_total", reason="oversize") == connections
    assert sample_value(m, "trio_gateway_connections_total") == connections
    # ...but the log stays short: a burst of 10, refilled at one line a second.
    assert 1 <= len(flood_lines) <= 40, len(flood_lines)
    assert any("suppressed" in r.getMessage() for r in flood_lines) or len(flood_lines) <= 10


async def test_memory_budget_use_is_shown_by_kind_under_load() -> None:
    """With the sink stalled, what the queue holds, the pump's batch in hand and what
    connections hold (a read's worth and a partial frame each) are each on /metrics, against
    the budget and its shares."""
    sink = GatedSink()
    source = TcpSource()
    gateway = Gateway(
        sources=[source],
        sink=sink,
        batch_size=10,
        max_memory=64 << 20,
        services=[AdminServer(port=0)],
    )
    size, count, partial = 1000, 100, 777
    held = 3 * (2 * source.read_size + partial)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            address = bound[0][0]
            await send_tcp(*address, count=count, size=size, framing="newline")
            await wait_until(lambda: sink.held == 1 and gateway.ledger.received == count)
            stalled = [await trio.open_tcp_stream(*address) for _ in range(3)]
            for stream in stalled:
                await stream.send_all(b"p" * partial)  # a frame begun, never finished
            await wait_until(lambda: gateway.budget.connections_held == held)
            m = await scrape(gateway)
            used = "trio_gateway_memory_budget_used_bytes"
            queued = sample_value(m, used, kind="queued")
            batch = sample_value(m, used, kind="batch")
            assert sample_value(m, used, kind="connections") == held
            assert batch > 0 and queued + batch == count * size
            assert queued == sample_value(m, "trio_gateway_queue_bytes")
            assert sample_value(m, "trio_gateway_memory_budget_bytes") == 64 << 20
            shares = "trio_gateway_memory_budget_share_bytes"
            assert sample_value(m, shares, share="queue") == 32 << 20
            assert sample_value(m, shares, share="held") == 32 << 20
            assert sample_value(m, shares, share="connection") == 2 << 20
            peak = sample_value(m, "trio_gateway_memory_budget_held_peak_bytes")
            assert peak >= batch + held
            assert sample_value(m, "trio_gateway_memory_budget_waiting_connections") == 0
            for stream in stalled:
                await stream.aclose()
            sink.release.set()
            await wait_delivered(gateway, count)
            await wait_until(lambda: gateway.budget.held == 0)
            m = await scrape(gateway)
            assert sample_value(m, used) == 0  # every kind back to nothing
            gateway.shutdown()


async def test_each_sinks_own_counts_are_on_metrics(tmp_path: Path) -> None:
    # A fan-out to two SQLite sinks: each branch's rows, under its own name; what a sink
    # counts of its own is a counter, a level (the broadcast sink's clients) a gauge.
    first, second = SqliteSink(tmp_path / "a.db"), SqliteSink(tmp_path / "b.db")
    fanout = FanOutSink([first, second])
    admin = AdminServer(port=0)
    gateway = Gateway(sources=[TcpSource()], sink=fanout, services=[admin, fanout])
    broadcast = WebSocketBroadcastSink(port=0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)
            await send_tcp(*bound[0][0], count=300, size=20)
            await wait_until(lambda: first.rows == 300 and second.rows == 300)
            m = await scrape(gateway)
            gateway.shutdown()
    for sink in (first, second):
        assert sample_value(m, "trio_gateway_sink_rows_total", sink=sink.name) == 300
        assert sample_value(m, "trio_gateway_sink_dead_lettered_total", sink=sink.name) == 0
    text = generate_latest(admin.registry).decode()
    assert "# TYPE trio_gateway_sink_rows_total counter" in text
    families = {f.name: f for f in _sink_statistics(broadcast)}
    assert families["trio_gateway_sink_clients"].type == "gauge"
    assert families["trio_gateway_sink_sent"].type == "counter"


def test_a_sinks_statistics_that_are_not_metrics_are_left_out() -> None:
    # A sink of a user's may say more than numbers under names a metric cannot take: the
    # scrape shows what it can, and never fails for the rest.
    class Talkative(NullSink):
        def statistics(self) -> dict[str, int]:
            return {"rows": 3, "last error": 1, "state": "ok", "bytes_out": 2.5}  # type: ignore[dict-item]

    families = {f.name: f for f in _sink_statistics(Talkative())}
    assert sorted(families) == ["trio_gateway_sink_bytes_out", "trio_gateway_sink_rows"]
