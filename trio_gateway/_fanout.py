"""Fan-out: every batch to every sink of a pipeline, each sink behind its own queue and pump.

The gateway's pump hands a batch to :class:`FanOutSink`, which puts it into one bounded
queue per destination (a :class:`~trio_gateway.queues.RingBuffer` of batches, bounded in
messages) and returns. Each destination has a :class:`QueuedSink`: a task that takes batches from
its queue and sends them to its sink with the gateway's retry policy. A slow or stalled sink
fills only its own queue; what happens then is its queue's named policy: ``block`` (the
fan-out waits, and so, once that queue is full, does every branch behind the gateway's queue)
or ``drop_newest`` / ``drop_oldest`` (that sink loses messages, counted, and the others go on
at full speed).

The branch tasks need a nursery: the fan-out is also a gateway :class:`~trio_gateway.Service`
(``Gateway(sink=fanout, services=[fanout])``; :class:`~trio_gateway.Pipeline` does this),
which the gateway starts before its pump and cancels after its ledger is final. At shutdown
the pump's ``aclose`` closes the branch queues and waits (bounded by the drain deadline) for
each branch to deliver what it holds; what a branch still holds after that is abandoned.

A destination that refuses some messages for good (:class:`~trio_gateway.SinkRefused`: an
HTTP 400 for one record) is not retried: as in the gateway's pump, the rest of the batch
counts as delivered and the refused messages go to the branch's dead letter, or are dropped
and counted ``refused`` without one (:func:`~trio_gateway.sinks._deadletter.set_aside`, the
pump's own path).

Each branch keeps its own ledger: ``accepted == delivered + dropped + failed + dead_letter +
refused + abandoned`` once stopped (while running, the rest is queued or in flight).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ._errors import ConfigurationError, SinkError, SinkRefused, SinkUnavailable
from ._gateway import Gateway
from ._histogram import LatencyHistogram
from ._log import RateLimitedLogger, logger
from ._message import Batch, Origin
from ._retry import RetryPolicy, send_with_retry
from .queues import OverflowPolicy, RingBuffer
from .sinks import Sink
from .sinks._deadletter import DeadLetter, set_aside

__all__ = ("FanOutSink", "QueuedSink", "SinkLedger")

_log = logger.getChild("fanout")
_BATCHES_PER_WAKE = 64
"""Batches a branch takes from its queue per wake-up (one task switch for many batches)."""
_errors = RateLimitedLogger(_log)


@dataclass(frozen=True, slots=True)
class SinkLedger:
    """Where the messages handed to one sink of a fan-out went."""

    sink: str
    accepted: int
    delivered: int
    dropped: int
    """Lost to the branch queue's policy (``drop_newest``/``drop_oldest``)."""
    failed: int
    """Given up after the retry budget."""
    queued: int
    """In the branch queue or being sent (abandoned once the branch has stopped)."""
    dead_lettered: int = 0
    """Refused for good by the destination (or out of retries, with a dead letter) and
    written to the branch's dead letter."""
    refused: int = 0
    """Refused for good with no dead letter to take them (or it failed too)."""

    @property
    def balanced(self) -> bool:
        return self.accepted == (
            self.delivered
            + self.dropped
            + self.failed
            + self.dead_lettered
            + self.refused
            + self.queued
        )

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "accepted": self.accepted,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "failed": self.failed,
        }
        # Shown when not 0, as in the gateway's ledger.
        if self.dead_lettered:
            out["dead_letter"] = self.dead_lettered
        if self.refused:
            out["refused"] = self.refused
        out["abandoned" if self.queued else "queued"] = self.queued
        return out


@dataclass(slots=True, eq=False)
class QueuedSinkCounters:
    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    refused: int = 0
    in_flight: int = 0
    batches: int = 0
    errors: int = 0
    retries: int = 0
    batch_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)


