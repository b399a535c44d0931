"""The metrics of several pipelines on one endpoint: each gateway's own families (from the
admin collector) with a ``pipeline`` label added, merged by name, and the fan-out branches'
counters with ``pipeline`` and ``sink`` labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.samples import Sample

from .admin import GatewayCollector
from .admin._collector import PREFIX, _le

if TYPE_CHECKING:
    from ._pipelines import Pipelines

__all__ = ("DefaultRegistry", "PipelinesCollector")


class DefaultRegistry(Collector):
    """prometheus_client's default registry, served beside the pipelines: the metrics that
    user code (a processor) registers there, and the process, platform and GC metrics."""

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


class PipelinesCollector(Collector):
    """Read at scrape time, like :class:`~trio_gateway.admin.GatewayCollector`."""

    def __init__(self, pipelines: Pipelines) -> None:
        self.pipelines = pipelines
        self._collectors = {p.name: GatewayCollector(p.gateway) for p in pipelines}

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for name, collector in self._collectors.items():
            for family in collector.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples += [
                    Sample(s.name, {"pipeline": name, **s.labels}, s.value, s.timestamp)
                    for s in family.samples
                ]
        yield from merged.values()
        yield from self._branches()

    def _branches(self) -> Iterator[Metric]:
        labels = ["pipeline", "sink"]
        families = {
            "accepted": CounterMetricFamily(
                f"{PREFIX}_fanout_accepted_messages",
                "Messages handed to a sink's branch queue (fan-out).",
                labels=labels,
            ),
            "delivered": CounterMetricFamily(
                f"{PREFIX}_fanout_delivered_messages",
                "Messages a fan-out branch's sink accepted.",
                labels=labels,
            ),
            "dropped": CounterMetricFamily(
                f"{PREFIX}_fanout_dropped_messages",
                "Messages a fan-out branch's queue dropped by its policy.",
                labels=labels,
            ),
            "failed": CounterMetricFamily(
                f"{PREFIX}_fanout_failed_messages",
                "Messages a fan-out branch gave up on (retry budget spent).",
                labels=labels,
            ),
            "dead_lettered": CounterMetricFamily(
                f"{PREFIX}_fanout_dead_letter_messages",
                "Messages a fan-out branch's sink refused for good (or, with a dead letter, "
                "gave up on), written to the branch's dead letter.",
                labels=labels,
            ),
            "refused": CounterMetricFamily(
                f"{PREFIX}_fanout_refused_messages",
                "Messages a fan-out branch's sink refused for good, with no dead letter to "
                "take them (or it failed too).",
                labels=labels,
            ),
        }
        queued = GaugeMetricFamily(
            f"{PREFIX}_fanout_queued_messages",
            "Messages in a fan-out branch's queue or being sent.",
            labels=labels,
        )
        batch_seconds = HistogramMetricFamily(
            f"{PREFIX}_fanout_batch_seconds",
            "Time a fan-out branch's sink took to accept one batch (successful attempts).",
            labels=labels,
        )
        up = GaugeMetricFamily(
            f"{PREFIX}_fanout_sink_up",
            "1 while a fan-out branch's sink works (its last send succeeded), else 0.",
            labels=labels,
        )
        for pipeline in self.pipelines:
            if pipeline.fanout is None:
                continue
            for branch in pipeline.fanout.branches:
                key = [pipeline.name, branch.sink.name]
                ledger = branch.ledger
                for what, family in families.items():
                    family.add_metric(key, getattr(ledger, what))
                queued.add_metric(key, ledger.queued)
                histogram = branch.counters.batch_seconds
                buckets = [(_le(le), float(n)) for le, n in histogram.cumulative()]
                batch_seconds.add_metric(key, buckets, histogram.sum)
                up.add_metric(key, 0 if branch.problem or branch.lost else 1)
        unrouted = CounterMetricFamily(
            f"{PREFIX}_fanout_unrouted_messages",
            "Messages whose route no sink of the pipeline takes.",
            labels=["pipeline"],
        )
        for pipeline in self.pipelines:
            if pipeline.fanout is not None and pipeline.fanout.route is not None:
                unrouted.add_metric([pipeline.name], pipeline.fanout.unrouted)
        yield from families.values()
        yield queued
        yield batch_seconds
        yield up
        yield unrouted
