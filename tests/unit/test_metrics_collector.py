"""The metrics collector and histograms without a network: series, buckets, cost until scraped."""

from __future__ import annotations

import pytest
from helpers import parse_samples, sample_value
from prometheus_client import generate_latest

from trio_gateway import Gateway, NullSink, TcpSource
from trio_gateway.admin import GatewayCollector, LatencyHistogram, make_registry


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    histogram = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.01, 0.05, 3.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 2, 1, 1]
    assert histogram.cumulative() == [(0.001, 2), (0.01, 4), (0.1, 5), (float("inf"), 6)]
    assert histogram.count == 6
    assert histogram.sum == pytest.approx(3.0635)
    with pytest.raises(ValueError):
        LatencyHistogram((0.1, 0.01))
    with pytest.raises(ValueError):
        LatencyHistogram(())


def test_collector_exports_the_batch_histogram() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0001, 0.005, 0.005, 1.0):
        histogram.observe(seconds)
    gateway = Gateway(sources=[TcpSource()], sink=NullSink())
    registry = make_registry(gateway, process_metrics=False, batch_seconds=histogram)
    m = parse_samples(generate_latest(registry).decode())
    bucket = "trio_gateway_sink_batch_seconds_bucket"
    assert sample_value(m, bucket, le="0.001", sink="null") == 1
    assert sample_value(m, bucket, le="0.01", sink="null") == 3
    assert sample_value(m, bucket, le="+Inf", sink="null") == 4
    assert sample_value(m, "trio_gateway_sink_batch_seconds_count") == 4
    assert sample_value(m, "trio_gateway_sink_batch_seconds_sum") == pytest.approx(1.0101)
    assert not any(name.startswith("process_") for name in m)


def test_listeners_sharing_a_label_stay_distinct_series() -> None:
    gateway = Gateway(sources=[TcpSource(), TcpSource()], sink=NullSink())
    gateway.source_counters[0].received = 5
    gateway.source_counters[1].received = 7
    registry = make_registry(gateway, process_metrics=False)
    m = parse_samples(generate_latest(registry).decode())
    series = m["trio_gateway_received_messages_total"]
    assert sorted(series.values()) == [5, 7]
    assert len({dict(k)["listener"] for k in series}) == 2


def test_collecting_costs_nothing_until_scraped() -> None:
    gateway = Gateway(sources=[TcpSource()], sink=NullSink())
    collector = GatewayCollector(gateway)
    gateway.source_counters[0].received += 3
    first = {m.name: m for m in collector.collect()}
    gateway.source_counters[0].received += 4
    second = {m.name: m for m in collector.collect()}
    name = "trio_gateway_received_messages"
    assert first[name].samples[0].value == 3
    assert second[name].samples[0].value == 7
