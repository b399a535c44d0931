"""The Gateway: one root nursery that owns the sources, the pump, and the shutdown sequence."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import trio

from ._budget import DEFAULT_MAX_MEMORY, MemoryBudget
from ._buffer import MessageBuffer
from ._errors import ConfigurationError, SinkError, SinkRefused, SinkUnavailable
from ._ingress import ACK_MODES, Ingress
from ._ledger import Ledger, PumpCounters, SourceCounters
from ._log import logger
from ._pump import Processor, Pump
from ._retry import RetryPolicy
from ._signals import watch_signals
from .queues import DiskQueue, Queue, RingBuffer
from .sinks._base import Sink
from .sinks._deadletter import DeadLetter
from .sources._base import Source

__all__ = ("Gateway", "Processor", "RetryPolicy", "Service")

_log = logger.getChild("gateway")

State = Literal["created", "starting", "running", "draining", "stopped"]


def _queue_share(queue: Queue[bytes] | None) -> int | None:
    """What the queue may hold in memory, for the budget: a disk queue's ``max_bytes`` is on
    disk, so its share is what waits in memory for the writer (``memory_bytes``)."""
    if queue is None:
        return None
    if isinstance(queue, DiskQueue):
        return queue.memory_bytes
    return queue.max_bytes


class Service(Protocol):
    """Something that runs beside the sources for the gateway's whole life (the admin endpoint).

    ``run`` is started in the gateway's root nursery before any source, must call
    ``task_status.started(value)`` once it serves, and is cancelled after the shutdown ledger is
    final (so ``/readyz`` can answer 503 during the drain).
    """

    async def run(self, gateway: Gateway, *, task_status: trio.TaskStatus[Any]) -> None: ...


class Gateway(Pump):
    """Sources -> bounded queue -> optional processor -> sink, supervised by one nursery.

    Use it as a library inside your own Trio program::

        gateway = Gateway(sources=[TcpSource(port=7000)], sink=FileSink("out.jsonl"))
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(gateway.run)   # each source's bound addresses
            ...
            gateway.shutdown()                          # or cancel the nursery
        print(gateway.ledger)

    :meth:`run` returns the shutdown :class:`Ledger` after a :meth:`shutdown`. If the scope
    around it is cancelled instead, it still flushes (shielded, bounded by ``drain_timeout``)
    before the cancellation propagates; the ledger is then in :attr:`ledger`.

    Before any source starts, :meth:`run` opens the sink (:meth:`Sink.open`, which checks that
    the destination can work). If it cannot, ``run`` raises :class:`SinkUnavailable` naming
    the cause, at once, or after waiting up to ``sink_wait`` seconds for the destination to
    appear (services such as the admin endpoint run meanwhile, and :attr:`readiness` says what
    the gateway waits for). A sink that is lost for good while running (it raises
    :class:`SinkUnavailable` from ``send``: a closed pipe) stops the gateway at once; ``run``
    then raises that error after the ledger is final.

    ``max_memory`` is the gateway's memory budget (:mod:`trio_gateway._budget`): half of it
    bounds the default queue's payload bytes (``max_bytes``), the rest what connections hold
    before their messages are queued and the batch the sink has in hand.
    """

    def __init__(
        self,
        *,
        sources: Sequence[Source],
        sink: Sink,
        queue: Queue[bytes] | None = None,
        processor: Processor | None = None,
        batch_size: int = 1024,
        drain_timeout: float = 10.0,
        grace_period: float = 2.0,
        retry: RetryPolicy | None = None,
        handle_signals: bool = False,
        services: Sequence[Service] = (),
        sink_wait: float = 0.0,
        max_memory: int = DEFAULT_MAX_MEMORY,
        dead_letter: Sink | str | None = None,
        ack: str | Mapping[Source, str] = "queued",
    ) -> None:
        if not sources:
            raise ConfigurationError("sources", "a gateway needs at least one source")
        if batch_size < 1:
            raise ConfigurationError("batch_size", "must be at least 1")
        if drain_timeout < 0:
            raise ConfigurationError("drain_timeout", "must not be negative")
        if grace_period < 0:
            raise ConfigurationError("grace_period", "must not be negative")
        if sink_wait < 0:
            raise ConfigurationError("sink_wait", "must not be negative")
        self.sources = tuple(sources)
        self.sink = sink
        self.budget = MemoryBudget(max_memory, queue_bytes=_queue_share(queue))
        """The memory budget every connection and the pump charge what they hold to."""
        self.queue: Queue[bytes] = (
            queue if queue is not None else RingBuffer(10_000, max_bytes=self.budget.queue_bytes)
        )
        max_bytes = self.queue.max_bytes
        for source in self.sources:
            self.budget.check_message_size(
                f"{source.transport}.max_message_size", source.max_message_size
            )
            if max_bytes is not None and source.max_message_size > max_bytes:
                # Under block, such a message could never fit: its sender would wait forever.
                raise ConfigurationError(
                    f"{source.transport}.max_message_size",
                    f"{source.max_message_size} is larger than queue.max_bytes ({max_bytes})",
                )
        self.buffer = MessageBuffer(self.queue)
        self.processor = processor
        self.batch_size = batch_size
        self.drain_timeout = drain_timeout
        self.grace_period = grace_period
        self.retry = retry or RetryPolicy()
        self.handle_signals = handle_signals
        self.sink_wait = sink_wait
        self.acks = self._check_acks(ack)
        """What each source's answer to its sender means: ``queued`` or ``delivered``."""
        self.dead_letter = None if dead_letter is None else DeadLetter(dead_letter)
        """Where messages the sink refused for good go (a path means a file sink)."""
        self._refused: SinkRefused | None = None
        self._kept: list[int] = []  # the processor's output -> the batch's indices
        self.services = tuple(services)
        self.service_values: list[Any] = []
        """What each service reported through ``task_status.started`` (e.g. bound addresses)."""
        self.source_counters = tuple(SourceCounters(s.transport, s.label) for s in self.sources)
        self.pump_counters = PumpCounters()
        self.state: State = "created"
        self._stopping = trio.Event()
        self._pump_scope = trio.CancelScope(shield=True)
        self._sources_scope: trio.CancelScope | None = None
        self._in_flight = 0
        self._ingresses: list[Ingress] = []
        self._drain_deadline = math.inf
        """When what is read, queued or in the sink's hands is abandoned (set at shutdown)."""
        self._kept_in_flight = 0
        self._final_ledger: Ledger | None = None
        self._serving = False
        self.sink_problem: SinkError | None = None
        """Why the sink's last attempt (open or send) failed; None while it works."""
        self._sink_lost: SinkUnavailable | None = None

    def _check_acks(self, ack: str | Mapping[Source, str]) -> dict[Source, str]:
        acks = {s: ack if isinstance(ack, str) else ack.get(s, "queued") for s in self.sources}
        for source, mode in acks.items():
            if mode not in ACK_MODES:
                raise ConfigurationError(
                    f"{source.transport}.ack", f"must be one of {', '.join(ACK_MODES)}"
                )
            if mode == "delivered" and source.transport in ("tcp", "udp"):
                raise ConfigurationError(
                    f"{source.transport}.ack", "delivered needs a transport that answers"
                )
        return acks

    # -- control --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Start the cancellation-safe shutdown (idempotent; safe to call from any task).
        The grace period and the drain deadline count from this call, not from when the
        gateway's task next runs (the pump may be a message further on by then); called
        while the gateway starts, they count from the end of its start."""
        if self._serving and not self._stopping.is_set() and self._drain_deadline == math.inf:
            self._drain_deadline = trio.current_time() + self.grace_period + self.drain_timeout
        self._stopping.set()

    def abort(self) -> None:
        """Stop now: cut the grace period and the drain short (what is left is abandoned)."""
        self._stopping.set()
        self._drain_deadline = -math.inf
        self.queue.close()  # ends the connections' last waits for room (see Ingress.offer)
        if self._sources_scope is not None:
            self._sources_scope.cancel()
        self._pump_scope.cancel()

    def _stopped(self) -> bool:
        """True once the ledger is final (a signal then has nothing left to cut short)."""
        return self.state == "stopped"

    @property
    def accepting(self) -> bool:
        """True while running and not shutting down (what ``/readyz`` reports)."""
        return self.state == "running" and self._serving and not self._stopping.is_set()

    @property
    def readiness(self) -> str:
        """``"ready"``, or why the gateway is not (what ``/readyz`` answers with its 503)."""
        if self.accepting:
            return "ready"
        if self.state == "starting" and self.sink_problem is not None:
            return f"waiting for the sink: {self.sink_problem}"
        return self.state

    @property
    def ledger(self) -> Ledger:
        """Where every message went so far (final once :meth:`run` has finished)."""
        if self._final_ledger is not None:
            return self._final_ledger
        stats = self.queue.statistics()
        held = stats.depth + self._in_flight + self._kept_in_flight
        if isinstance(self.queue, DiskQueue):
            # On disk, what is queued or in flight is kept for the next start, not abandoned.
            return Ledger.compute(
                self.source_counters,
                self.pump_counters,
                stats.dropped,
                0,
                recovered=self.queue.recovered,
                kept=held,
            )
        return Ledger.compute(self.source_counters, self.pump_counters, stats.dropped, held)

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> Ledger:
        """Serve until :meth:`shutdown` (or cancellation), then flush; return the ledger."""
        if self.state != "created":
            raise RuntimeError("a Gateway runs once; create a new one")
        disk = self.queue if isinstance(self.queue, DiskQueue) else None
        if disk is None:
            return await self._run(task_status)
        # A disk queue is opened (what it holds comes back first) before anything binds, and
        # closed (what is left stays on disk) after the pump has finished.
        await disk.open()
        try:
            return await self._run(task_status)
        finally:
            with trio.CancelScope(shield=True):
                await disk.aclose()

    async def _run(self, task_status: trio.TaskStatus[Any]) -> Ledger:
        self.state = "starting"
        if not self.sink_wait:
            try:
                await self._open_sink()  # nothing runs yet: fail before anything binds
            except SinkUnavailable:
                self.state = "stopped"
                raise
        pump_done = trio.Event()
        async with trio.open_nursery() as root:
            try:
                for service in self.services:
                    self.service_values.append(await root.start(service.run, self))
                if self.handle_signals:
                    await root.start(
                        functools.partial(
                            watch_signals,
                            self._stopping,
                            self.shutdown,
                            self.abort,
                            log=_log,
                            stopped=self._stopped,
                        )
                    )
            except BaseException:
                if not self.sink_wait:  # opened above, and no pump to close it
                    await self._close_sink()
                raise
            if not self.sink_wait:
                root.start_soon(self._pump, pump_done)
            else:
                try:
                    opened = await self._wait_for_sink()
                except SinkUnavailable as exc:
                    self._sink_lost, opened = exc, False  # raised below, outside the nursery
                if opened:
                    root.start_soon(self._pump, pump_done)
                else:
                    # Given up (raised below), or shut down before ready: nothing was received.
                    self.state = "stopped"
                    if self._sink_lost is None:
                        task_status.started(tuple(() for _ in self.sources))
                    root.cancel_scope.cancel()
            if self.state == "starting":
                self.state = "running"
                try:
                    await self._serve_sources(task_status)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._finish(pump_done)
                    root.cancel_scope.cancel()
        if self._sink_lost is not None:
            raise self._sink_lost
        return self.ledger

    async def _open_sink(self) -> None:
        """``sink.open()``, any failure as a :class:`SinkUnavailable` naming the sink."""
        try:
            await self.sink.open()
        except SinkUnavailable as exc:
            self.pump_counters.sink_errors += 1  # sink_failed_total counts open failures too
            self.sink_problem = exc
            raise
        except Exception as exc:  # a sink that raised something else: name it all the same
            self.pump_counters.sink_errors += 1
            self.sink_problem = SinkUnavailable(self.sink.name, str(exc) or repr(exc))
            raise self.sink_problem from exc
        self.sink_problem = None
        if self.dead_letter is not None:
            try:
                await self.dead_letter.open()
            except Exception as exc:
                await self._close_sink()
                self.sink_problem = SinkUnavailable(
                    f"{self.dead_letter.name} (dead letter)", str(exc) or repr(exc)
                )
                raise self.sink_problem from exc

    async def _wait_for_sink(self) -> bool:
        """Open the sink, trying again with backoff for up to ``sink_wait`` seconds.

        True once it is open; False when :meth:`shutdown` came first; raises the last
        :class:`SinkUnavailable` (with how long it waited) when the time is up.
        """
        deadline = trio.current_time() + self.sink_wait
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            try:
                await self._open_sink()
            except SinkUnavailable as exc:
                if trio.current_time() >= deadline:
                    raise SinkUnavailable(
                        exc.sink, f"{exc.cause} (waited {self.sink_wait:g} s)"
                    ) from exc
                if attempt == 1:
                    _log.warning(
                        "%s; waiting up to %g s for it (/readyz answers 503 meanwhile)",
                        exc,
                        self.sink_wait,
                    )
                with trio.move_on_at(
                    min(deadline, trio.current_time() + self.retry.delay(attempt))
                ):
                    await self._stopping.wait()
            else:
                if attempt > 1:
                    _log.info("sink %s: open after %d attempts", self.sink.name, attempt)
                return True
        return False

    async def _serve_sources(self, task_status: trio.TaskStatus[Any]) -> None:
        bound: list[list[tuple[str, int]]] = []
        async with trio.open_nursery() as sources:
            self._sources_scope = sources.cancel_scope
            for source, counters in zip(self.sources, self.source_counters, strict=True):
                ingress = Ingress(
                    self.buffer,
                    counters,
                    self._stopping,
                    grace_period=self.grace_period,
                    budget=self.budget,
                    ack=self.acks[source],
                )
                self._ingresses.append(ingress)
                addresses = await sources.start(source.run, ingress)
                bound.append(list(addresses))
                # Name the listener by the port it got, so port-0 listeners stay distinct.
                counters.listener = source.label
            _log.info("gateway running: %s", ", ".join(s.label for s in self.sources))
            task_status.started(tuple(bound))
            self._serving = True
            await self._stopping.wait()
            self.state = "draining"
            _log.info("shutting down: listeners closing, %.1f s grace", self.grace_period)
            # What connections have read may wait for room until the drain deadline: it is
            # abandoned then, not when their grace period ends.
            if self._drain_deadline == math.inf:
                self._drain_deadline = trio.current_time() + self.grace_period + self.drain_timeout
            for ingress in self._ingresses:
                ingress.drain_deadline = self._drain_deadline
            # Each source closes its listeners and gives its connections the grace period;
            # the margin covers the time to cancel them.
            sources.cancel_scope.deadline = trio.current_time() + self.grace_period + 1.0

    async def _finish(self, pump_done: trio.Event) -> None:
        self._stopping.set()
        self.state = "draining"
        self.queue.close()
        deadline = min(trio.current_time() + self.drain_timeout, self._drain_deadline)
        with trio.move_on_at(deadline) as drain:
            await pump_done.wait()
        if drain.cancelled_caught:
            _log.warning("drain deadline (%.1f s) passed; abandoning the rest", self.drain_timeout)
            self._pump_scope.cancel()
            await pump_done.wait()
        self.state = "stopped"
        self._final_ledger = self.ledger
        # DEBUG: whoever runs the gateway shows the ledger (``serve`` prints it as one line).
        _log.debug("shutdown ledger: %s", self._final_ledger.to_json())

    async def _close_sink(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(max(self.drain_timeout, 1.0)):
            try:
                await self.sink.aclose()
            except Exception as exc:
                _log.error("sink %s failed to close: %r", self.sink.name, exc)
            if self.dead_letter is not None:
                try:
                    await self.dead_letter.aclose()
                except Exception as exc:
                    _log.error("dead letter %s failed to close: %r", self.dead_letter.name, exc)
