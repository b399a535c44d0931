"""The pump: queue -> processor chain -> sink, in batches (what :class:`~._gateway.Gateway` runs).

A mixin of :class:`~._gateway.Gateway`, kept in a room of its own: the gateway owns the
nursery, the sources and the shutdown sequence; this is the loop that moves each batch and
the bookkeeping of what became of every message (delivered, refused for good and
dead-lettered, failed, filtered, abandoned). The attributes it uses are the gateway's,
declared below.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import trio

from ._budget import MemoryBudget
from ._buffer import MessageBuffer
from ._errors import SinkError, SinkRefused, SinkUnavailable
from ._ledger import PumpCounters
from ._log import RateLimitedLogger, logger
from ._message import Batch, Message, Origin
from ._retry import RetryPolicy, send_with_retry
from .queues import DiskQueue, Queue
from .sinks._base import Sink
from .sinks._deadletter import DeadLetter, set_aside

__all__ = ("Processor", "Pump")

_log = logger.getChild("gateway")
_processor_errors = RateLimitedLogger(_log)
_sink_errors = RateLimitedLogger(_log)
_PROCESS_SLICE = 0.02
"""Seconds a synchronous processor may run before the pump yields (a checkpoint, where the
drain deadline can land and the sources can run)."""

ProcessorResult: TypeAlias = "bytes | Message | None"
Processor: TypeAlias = Callable[[Message], "ProcessorResult | Awaitable[ProcessorResult]"]
"""A user function called once per message: return the (new) payload or Message to pass it on,
``None`` to filter it out; raising counts the message as failed. Sync or ``async def``."""


class Pump:
    """The gateway's pump (see the module docstring); :class:`~._gateway.Gateway` sets these."""

    queue: Queue[bytes]
    buffer: MessageBuffer
    budget: MemoryBudget
    batch_size: int
    processor: Processor | None
    sink: Sink
    retry: RetryPolicy
    dead_letter: DeadLetter | None
    pump_counters: PumpCounters
    sink_problem: SinkError | None
    _pump_scope: trio.CancelScope
    _in_flight: int
    _kept_in_flight: int
    _kept: list[int]
    _refused: SinkRefused | None
    _sink_lost: SinkUnavailable | None

    abort: Callable[[], None]
    _close_sink: Callable[[], Awaitable[None]]

    async def _pump(self, done: trio.Event) -> None:
        """Queue -> processor -> sink, in batches, until the queue ends or the drain deadline."""
        counters = self.pump_counters
        budget = self.budget
        buffer = self.buffer
        held = 0  # the batch in hand, charged to the memory budget
        try:
            with self._pump_scope:
                while True:
                    try:
                        batch, held = await self._take_batch()
                    except trio.EndOfChannel:
                        break
                    budget.charge(held)
                    self._in_flight = len(batch)
                    failed: list[int] = []  # indices in the batch of what was not delivered
                    items = batch if self.processor is None else await self._process(batch, failed)
                    self._in_flight = len(items)
                    if items:
                        if await self._send(items):
                            refused, self._refused = self._refused, None
                            counters.delivered += len(items)
                            if refused is not None:
                                counters.delivered -= len(refused.indices)
                                await self._dead_letter(items, refused.indices, refused.reason)
                                failed += self._batch_indices(refused.indices)
                        else:
                            if self.dead_letter is not None:
                                await self._dead_letter(items, range(len(items)), "retries spent")
                            else:
                                counters.sink_failed += len(items)
                            failed += self._batch_indices(range(len(items)))
                    self._in_flight = 0
                    budget.release(held)
                    held = 0
                    buffer.settle(failed)
        except SinkUnavailable as exc:
            # Gone for good (a closed pipe): retrying cannot help, and neither can a drain.
            self._sink_lost = exc
            _log.error("%s; stopping (what is queued is abandoned)", exc)
            self.abort()
        finally:
            budget.release(held)
            if isinstance(self.queue, DiskQueue):
                self._kept_in_flight = self._in_flight  # not settled: still on disk
            else:
                counters.abandoned += self._in_flight
            self._in_flight = 0
            await self._close_sink()
            done.set()

    async def _take_batch(self) -> tuple[Batch, int]:
        """Wait for messages and take a batch, with its payload bytes.

        ``batch_size`` messages, or fewer when they are large: the batch in hand takes at most
        half of the budget's held pool, leaving the rest to the connections. A byte-bounded
        queue says what a batch weighs (its byte count before and after), so the payloads are
        not summed again here. The discipline is :meth:`MessageBuffer.get_batch`'s.
        """
        queue = self.queue
        by_bytes = queue.max_bytes is not None  # else a queue's statistics hold no bytes
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            n = self.batch_size
            if by_bytes:
                stats = queue.statistics()
                limit = self.budget.pool // 2
                if stats.bytes > limit and stats.depth:
                    n = max(1, min(n, limit * stats.depth // stats.bytes))
            try:
                batch = self.buffer.get_batch_nowait(n)
            except trio.WouldBlock:
                await queue.wait_not_empty()
                waited = True
                continue
            held = stats.bytes - queue.statistics().bytes if by_bytes else batch.nbytes
            if not waited:
                # The wait was the checkpoint: a second one is a scheduler pass per batch,
                # and at a relay's rates nearly every batch comes after a wait.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return batch, held

    async def _dead_letter(self, batch: Batch, indices: Sequence[int], reason: str) -> None:
        """Hand the messages of ``batch`` at ``indices`` to the dead letter, and count them."""
        if await set_aside(self.dead_letter, batch, indices, reason, sink=self.sink.name):
            self.pump_counters.dead_lettered += len(indices)
        else:
            self.pump_counters.refused += len(indices)

    def _batch_indices(self, indices: Sequence[int]) -> list[int]:
        """Indices in the processor's output -> in the batch taken from the queue."""
        if self.processor is None:
            return list(indices)
        return [self._kept[i] for i in indices]

    async def _process(self, batch: Batch, failed: list[int]) -> Batch:
        """Run the processor over ``batch``; the indices of the messages it raised on (or
        answered wrongly) are appended to ``failed``."""
        processor = self.processor
        assert processor is not None
        counters = self.pump_counters
        payloads: list[bytes] = []
        runs: list[tuple[Origin, int]] = []

        def out(payload: bytes, origin: Origin) -> None:
            payloads.append(payload)
            if runs and runs[-1][0] is origin:
                runs[-1] = (origin, runs[-1][1] + 1)
            else:
                runs.append((origin, 1))

        is_async = inspect.iscoroutinefunction(processor)
        clock = time.monotonic
        yield_at = clock() + _PROCESS_SLICE
        remaining = len(batch)
        kept: list[int] = []
        self._kept = kept
        for index, message in enumerate(batch):
            # Where the pump can be cancelled (an await), what is in flight is what is not
            # processed yet plus what came out of the processor.
            if clock() >= yield_at:
                self._in_flight = remaining + len(payloads)
                await trio.lowlevel.checkpoint()  # a slow sync processor: the deadline lands
                yield_at = clock() + _PROCESS_SLICE
            remaining -= 1
            try:
                result = processor(message)
                if is_async or inspect.isawaitable(result):
                    self._in_flight = remaining + 1 + len(payloads)
                    result = await result  # type: ignore[misc]
            except Exception as exc:
                counters.failed[type(exc).__name__] += 1
                failed.append(index)
                _processor_errors.warning("processor failed on a message: %r", exc)
                continue
            if result is None:
                counters.filtered += 1
            elif isinstance(result, Message):
                out(result.payload, result.origin)
                kept.append(index)
            elif isinstance(result, bytes | bytearray | memoryview):
                out(bytes(result), message.origin)
                kept.append(index)
            else:
                counters.failed["TypeError"] += 1
                failed.append(index)
                _processor_errors.warning(
                    "processor returned %s; expected bytes, Message or None", type(result).__name__
                )
        return Batch(payloads, runs)

    async def _send(self, items: Batch) -> bool:
        """Send ``items`` under the retry policy: True once delivered (a part refused for good
        is left in ``_refused`` for the pump to route, not retried), False once the retries
        are spent. :class:`SinkUnavailable` propagates (the destination is gone)."""
        counters = self.pump_counters
        try:
            seconds = await send_with_retry(
                functools.partial(self.sink.send, items),
                self.retry,
                sink=self.sink.name,
                log=_sink_errors,
                failed=self._sink_failed,
                final=(SinkRefused,),
            )
        except SinkRefused as exc:
            self._refused = exc
            self.sink_problem = None
            counters.sink_batches += 1
            return True
        if seconds is None:
            return False
        self.sink_problem = None
        counters.sink_batches += 1
        counters.batch_seconds.observe(seconds)
        return True

    def _sink_failed(self, problem: SinkError, retrying: bool) -> None:
        self.pump_counters.sink_errors += 1
        if retrying:
            self.pump_counters.sink_retries += 1
        self.sink_problem = problem
