"""The supervisor's admin endpoint: the workers' metrics summed, plus its own.

The same :class:`AdminServer` a single gateway runs, over a collector that reads the
supervisor's :class:`MetricsAggregate` (see ``_metrics.py``) at scrape time and adds the
per-worker families (up, restarts, received, connections) and the parent's own ``process_*``
metrics under ``worker="supervisor"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..admin import AdminServer
from ._metrics import Samples

if TYPE_CHECKING:
    from .._gateway import Gateway
    from ._supervisor import Supervisor

__all__ = ("SupervisorAdmin",)


class _SupervisorCollector(Collector):
    """The workers' metrics summed (see :class:`MetricsAggregate`), plus the supervisor's."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._process = ProcessCollector(registry=None)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        supervisor = self.supervisor
        live = supervisor.live_samples()
        own_process = {m.name: m for m in self._process.collect()}
        for family in supervisor.metrics.metrics(live):
            if family.name == "trio_gateway_accepting":
                family = Metric(family.name, family.documentation, "gauge")
                family.add_sample(family.name, {}, 1.0 if supervisor.accepting else 0.0)
            mine = own_process.pop(family.name, None)
            if mine is not None:
                for sample in mine.samples:
                    family.add_sample(
                        sample.name, {**sample.labels, "worker": "supervisor"}, sample.value
                    )
            yield family
        for mine in own_process.values():
            family = Metric(mine.name, mine.documentation, mine.type)
            for sample in mine.samples:
                family.add_sample(
                    sample.name, {**sample.labels, "worker": "supervisor"}, sample.value
                )
            yield family
        yield from self._workers(live)

    def _workers(self, live: Mapping[int, Samples]) -> Iterator[Metric]:
        supervisor = self.supervisor
        prefix = "trio_gateway_worker"
        yield GaugeMetricFamily(
            "trio_gateway_workers", "Worker processes configured.", value=supervisor.workers
        )
        up = GaugeMetricFamily(
            f"{prefix}_up", "1 while the worker runs and is ready.", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            f"{prefix}_restarts",
            "Times the worker was started again after it ended.",
            labels=["worker"],
        )
        received = CounterMetricFamily(
            f"{prefix}_received_messages",
            "Messages this worker received (how the kernel spreads the load).",
            labels=["worker"],
        )
        connections = CounterMetricFamily(
            f"{prefix}_connections", "Connections this worker accepted.", labels=["worker"]
        )
        for slot in supervisor.slots:
            name = [str(slot.index)]
            run = slot.run
            up.add_metric(name, 1 if run is not None and run.ready else 0)
            restarts.add_metric(name, slot.restarts)
            samples = live.get(slot.index)
            metrics = supervisor.metrics
            received.add_metric(
                name, metrics.worker_total(slot.index, samples, "trio_gateway_received_messages")
            )
            connections.add_metric(
                name, metrics.worker_total(slot.index, samples, "trio_gateway_connections")
            )
        yield from (up, restarts, received, connections)


class SupervisorAdmin(AdminServer):
    """The admin endpoint of the parent: the same server, over the supervisor's collector."""

    async def run(  # type: ignore[override]
        self,
        supervisor: Supervisor,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SupervisorCollector(supervisor))
        # /readyz and /metrics read ``accepting`` and ``state``, which a Supervisor has too.
        await self.serve(
            cast("Gateway", supervisor), registry, what=" (all workers)", task_status=task_status
        )
