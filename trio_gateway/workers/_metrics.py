"""The workers' ``/metrics`` summed into one view, and a ledger read from a worker's metrics.

Pure data work (no I/O): the supervisor scrapes, this adds up. See :class:`MetricsAggregate`
for the rules that keep the sums right across worker restarts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import TypeAlias

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .._ledger import Ledger

__all__ = ("MetricsAggregate", "SampleKey", "Samples", "ledger_from_samples")

SampleKey: TypeAlias = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted label pairs)"""
Samples: TypeAlias = dict[str, dict[SampleKey, float]]
"""family name -> sample -> value"""
_COUNTER_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_PER_WORKER_PREFIX = "process_"


class MetricsAggregate:
    """Sums the workers' ``/metrics`` into one view that stays correct across restarts.

    * Counters and histograms are summed over the workers; when a worker run ends, its last
      scraped values are kept (``retire``) and added to its successors', so a sum never goes
      backwards (Prometheus would read a drop as a counter reset).
    * Gauges are summed over the running workers only (queue depth and capacity, connections).
    * ``process_*`` families are per process: they get a ``worker`` label instead of a sum.
    """

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        """family name -> (type, help), in first-seen order."""
        self.retired: dict[int, Samples] = {}

    def parse(self, worker: int, text: str) -> Samples:
        """One worker's exposition text -> samples (raises ValueError if malformed)."""
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.meta.setdefault(family.name, (family.type, family.documentation))
            per_worker = family.name.startswith(_PER_WORKER_PREFIX)
            values = samples.setdefault(family.name, {})
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_worker:
                    labels["worker"] = str(worker)
                key = (sample.name, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + sample.value
        return samples

    def retire(self, worker: int, samples: Samples) -> None:
        """A worker run ended: keep its counters (not its gauges) in the totals."""
        kept = self.retired.setdefault(worker, {})
        for name, values in samples.items():
            if self.meta.get(name, ("gauge", ""))[0] not in _COUNTER_TYPES:
                continue
            target = kept.setdefault(name, {})
            for key, value in values.items():
                target[key] = target.get(key, 0.0) + value

    def worker_total(self, worker: int, live: Samples | None, family: str) -> float:
        """One worker's sum of every sample of a counter ``family`` (retired runs included)."""
        total = sum(self.retired.get(worker, {}).get(family, {}).values())
        if live is not None:
            total += sum(live.get(family, {}).values())
        return total

    def combine(self, live: Mapping[int, Samples]) -> dict[str, dict[SampleKey, float]]:
        """Retired counters + every running worker's samples, summed per sample."""
        totals: dict[str, dict[SampleKey, float]] = {name: {} for name in self.meta}
        for source in (*self.retired.values(), *live.values()):
            for name, values in source.items():
                target = totals.setdefault(name, {})
                for key, value in values.items():
                    target[key] = target.get(key, 0.0) + value
        return totals

    def metrics(self, live: Mapping[int, Samples]) -> Iterator[Metric]:
        """The combined families, ready for a collector to yield."""
        for name, values in self.combine(live).items():
            if not values:
                continue
            kind, documentation = self.meta.get(name, ("unknown", ""))
            family = Metric(name, documentation, kind)
            for (sample, labels), value in values.items():
                family.add_sample(sample, dict(labels), value)
            yield family


def ledger_from_samples(samples: Samples) -> Ledger:
    """What a worker's metrics say about its messages (for a worker that left no ledger)."""

    def by_label(family: str, label: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for (sample, labels), value in samples.get(family, {}).items():
            if sample.endswith("_total"):
                out[dict(labels).get(label, "")] += int(value)
        return out

    received = sum(by_label("trio_gateway_received_messages", "transport").values())
    delivered = sum(by_label("trio_gateway_delivered_messages", "").values())
    dropped = dict(by_label("trio_gateway_dropped_messages", "reason"))
    rejected = {k: v for k, v in by_label("trio_gateway_rejected_messages", "reason").items() if v}
    abandoned = max(received - delivered - sum(dropped.values()), 0)
    return Ledger(received, delivered, dropped, abandoned, rejected)