class QueuedSink:
    """One destination of a fan-out: its queue of batches, its sink, its pump, and where
    what the sink refuses for good goes (``dead_letter``: a sink, or a path for a file sink;
    None: dropped and counted ``refused``)."""

    def __init__(
        self,
        sink: Sink,
        *,
        capacity: int = 10_000,
        policy: OverflowPolicy = "block",
        retry: RetryPolicy | None = None,
        routes: Collection[str] | None = None,
        dead_letter: Sink | str | None = None,
    ) -> None:
        self.sink = sink
        self.dead_letter = None if dead_letter is None else DeadLetter(dead_letter)
        self.routes = frozenset(routes) if routes is not None else None
        """The routes this sink takes (see :class:`FanOutSink`); None: every message."""
        self.queue: RingBuffer[Batch] = RingBuffer(
            capacity, policy=policy, max_bytes=capacity, size_of=len
        )
        self.retry = retry or RetryPolicy()
        self.counters = QueuedSinkCounters()
        self.problem: Exception | None = None
        """Why the sink's last attempt failed; None while it works."""
        self.lost: SinkUnavailable | None = None
        self._done = trio.Event()

    @property
    def ledger(self) -> SinkLedger:
        c = self.counters
        queued = self.queue.statistics().bytes + c.in_flight
        dropped = c.accepted - c.delivered - c.failed - c.dead_lettered - c.refused - queued
        return SinkLedger(
            self.sink.name,
            c.accepted,
            c.delivered,
            dropped,
            c.failed,
            queued,
            dead_lettered=c.dead_lettered,
            refused=c.refused,
        )

    async def offer(self, batch: Batch) -> None:
        """Queue ``batch`` for this sink (under ``block``, wait for room). With room (or a
        drop policy) this does not yield: the gateway's pump goes on to its next batch, and
        the branch later takes every batch queued meanwhile at once."""
        self.counters.accepted += len(batch)
        if not self.queue.put_nowait(batch) and self.queue.policy == "block":
            await self.queue.put(batch)

    async def run(self) -> None:
        """Send batches until the queue is closed and drained (or cancelled: the rest is
        abandoned, counted by :attr:`ledger`)."""
        counters = self.counters
        try:
            while True:
                try:
                    batches = await self.queue.get_batch(_BATCHES_PER_WAKE)
                except trio.EndOfChannel:
                    break
                counters.in_flight = sum(map(len, batches))
                for batch in batches:
                    await self._send(batch)
                    counters.in_flight -= len(batch)
        except SinkUnavailable as exc:
            # Gone for good: this sink's messages are abandoned, the others go on.
            self.lost = exc
            _log.error("%s; its branch stops (what it holds is abandoned)", exc)
            self.queue.close()
        finally:
            self._done.set()

    async def _send(self, batch: Batch) -> None:
        """Send ``batch`` under the retry policy and count where each message went."""
        counters = self.counters
        try:
            seconds = await send_with_retry(
                functools.partial(self.sink.send, batch),
                self.retry,
                sink=self.sink.name,
                log=_errors,
                failed=self._failed,
                final=(SinkRefused,),
            )
        except SinkRefused as exc:
            # Delivered but for a part refused for good: not retried (it cannot succeed).
            self.problem = None
            counters.batches += 1
            counters.delivered += len(batch) - len(exc.indices)
            await self._set_aside(batch, exc.indices, exc.reason)
            return
        if seconds is None:
            if self.dead_letter is not None:
                await self._set_aside(batch, range(len(batch)), "retries spent")
            else:
                counters.failed += len(batch)
            return
        self.problem = None
        counters.batches += 1
        counters.batch_seconds.observe(seconds)
        counters.delivered += len(batch)

    async def _set_aside(self, batch: Batch, indices: Sequence[int], reason: str) -> None:
        if await set_aside(self.dead_letter, batch, indices, reason, sink=self.sink.name):
            self.counters.dead_lettered += len(indices)
        else:
            self.counters.refused += len(indices)

    def _failed(self, problem: SinkError, retrying: bool) -> None:
        self.counters.errors += 1
        if retrying:
            self.counters.retries += 1
        self.problem = problem

    async def wait_done(self) -> None:
        await self._done.wait()


def message_route(route: str, payload: bytes, origin: Origin) -> str | None:
    """A message's route: its origin's peer (``"$peer"``) or a field of its payload as a
    JSON object (a processor sets it: ``record["route"] = "alerts"``); None without one."""
    if route == "$peer":
        return origin.peer
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    value = document.get(route) if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


