"""The Prometheus collector: reads the gateway's own counters at scrape time.

Nothing is counted twice: sources, the queue and the pump already keep plain integers (bumped
once per batch); this collector turns them into metric families only when ``/metrics`` is
scraped. Each gateway gets its own :class:`~prometheus_client.CollectorRegistry`, never the
global one, so two gateways in one process do not collide.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .._gateway import Gateway

__all__ = ("PREFIX", "GatewayCollector", "HistogramLike", "make_registry")

PREFIX = "trio_gateway"


class HistogramLike(Protocol):
    """What the collector needs of a latency histogram (see :class:`LatencyHistogram`)."""

    @property
    def count(self) -> int: ...

    @property
    def sum(self) -> float: ...

    def cumulative(self) -> Sequence[tuple[float, int]]: ...


class GatewayCollector(Collector):
    """A custom collector over one :class:`~trio_gateway.Gateway` (see docs/observability.md).

    ``batch_seconds`` is the pump's sink-latency histogram; by default it is looked up as
    ``gateway.pump_counters.batch_seconds`` and the histogram family is omitted while the pump
    does not keep one.
    """

    def __init__(self, gateway: Gateway, *, batch_seconds: HistogramLike | None = None) -> None:
        self.gateway = gateway
        self._batch_seconds = batch_seconds

    def describe(self) -> Iterator[Metric]:
        # Names are fixed, but the registry need not check them against other collectors:
        # the registry is this gateway's own.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        yield from self._sources()
        yield from self._queue()
        yield from self._budget()
        yield from self._pump()

    # -- sources --------------------------------------------------------------------------

    def _sources(self) -> Iterator[Metric]:
        labels = ["transport", "listener"]
        received = CounterMetricFamily(
            f"{PREFIX}_received_messages",
            "Messages a listener handed to the queue (accepted or dropped by its policy).",
            labels=labels,
        )
        received_bytes = CounterMetricFamily(
            f"{PREFIX}_received_bytes",
            "Payload bytes of the received messages.",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            f"{PREFIX}_rejected_messages",
            "Messages or connections refused at the door, with an answer to the sender "
            "where the transport has one, by reason.",
            labels=[*labels, "reason"],
        )
        active = GaugeMetricFamily(
            f"{PREFIX}_connections_active", "Connections open now.", labels=labels
        )
        connections = CounterMetricFamily(
            f"{PREFIX}_connections", "Connections accepted since start.", labels=labels
        )
        seen: Counter[tuple[str, str]] = Counter()
        for counters in self.gateway.source_counters:
            key = (counters.transport, counters.listener)
            seen[key] += 1
            # Two listeners with one label (both configured with port 0) must not emit
            # duplicate series, which a Prometheus server would refuse.
            listener = counters.listener if seen[key] == 1 else f"{key[1]}#{seen[key]}"
            values = [counters.transport, listener]
            received.add_metric(values, counters.received)
            received_bytes.add_metric(values, counters.received_bytes)
            for reason, n in sorted(counters.rejected.items()):
                rejected.add_metric([*values, reason], n)
            active.add_metric(values, counters.connections_active)
            connections.add_metric(values, counters.connections_total)
        yield from (received, received_bytes, rejected, active, connections)

    # -- queue ----------------------------------------------------------------------------

    def _queue(self) -> Iterator[Metric]:
        stats = self.gateway.queue.statistics()
        q = [stats.kind]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_queue_{name}", doc, labels=["queue"])
            family.add_metric(q, value)
            return family

        yield gauge("depth", "Messages waiting in the queue.", stats.depth)
        yield gauge("capacity", "The queue's bound in messages.", stats.capacity)
        yield gauge("bytes", "Payload bytes waiting (tracked only with a byte bound).", stats.bytes)
        if stats.max_bytes is not None:
            yield gauge("max_bytes", "The queue's bound in payload bytes.", stats.max_bytes)
        yield gauge(
            "blocked_producers",
            "Producers waiting for room under the block policy (backpressure in action).",
            stats.waiting_producers,
        )

    # -- the memory budget ----------------------------------------------------------------

    def _budget(self) -> Iterator[Metric]:
        gateway = self.gateway
        budget = gateway.budget.statistics()
        prefix = f"{PREFIX}_memory_budget"
        yield GaugeMetricFamily(
            f"{prefix}_bytes", "The memory budget (limits.max_memory).", value=budget.max_memory
        )
        shares = GaugeMetricFamily(
            f"{prefix}_share_bytes",
            "How the budget is split: queue (the queue's share), held (the rest: connections "
            "and the sink's batch), connection (what one connection may hold of it).",
            labels=["share"],
        )
        for share, value in (
            ("queue", budget.queue_bytes),
            ("held", budget.pool),
            ("connection", budget.connection_share),
        ):
            shares.add_metric([share], value)
        yield shares
        used = GaugeMetricFamily(
            f"{prefix}_used_bytes",
            "Bytes charged to the budget now, by kind: queued (payload in a memory queue), "
            "connections (read and not yet queued), batch (the pump's batch in hand).",
            labels=["kind"],
        )
        queue = gateway.queue.statistics()
        # A memory queue's byte bound is the budget's queue share; a disk queue's bytes are
        # on disk (its share bounds what waits in memory for the writer, which it does not
        # report), so then only trio_gateway_queue_bytes says what it holds.
        if queue.max_bytes == budget.queue_bytes:
            used.add_metric(["queued"], queue.bytes)
        used.add_metric(["connections"], budget.connections)
        used.add_metric(["batch"], budget.batch)
        yield used
        yield GaugeMetricFamily(
            f"{prefix}_held_peak_bytes",
            "The most the connections and the batch have held at once (queued not included).",
            value=budget.peak,
        )
        yield GaugeMetricFamily(
            f"{prefix}_waiting_connections",
            "Connections that stopped reading until the budget has room (TCP).",
            value=budget.waiting,
        )

    # -- pump, sink and the ledger --------------------------------------------------------

    def _pump(self) -> Iterator[Metric]:
        gateway = self.gateway
        pump = gateway.pump_counters
        stats = gateway.queue.statistics()
        sink = [gateway.sink.name]

        dropped = CounterMetricFamily(
            f"{PREFIX}_dropped_messages",
            "Received messages that will not be delivered, by reason: drop_newest and "
            "drop_oldest (the queue's overflow policy), filtered (the processor returned "
            "None), processor_error, sink_failed (retry budget spent).",
            labels=["reason"],
        )
        for reason, n in (
            ("drop_newest", stats.dropped.get("drop_newest", 0)),
            ("drop_oldest", stats.dropped.get("drop_oldest", 0)),
            ("filtered", pump.filtered),
            ("processor_error", sum(pump.failed.values())),
            ("sink_failed", pump.sink_failed),
            ("dead_letter", pump.dead_lettered),
            ("refused", pump.refused),
        ):
            dropped.add_metric([reason], n)
        yield dropped

        processor_failed = CounterMetricFamily(
            f"{PREFIX}_processor_failed_messages",
            "Messages the processor raised on, by exception type.",
            labels=["error"],
        )
        failed: Counter[str] = pump.failed
        for error, n in sorted(failed.items()):
            processor_failed.add_metric([error], n)
        yield processor_failed

        abandoned = sum(c.abandoned for c in gateway.source_counters) + pump.abandoned
        yield CounterMetricFamily(
            f"{PREFIX}_abandoned_messages",
            "Messages cut off by a deadline (connection grace period or drain timeout); "
            "the ledger's abandoned = this + queue depth + in flight.",
            value=abandoned,
        )
        # The ledger counts what is still queued or in the pump's hands as abandoned (that is
        # what a stop at this instant would abandon); the difference is the pump's batch.
        in_flight = gateway.ledger.abandoned - abandoned - stats.depth
        yield GaugeMetricFamily(
            f"{PREFIX}_pump_in_flight_messages",
            "Messages the pump has taken from the queue and not yet delivered or dropped.",
            value=max(in_flight, 0),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_delivered_messages",
            "Messages the sink accepted (the ledger's delivered).",
            value=pump.delivered,
        )

        def sink_counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_sink_{name}", doc, labels=["sink"])
            family.add_metric(sink, value)
            return family

        yield sink_counter("sent_messages", "Messages the sink accepted.", pump.delivered)
        yield sink_counter("batches", "Batches the sink accepted.", pump.sink_batches)
        yield sink_counter(
            "failed",
            "Failed attempts to send a batch (each failed retry counts).",
            pump.sink_errors,
        )
        yield sink_counter(
            "retries", "Retries scheduled after a failed attempt.", pump.sink_retries
        )

        histogram = self._batch_seconds
        if histogram is None:
            histogram = getattr(pump, "batch_seconds", None)
        if histogram is not None:
            family = HistogramMetricFamily(
                f"{PREFIX}_sink_batch_seconds",
                "Time the sink took to accept one batch (successful attempts).",
                labels=["sink"],
            )
            buckets = [(_le(le), float(n)) for le, n in histogram.cumulative()]
            family.add_metric(sink, buckets, histogram.sum)
            yield family

        up = GaugeMetricFamily(
            f"{PREFIX}_sink_up",
            "1 while the sink's destination works (its last open or send succeeded), else 0.",
            labels=["sink"],
        )
        up.add_metric(sink, 0 if gateway.sink_problem is not None else 1)
        yield up
        yield from _sink_statistics(gateway.sink)
        yield GaugeMetricFamily(
            f"{PREFIX}_accepting",
            "1 while the gateway accepts messages, 0 from the moment shutdown starts.",
            value=1 if gateway.accepting else 0,
        )


_METRIC_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _sink_statistics(sink: object) -> Iterator[Metric]:
    """What each sink counts of its own (its ``statistics()``: rows written, messages stored
    by JetStream, clients connected...): ``trio_gateway_sink_<key>_total`` counters labelled
    by the sink, or ``trio_gateway_sink_<key>`` gauges for the keys its ``statistics_gauges``
    names. A fan-out's branches each report theirs."""
    branches = getattr(sink, "branches", None)  # a FanOutSink (admin does not import it)
    sinks = [branch.sink for branch in branches] if branches else [sink]
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for each in sinks:
        statistics = getattr(each, "statistics", None)
        if statistics is None:
            continue
        gauges: frozenset[str] = getattr(each, "statistics_gauges", frozenset())
        for key, value in statistics().items():
            if not _METRIC_KEY.fullmatch(key) or not isinstance(value, int | float):
                continue  # a sink of a user's that says more than numbers: not a metric
            family = families.get(key)
            if family is None:
                doc = f"The sink's own {key!r} (docs/observability.md)."
                kind = GaugeMetricFamily if key in gauges else CounterMetricFamily
                family = families[key] = kind(f"{PREFIX}_sink_{key}", doc, labels=["sink"])
            family.add_metric([getattr(each, "name", "sink")], value)
    yield from families.values()


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def make_registry(
    gateway: Gateway, *, process_metrics: bool = True, batch_seconds: HistogramLike | None = None
) -> CollectorRegistry:
    """A registry of this gateway's own (plus the ``process_*`` metrics if asked)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway, batch_seconds=batch_seconds))
    if process_metrics:
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=registry)
    return registry
