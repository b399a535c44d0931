"""Routing between pipelines: one pipeline's sink is another pipeline's source.

A :class:`ToPipeline` sink (``url = "pipeline:alerts"`` in a pipeline's sinks) offers each
batch to the queue of the pipeline it names, through that pipeline's :class:`FromPipeline`
source: the same :class:`~trio_gateway.Ingress` door as a network listener, so the target's
queue policy, counters and ledger apply unchanged. The sending pipeline counts the messages
delivered to its sink ``pipeline:alerts`` (routed out); the target counts them received from
its listener ``pipeline:logs`` (routed in): both ledgers balance on their own. With the
fan-out's ``routes``, only the messages whose route names that branch leave for the other
pipeline.

Loops are refused before anything runs (:func:`route_cycle`): a route graph with a cycle could
send a message around forever, or, under ``block``, have two pipelines wait on each other's
full queues. An acyclic graph also gives the order of starting (a target before its senders)
and of stopping (a target only after every sender has drained into it):
:class:`~trio_gateway.Pipelines` does both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import trio

from ._errors import ConfigurationError, SinkUnavailable
from ._ingress import Ingress
from ._message import Batch
from .sinks import Sink
from .sources import Source

__all__ = ("FromPipeline", "ToPipeline", "route_cycle", "start_order")

PREFIX = "pipeline:"
"""A sink URL that names another pipeline: ``pipeline:NAME``."""


class FromPipeline(Source):
    """The source of a pipeline that another one (``sender``) routes messages to.

    It listens on nothing: the sender's :class:`ToPipeline` sink offers batches through it.
    Its listener in the ledger and ``/metrics`` is ``pipeline:SENDER`` (transport
    ``pipeline``). :class:`~trio_gateway.Pipelines` connects the two ends by name; the config
    builder adds this source to a pipeline for each pipeline that routes to it.
    """

    transport = "pipeline"

    def __init__(self, sender: str) -> None:
        if not sender:
            raise ConfigurationError("pipeline", "needs the name of the sending pipeline")
        super().__init__(sender, 0)
        self.sender = sender
        self.ingress: Ingress | None = None
        """Set while the target pipeline runs and accepts; None before and once stopping."""

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.sender}"

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.ingress = ingress
        try:
            task_status.started([])
            await ingress.wait_stopping()
        finally:
            self.ingress = None


class ToPipeline(Sink):
    """A sink that hands each batch to another pipeline's queue (``pipeline:TARGET``).

    Under the target queue's ``block`` policy ``send`` waits for room, so a slow target
    pushes back on the sender as a slow destination would; under a drop policy the target
    drops and counts. The messages keep their origins. A target that is not running (not
    started, or shut down before its sender) makes ``send`` raise
    :class:`~trio_gateway.SinkUnavailable`: the sender's branch stops, or, as its only sink,
    the sender stops.
    """

    def __init__(self, target: str) -> None:
        if not target:
            raise ConfigurationError("sink", "pipeline: needs the name of the target pipeline")
        self.target = target
        self.name = f"{PREFIX}{target}"
        self.source: FromPipeline | None = None
        """The target's end, connected by :class:`~trio_gateway.Pipelines`."""

    def connect(self, source: FromPipeline) -> None:
        self.source = source

    async def open(self) -> None:
        if self.source is None:
            raise SinkUnavailable(self.name, f"not connected: no pipeline {self.target} runs here")

    async def send(self, batch: Batch) -> None:
        source = self.source
        ingress = source.ingress if source is not None else None
        if ingress is None:
            raise SinkUnavailable(self.name, f"pipeline {self.target} is not running")
        start = 0
        payloads = batch.payloads
        for origin, count in batch.runs:
            await ingress.offer(payloads[start : start + count], origin)
            start += count


def route_cycle(routes: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle in the route graph (``{pipeline: the pipelines it routes to}``) as the path
    that closes it (``["a", "b", "a"]``), or None when there is none."""
    graph = {name: list(targets) for name, targets in routes.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in graph.get(name, ()):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[name] = 2
        return None

    for name in graph:
        if name not in state and (found := visit(name)) is not None:
            return found
    return None


def start_order(names: Sequence[str], routes: Mapping[str, Iterable[str]]) -> list[str]:
    """``names`` with every route's target before its sender (the graph is acyclic): the
    order to start pipelines in, so that a sender's first batch finds its target running."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for target in routes.get(name, ()):
            visit(target)
        order.append(name)

    for name in names:
        visit(name)
    return order