class FanOutSink(Sink):
    """Sends every batch to each of ``sinks``, each through its own :class:`QueuedSink`.

    Use it as the gateway's sink *and* one of its services (the branches' tasks run there)::

        fanout = FanOutSink([SqliteSink("a.db"), HttpSink("http://collector/ingest")])
        gateway = Gateway(sources=[...], sink=fanout, services=[fanout])

    ``capacity`` (messages) and ``policy`` apply to every branch queue unless ``branches``
    are given ready-made. Routing: with ``route`` (a JSON field of the payload, or
    ``"$peer"``), a sink whose :attr:`QueuedSink.routes` are set gets only the messages whose
    route is one of them; a sink without routes gets every message. ``send`` returns once
    the batch is queued for every sink: the gateway's ledger counts it delivered to the
    fan-out, each branch's ledger (:attr:`ledgers`) where it went from there (and
    :attr:`unrouted` the messages no sink took).
    """

    def __init__(
        self,
        sinks: Sequence[Sink] = (),
        *,
        capacity: int = 10_000,
        policy: OverflowPolicy = "block",
        retry: RetryPolicy | None = None,
        branches: Sequence[QueuedSink] = (),
        route: str | None = None,
    ) -> None:
        self.branches = tuple(branches) + tuple(
            QueuedSink(sink, capacity=capacity, policy=policy, retry=retry) for sink in sinks
        )
        if not self.branches:
            raise ConfigurationError("sinks", "a fan-out needs at least one sink")
        names = [b.sink.name for b in self.branches]
        if len(set(names)) != len(names):
            raise ConfigurationError("sinks", f"the same sink twice: {', '.join(names)}")
        self.name = "fanout(" + ", ".join(names) + ")"
        self.route = route
        if route is None and any(b.routes is not None for b in self.branches):
            raise ConfigurationError("route", "sinks with routes need the pipeline's route")
        self.unrouted = 0
        """Messages whose route no sink takes (counted, not delivered anywhere)."""
        self._running = False
        self._branches_scope: trio.CancelScope | None = None

    @property
    def ledgers(self) -> dict[str, SinkLedger]:
        return {b.sink.name: b.ledger for b in self.branches}

    # -- as a service: the branches' tasks ---------------------------------------------------

    async def run(self, gateway: Gateway, *, task_status: trio.TaskStatus[Any]) -> None:
        """Run every branch's pump until the queues close and drain, or cancellation."""
        async with trio.open_nursery() as nursery:
            self._branches_scope = nursery.cancel_scope
            for branch in self.branches:
                nursery.start_soon(branch.run)
            self._running = True
            task_status.started()
            # The nursery waits for the branches: they end once aclose() closed their queues
            # and they drained them, or when the gateway cancels its services.

    # -- as the gateway's sink ---------------------------------------------------------------

    async def open(self) -> None:
        """Open every sink (concurrently); the first that cannot is the fan-out's failure."""
        failures: list[SinkUnavailable] = []

        async def open_one(sink: Sink) -> None:
            try:
                await sink.open()
            except SinkUnavailable as exc:
                failures.append(exc)
            except Exception as exc:
                failures.append(SinkUnavailable(sink.name, str(exc) or repr(exc)))

        async with trio.open_nursery() as nursery:
            for branch in self.branches:
                nursery.start_soon(open_one, branch.sink)
                if branch.dead_letter is not None:
                    nursery.start_soon(open_one, branch.dead_letter.sink)
        if failures:
            raise failures[0]

    async def send(self, batch: Batch) -> None:
        if not self._running:
            raise SinkUnavailable(
                self.name, "its branches are not running: pass it in the gateway's services"
            )
        live = [b for b in self.branches if b.lost is None]
        if not live:
            raise SinkUnavailable(self.name, "every sink is gone")
        if self.route is None:
            for branch in live:
                await branch.offer(batch)
            return
        routes = [message_route(self.route, payload, origin) for payload, origin in batch]
        takers = [b.routes for b in self.branches if b.routes is not None]
        if not any(b.routes is None for b in self.branches):
            self.unrouted += sum(1 for r in routes if not any(r in t for t in takers))
        for branch in live:
            if branch.routes is None:
                await branch.offer(batch)
                continue
            wanted = branch.routes
            part = Batch.of([m for m, r in zip(batch, routes, strict=True) if r in wanted])
            if part:
                await branch.offer(part)

    async def aclose(self) -> None:
        """Close the branch queues, wait for each branch to drain (the caller bounds this),
        then close every sink."""
        for branch in self.branches:
            branch.queue.close()
        try:
            if self._running:
                for branch in self.branches:
                    await branch.wait_done()
        finally:
            with trio.CancelScope(shield=True):
                if self._running and self._branches_scope is not None:
                    # Cut short (the drain deadline): stop the branches before their sinks
                    # close under them; what they hold is abandoned.
                    self._branches_scope.cancel()
                    for branch in self.branches:
                        await branch.wait_done()
                for branch in self.branches:
                    closing = [branch.sink]
                    if branch.dead_letter is not None:
                        closing.append(branch.dead_letter.sink)
                    for sink in closing:
                        try:
                            await sink.aclose()
                        except Exception as exc:
                            _log.error("sink %s failed to close: %r", sink.name, exc)
