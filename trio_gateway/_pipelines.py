"""Named pipelines: sources -> queue -> a chain of processors -> one or more sinks, several
of them in one process under one nursery.

A :class:`Pipeline` is one :class:`~trio_gateway.Gateway` (its sources, queue and pump) whose
sink is a :class:`~trio_gateway._fanout.FanOutSink` when it has more than one destination:
the gateway's shutdown sequence, retries and ledger are reused as they are. A
:class:`Pipelines` runs several side by side: one nursery, one signal handler, one admin
endpoint whose metrics carry a ``pipeline`` label (and a ``sink`` label per fan-out branch).
A pipeline can route messages to another (:mod:`trio_gateway._routing`): :class:`Pipelines`
connects the two ends, refuses a loop, starts every target before its senders and stops it
only after they have drained into it.

Processors chain: each gets the previous one's result as the message's payload, which may be
any object (a parsed ``dict``, a protobuf message), not only bytes. The last one's result is
what the sinks get: bytes or a :class:`~trio_gateway.Message` as for a single processor, or a
``dict``/``list``, sent on as its compact JSON. ``None`` from any of them filters the message.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import trio

from ._errors import ConfigurationError
from ._fanout import FanOutSink, QueuedSink, SinkLedger
from ._gateway import Gateway, Processor, RetryPolicy, Service
from ._ledger import Ledger
from ._log import logger
from ._message import Message
from ._routing import FromPipeline, ToPipeline, route_cycle, start_order
from ._signals import watch_signals
from .queues import Queue
from .sinks import Sink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .admin import AdminServer
    from .sources import Source

__all__ = ("Pipeline", "Pipelines", "chain_processors")

_log = logger.getChild("pipelines")


def chain_processors(processors: Sequence[Processor]) -> Processor | None:
    """One processor that runs ``processors`` in order (None for an empty chain)."""
    steps = tuple(processors)
    if not steps:
        return None
    is_async = [inspect.iscoroutinefunction(step) for step in steps]

    async def chain(message: Message) -> Any:
        value: Any = message
        for step, awaited in zip(steps, is_async, strict=True):
            if not isinstance(value, Message):
                value = Message(value, message.origin)
            result = step(value)
            if awaited or inspect.isawaitable(result):
                result = await result  # type: ignore[misc]
            if result is None:
                return None
            value = result
        return _encoded(value, message)

    return chain


def _encoded(value: Any, message: Message) -> bytes | Message:
    if isinstance(value, Message):
        if isinstance(value.payload, bytes):
            return value
        return Message(_to_bytes(value.payload), value.origin)
    return _to_bytes(value)


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":")).encode()
    serialize = getattr(value, "SerializeToString", None)  # a protobuf message
    if callable(serialize):
        return cast(bytes, serialize())
    raise TypeError(f"a processor chain ended with {type(value).__name__}; expected bytes")


class Pipeline:
    """One named pipeline. ``sinks`` are :class:`Sink` objects or ready-made
    :class:`~trio_gateway._fanout.QueuedSink` objects (a sink with its own queue capacity and
    policy); with more than one, each gets its own queue and pump (fan-out). ``ack`` is each
    source's acknowledgement level, as for :class:`Gateway`; ``"delivered"`` needs one sink
    (a fan-out confirms a batch once its branches have queued it)."""

    def __init__(
        self,
        name: str,
        *,
        sources: Sequence[Source],
        sinks: Sequence[Sink | QueuedSink],
        queue: Queue[bytes] | None = None,
        processors: Sequence[Processor] = (),
        batch_size: int = 1024,
        drain_timeout: float = 10.0,
        grace_period: float = 2.0,
        retry: RetryPolicy | None = None,
        sink_wait: float = 0.0,
        sink_capacity: int = 10_000,
        route: str | None = None,
        services: Sequence[Service] = (),
        ack: str | Mapping[Source, str] = "queued",
    ) -> None:
        if not name:
            raise ConfigurationError("pipelines", "a pipeline needs a name")
        if not sinks:
            raise ConfigurationError(f"pipelines.{name}.sinks", "a pipeline needs a sink")
        self.name = name
        self.fanout: FanOutSink | None = None
        sink: Sink
        # A sink with tasks of its own (a WebSocket client or server) runs them as a service.
        own = [s.sink if isinstance(s, QueuedSink) else s for s in sinks]
        services = (
            *services,
            *(cast(Service, s) for s in own if callable(getattr(s, "run", None))),
        )
        if len(sinks) == 1 and isinstance(sinks[0], Sink) and route is None:
            sink = sinks[0]
        else:
            branches = [
                s
                if isinstance(s, QueuedSink)
                else QueuedSink(s, capacity=sink_capacity, retry=retry)
                for s in sinks
            ]
            for branch in branches:
                if branch.queue.capacity < batch_size:
                    raise ConfigurationError(
                        f"pipelines.{name}.sinks",
                        f"{branch.sink.name}: queue capacity {branch.queue.capacity} is "
                        f"smaller than a batch ({batch_size})",
                    )
            self.fanout = sink = FanOutSink(branches=branches, route=route)
            services = (*services, self.fanout)
            modes = (ack,) if isinstance(ack, str) else tuple(ack.values())
            if "delivered" in modes:  # the fan-out confirms a batch once the branches queue it
                raise ConfigurationError(
                    f"pipelines.{name}.sources", 'ack = "delivered" needs a pipeline of one sink'
                )
        self.gateway = Gateway(
            sources=sources,
            sink=sink,
            queue=queue,
            processor=chain_processors(processors),
            batch_size=batch_size,
            drain_timeout=drain_timeout,
            grace_period=grace_period,
            retry=retry,
            services=services,
            sink_wait=sink_wait,
            ack=ack,
        )

    @property
    def sinks(self) -> tuple[Sink, ...]:
        if self.fanout is None:
            return (self.gateway.sink,)
        return tuple(b.sink for b in self.fanout.branches)

    @property
    def ledger(self) -> Ledger:
        return self.gateway.ledger

    @property
    def sink_ledgers(self) -> dict[str, SinkLedger]:
        """Per sink: what it was handed and where that went (one sink: the gateway's own)."""
        if self.fanout is not None:
            return self.fanout.ledgers
        ledger, sink, pump = self.gateway.ledger, self.gateway.sink, self.gateway.pump_counters
        failed = ledger.dropped.get("sink_failed", 0)
        handed = ledger.delivered + failed + pump.dead_lettered + pump.refused + pump.abandoned
        return {
            sink.name: SinkLedger(
                sink.name,
                handed,
                ledger.delivered,
                0,
                failed,
                pump.abandoned,
                dead_lettered=pump.dead_lettered,
                refused=pump.refused,
            )
        }

    def report(self) -> dict[str, object]:
        """The pipeline's ledger and its sinks' ledgers, as ``serve`` prints them."""
        out: dict[str, object] = {
            **self.ledger.as_dict(),
            "sinks": {name: s.as_dict() for name, s in self.sink_ledgers.items()},
        }
        gateway = self.gateway
        routed_in = {
            source.sender: counters.received
            for source, counters in zip(gateway.sources, gateway.source_counters, strict=True)
            if isinstance(source, FromPipeline)
        }
        routed_out = {
            sink.target: self.sink_ledgers[sink.name].delivered
            for sink in self.sinks
            if isinstance(sink, ToPipeline)
        }
        # Shown when there are routes: received from each sender, delivered to each target.
        if routed_in:
            out["routed_in"] = routed_in
        if routed_out:
            out["routed_out"] = routed_out
        return out

    def __repr__(self) -> str:
        return (
            f"<Pipeline {self.name}: {len(self.gateway.sources)} sources, {len(self.sinks)} sinks>"
        )


def total_ledger(ledgers: Sequence[Ledger]) -> Ledger:
    """The sum of several pipelines' ledgers (balanced when each is)."""
    dropped: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for ledger in ledgers:
        dropped.update(ledger.dropped)
        rejected.update(ledger.rejected)
    return Ledger(
        received=sum(x.received for x in ledgers),
        delivered=sum(x.delivered for x in ledgers),
        dropped=dict(dropped),
        abandoned=sum(x.abandoned for x in ledgers),
        rejected=dict(rejected),
    )


class Pipelines:
    """Several named pipelines in one nursery: started together, stopped together.

    ``run`` reports ``{name: bound addresses per source}`` through ``task_status`` and returns
    the total :class:`Ledger`; :attr:`pipelines` holds each one's own. One signal handler
    (first SIGINT/SIGTERM: every pipeline shuts down; a second: every one stops at once) and
    one admin endpoint serve them all.
    """

    def __init__(
        self,
        pipelines: Sequence[Pipeline],
        *,
        admin: AdminServer | None = None,
        handle_signals: bool = False,
    ) -> None:
        if not pipelines:
            raise ConfigurationError("pipelines", "no pipeline configured")
        names = [p.name for p in pipelines]
        if len(set(names)) != len(names):
            raise ConfigurationError("pipelines", f"two pipelines share a name: {names}")
        self.pipelines: dict[str, Pipeline] = {p.name: p for p in pipelines}
        self.routes = self._connect_routes()
        """``{pipeline: the pipelines it routes to}`` (acyclic)."""
        self.admin = admin
        self.handle_signals = handle_signals
        self.admin_address: Any = None
        self._stopping = trio.Event()

    def _connect_routes(self) -> dict[str, list[str]]:
        """Connect every :class:`ToPipeline` sink to its target's :class:`FromPipeline`
        source, each end checked against the other; refuse a loop."""
        routes: dict[str, list[str]] = {}
        ends = {
            (source.sender, p.name): source
            for p in self
            for source in p.gateway.sources
            if isinstance(source, FromPipeline)
        }
        for pipeline in self:
            routes[pipeline.name] = []
            for sink in pipeline.sinks:
                if not isinstance(sink, ToPipeline):
                    continue
                sender, target = pipeline.name, sink.target
                if target not in self.pipelines:
                    raise ConfigurationError(
                        f"pipelines.{sender}.sinks", f"{sink.name}: there is no pipeline {target}"
                    )
                source = ends.pop((sender, target), None)
                if source is None:
                    raise ConfigurationError(
                        f"pipelines.{target}.sources",
                        f"pipeline {sender} routes here: add FromPipeline({sender!r})",
                    )
                sink.connect(source)
                routes[pipeline.name].append(sink.target)
        for sender, target in ends:
            raise ConfigurationError(
                f"pipelines.{target}.sources", f"pipeline {sender} has no sink pipeline:{target}"
            )
        cycle = route_cycle(routes)
        if cycle is not None:
            raise ConfigurationError(
                f"pipelines.{cycle[0]}.sinks", "routes in a loop: " + " -> ".join(cycle)
            )
        return routes

    def _senders(self, name: str) -> list[Pipeline]:
        return [self.pipelines[s] for s, targets in self.routes.items() if name in targets]

    def __getitem__(self, name: str) -> Pipeline:
        return self.pipelines[name]

    def __iter__(self) -> Iterator[Pipeline]:
        return iter(self.pipelines.values())

    # -- what the admin endpoint's health checks read ---------------------------------------

    @property
    def state(self) -> str:
        states = {p.gateway.state for p in self}
        for state in ("starting", "draining", "running", "created"):
            if state in states:
                return state
        return "stopped"

    @property
    def accepting(self) -> bool:
        return all(p.gateway.accepting for p in self)

    @property
    def readiness(self) -> str:
        for pipeline in self:
            if not pipeline.gateway.accepting:
                return f"pipeline {pipeline.name}: {pipeline.gateway.readiness}"
        return "ready"

    @property
    def ledger(self) -> Ledger:
        return total_ledger([p.ledger for p in self])

    # -- control and running ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Shut every pipeline down; one that others route to waits until they have stopped
        (drained into it), and is shut down then (called again as each one stops)."""
        self._stopping.set()
        for pipeline in self:
            if all(s.gateway.state == "stopped" for s in self._senders(pipeline.name)):
                pipeline.gateway.shutdown()

    def abort(self) -> None:
        self._stopping.set()
        for pipeline in self:
            pipeline.gateway.abort()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> Ledger:
        async with trio.open_nursery() as outer:
            if self.admin is not None:
                registry = pipelines_registry(self)
                health = cast(Gateway, self)  # the admin endpoint reads state and readiness
                self.admin_address = await outer.start(self.admin.serve, health, registry)
            if self.handle_signals:
                await outer.start(
                    functools.partial(
                        watch_signals,
                        self._stopping,
                        self.shutdown,
                        self.abort,
                        log=_log,
                        what="shutting down every pipeline",
                    )
                )
            bound: dict[str, Any] = {}
            async with trio.open_nursery() as gateways:
                # Every target before its senders: a sender's first batch finds it running.
                for name in start_order(list(self.pipelines), self.routes):
                    bound[name] = await gateways.start(self._run_one, self.pipelines[name])
                bound = {name: bound[name] for name in self.pipelines}
                _log.info("pipelines running: %s", ", ".join(self.pipelines))
                task_status.started(bound)
            outer.cancel_scope.cancel()
        return self.ledger

    async def _run_one(self, pipeline: Pipeline, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            await pipeline.gateway.run(task_status=task_status)
        finally:
            # One pipeline stopped (shut down alone, or its sink gone for good): the others
            # stop too, each with its own flush, a target once its senders have stopped.
            self.shutdown()


def pipelines_registry(pipelines: Pipelines) -> CollectorRegistry:
    """One registry for every pipeline: each gateway's metrics with a ``pipeline`` label,
    each fan-out sink's counters with ``pipeline`` and ``sink`` labels, and whatever the
    processors registered in prometheus_client's default registry (a processor's own
    counters: the process metrics come from there too)."""
    from prometheus_client import CollectorRegistry

    from ._pipelines_metrics import DefaultRegistry, PipelinesCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelinesCollector(pipelines))
    registry.register(DefaultRegistry())
    return registry
