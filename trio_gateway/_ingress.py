"""The door between a source and the queue: what the gateway hands each listener."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import trio

from ._budget import MemoryBudget
from ._buffer import MessageBuffer
from ._ledger import SourceCounters
from ._message import Origin
from ._receipts import NOT_DELIVERED, Answer, Receipt
from .queues import Queue

__all__ = ("ACK_MODES", "NOT_DELIVERED", "Answer", "Ingress")

ACK_MODES = ("queued", "delivered")
"""What a source's answer to its sender means (``ack =``): see :class:`Ingress`."""


class Ingress:
    """One listener's handle on the gateway.

    A source calls one of the ``offer`` methods once per read with every payload that read
    produced and one shared :class:`Origin`; counting happens here, once per batch.

    * :meth:`offer_nowait`: never waits; what the queue's policy refuses is dropped and counted
      (UDP: the sender gets no answer anyway).
    * :meth:`offer`: under ``block`` waits for room, so the source stops reading and the
      transport's flow control pushes back on the sender (TCP, WebSocket, gRPC streams).
    * :meth:`offer_or_reject`: waits at most ``timeout`` for room; what is not accepted is
      *rejected* (counted as ``queue_full``) and the source tells its sender (HTTP 503, gRPC
      RESOURCE_EXHAUSTED, a negative ack). Under ``drop_oldest`` everything is accepted.

    ``ids`` (of :meth:`offer` and :meth:`offer_or_reject`) gives each payload its sender's id:
    each is then queued with its own copy of ``origin`` carrying the id (see
    :attr:`Origin.id`): an origin and a run per message, a cost only senders that give ids
    pay.

    ``ack`` says what an answer means. ``"queued"`` (the default): the messages are in the
    queue (on disk, with a disk queue). ``"delivered"``: :meth:`offer_or_reject` and
    :meth:`offer` return only once the sink has confirmed every message of the call (the pump
    settles each batch after its send), and return how many of them, from the first, were
    delivered before one failed for good (given up, refused by the destination, evicted by
    ``drop_oldest``, or a processor error): the source acknowledges that prefix and refuses
    the rest, which the sender can send again.
    """

    __slots__ = (
        "_queue",
        "_stopping",
        "ack",
        "budget",
        "counters",
        "drain_deadline",
        "grace_period",
    )

    def __init__(
        self,
        queue: MessageBuffer | Queue[bytes],
        counters: SourceCounters,
        stopping: trio.Event,
        *,
        grace_period: float,
        budget: MemoryBudget | None = None,
        ack: str = "queued",
    ) -> None:
        if ack not in ACK_MODES:
            raise ValueError(f"ack must be one of {', '.join(ACK_MODES)}, got {ack!r}")
        self.ack = ack
        # The gateway passes its one buffer; a source served on its own, outside a gateway
        # (trio_gateway.testing.serve_source), brings a bare queue, which gets its own buffer.
        self._queue = queue if isinstance(queue, MessageBuffer) else MessageBuffer(queue)
        self.budget = budget if budget is not None else MemoryBudget(1 << 62)
        """The gateway's memory budget: each connection charges what it holds to its share
        (``with ingress.budget.connection() as share``). Outside a gateway: no limit."""
        self.drain_deadline = -math.inf
        """Until when (``trio.current_time()``) messages already read may still wait for room
        after their connection was cancelled at shutdown; set by the gateway when it stops."""
        self._stopping = stopping
        self.counters = counters
        self.grace_period = grace_period

    @property
    def transport(self) -> str:
        return self.counters.transport

    @property
    def listener(self) -> str:
        return self.counters.listener

    # -- messages -------------------------------------------------------------------------

    @property
    def buffer(self) -> MessageBuffer:
        """The queue (with origins) this ingress feeds."""
        return self._queue

    def _count(self, payloads: Sequence[bytes], nbytes: int | None) -> None:
        counters = self.counters
        counters.received += len(payloads)
        counters.received_bytes += sum(map(len, payloads)) if nbytes is None else nbytes

    def offer_nowait(self, payloads: Sequence[bytes], origin: Origin) -> int:
        """Enqueue without waiting; returns how many are queued.

        Under ``drop_newest`` / ``drop_oldest`` the queue drops (and counts) what does not fit.
        ``block`` never drops, so what does not fit now is refused here: counted as rejected
        ``queue_full`` and not as received, as :meth:`offer_or_reject` does.
        """
        if not payloads:
            return 0
        self._count(payloads, None)
        try:
            done = self._queue.put_many_nowait(payloads, origin)
        except trio.ClosedResourceError:
            self.counters.abandoned += len(payloads)
            return 0
        if done < len(payloads) and self._queue.policy == "block":
            refused = payloads[done:]
            counters = self.counters
            counters.received -= len(refused)
            counters.received_bytes -= sum(map(len, refused))
            counters.rejected["queue_full"] += len(refused)
        return done

    def offer_one_nowait(self, payload: bytes, origin: Origin) -> bool:
        """Queue one message if the queue takes it now, without its policy dropping anything
        new; False, with nothing counted or changed, if not (the caller then takes the
        waiting way, :meth:`offer_or_reject`, which answers its sender)."""
        if self._queue.durable or self.ack == "delivered":
            return False  # its answer waits (disk, delivery): offer_or_reject does that
        try:
            if not self._queue.put_many_nowait((payload,), origin, drop=False):
                return False
        except trio.ClosedResourceError:
            return False
        counters = self.counters
        counters.received += 1
        counters.received_bytes += len(payload)
        return True

    async def offer(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        *,
        nbytes: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> int:
        """Enqueue, waiting for room under ``block``. Returns how many are queued.

        ``nbytes``, when the caller knows it (a decoder's ``payload_bytes``), saves summing the
        payload lengths for the byte counter.

        Only waits when the queue is full, so a source that keeps up costs no checkpoint here.
        Cancelled while waiting at shutdown (the connection's grace period is over), it goes
        on waiting, shielded, until :attr:`drain_deadline`: what was read is abandoned only
        when the drain deadline passes. The messages still not queued then (or at any other
        cancellation) are counted as abandoned, and the cancellation goes on.
        """
        done, receipt = await self._queue_waiting(payloads, origin, nbytes, ids)
        if receipt is None:
            return done
        receipts = self._queue.receipts
        receipts.close(receipt)
        return await Answer(done, receipts, receipt).wait()

    async def offer_later(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        *,
        nbytes: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> Answer:
        """:meth:`offer` without waiting for the answer: queues (waiting for room as
        :meth:`offer` does) and returns the :class:`Answer` to wait for, which waits for
        delivery (``ack = "delivered"``) or for the commit (a disk queue). A source that
        answers per read keeps reading meanwhile, several answers in flight (WebSocket)."""
        done, receipt = await self._queue_waiting(payloads, origin, nbytes, ids)
        return self._answer(done, receipt)

    def _receipt(self) -> Receipt | None:
        """An open receipt for an offer's positions when its answer waits for their delivery
        (``ack = "delivered"``): opened before the first put, so that what fails while the
        offer waits for room to put the rest is recorded."""
        return self._queue.receipts.open() if self.ack == "delivered" else None

    def _answer(self, done: int, receipt: Receipt | None) -> Answer:
        """The answer to an offer that put all it will (``receipt`` is closed here)."""
        buffer = self._queue
        if receipt is not None:
            buffer.receipts.close(receipt)
            if receipt.ranges:
                return Answer(done, buffer.receipts, receipt)
        mark = buffer.stored_mark
        if done and mark is not None:
            return Answer(done, buffer.receipts, stored=partial(buffer.wait_stored, mark))
        return Answer(done, buffer.receipts)

    async def _queue_waiting(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        nbytes: int | None,
        ids: Sequence[str] | None,
    ) -> tuple[int, Receipt | None]:
        """:meth:`offer` up to its answer: how many are queued, and the open receipt of their
        positions when the answer waits for their delivery (for :meth:`_answer`)."""
        done = 0
        if not payloads:
            return done, None
        self._count(payloads, nbytes)
        buffer = self._queue
        receipt = self._receipt()
        try:
            done = self._put(payloads, origin, True, receipt, ids)
            if done < len(payloads) and buffer.policy == "block":
                while done < len(payloads):
                    await buffer.queue.wait_not_full()
                    done += self._put(payloads[done:], origin, True, receipt, ids, done)
        except trio.ClosedResourceError:
            self.counters.abandoned += len(payloads) - done
        except BaseException as exc:
            if receipt is not None:
                buffer.receipts.forget(receipt)  # no answer: the offer raises
            if isinstance(exc, trio.Cancelled) and self._stopping.is_set():
                done += await self._wait_until_drain_deadline(payloads, done, origin, ids)
            self.counters.abandoned += len(payloads) - done
            raise
        return done, receipt

    def _put(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        drop: bool,
        receipt: Receipt | None,
        ids: Sequence[str] | None = None,
        first: int = 0,
    ) -> int:
        """``put_many_nowait``, noting the positions taken in ``receipt`` when the answer
        waits for them.

        ``payloads`` are the offer's from its ``first``, whose id is ``ids[first]``."""
        buffer = self._queue
        done = _put_many(buffer, payloads, origin, ids, first, drop)
        if receipt is not None:
            if done < len(payloads) and buffer.policy == "drop_oldest":
                receipt.lost(len(payloads) - done)  # its head made room for its tail
            if done:
                end = buffer.end_position
                receipt.add(end - done, end)
        return done

    async def _wait_until_drain_deadline(
        self, payloads: Sequence[bytes], first: int, origin: Origin, ids: Sequence[str] | None
    ) -> int:
        """Queue what was read from ``payloads[first]`` on (block policy) while the pump
        drains; how many got in."""
        buffer = self._queue
        done = first
        with trio.CancelScope(deadline=self.drain_deadline, shield=True):
            try:
                while done < len(payloads):
                    await buffer.queue.wait_not_full()
                    done += _put_many(buffer, payloads[done:], origin, ids, done, True)
            except trio.ClosedResourceError:
                pass  # the gateway stopped at once (abort): the rest is abandoned
        return done - first

    async def offer_or_reject(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        *,
        timeout: float = 0.0,  # noqa: ASYNC109 - a policy bound on waiting for room, not a deadline
        ids: Sequence[str] | None = None,
    ) -> int:
        """Enqueue what fits within ``timeout``; the rest is rejected as ``queue_full``.

        Returns how many were accepted; the caller answers its sender accordingly. With a
        disk queue it returns once they are on disk (committed as its ``fsync`` policy says),
        so an answer sent then means "on disk".
        """
        answer = await self.offer_or_reject_later(payloads, origin, timeout=timeout, ids=ids)
        return await answer.wait()

    async def offer_or_reject_later(
        self,
        payloads: Sequence[bytes],
        origin: Origin,
        *,
        timeout: float = 0.0,  # noqa: ASYNC109 - a policy bound on waiting for room, not a deadline
        ids: Sequence[str] | None = None,
    ) -> Answer:
        """:meth:`offer_or_reject` without waiting for the answer (see :meth:`offer_later`)."""
        buffer = self._queue
        done = 0
        if not payloads:
            return self._answer(done, None)
        receipt = self._receipt()
        try:
            done = self._put(payloads, origin, False, receipt, ids)
            if done < len(payloads) and buffer.policy == "drop_oldest":
                # A batch longer than the queue: the queue took all of it and dropped its head
                # as the oldest (counted there), so all of it was received, none refused.
                done = len(payloads)
            elif done < len(payloads) and timeout > 0 and buffer.policy == "block":
                with trio.move_on_after(timeout):
                    while done < len(payloads):
                        await buffer.queue.wait_not_full()
                        done += self._put(payloads[done:], origin, False, receipt, ids, done)
        except trio.ClosedResourceError:
            pass
        except BaseException:
            if receipt is not None:
                buffer.receipts.forget(receipt)  # no answer: the offer raises
            raise
        finally:
            counters = self.counters
            counters.received += done
            counters.received_bytes += sum(map(len, payloads[:done]))
            if done < len(payloads):
                counters.rejected["queue_full"] += len(payloads) - done
        return self._answer(done, receipt)

    def reject(self, reason: str, count: int = 1) -> None:
        """Count ``count`` messages (or connections) refused for ``reason``.

        The reasons of the built-in sources, and what each sender sees, are listed in one
        place: docs/reference.md, "Rejection reasons" (``oversize``, ``malformed``,
        ``too_slow``, ``over_budget``, ``rapid_reset``, ``evicted``, ``internal_error``, ...).
        """
        self.counters.rejected[reason] += count

    # -- connections ----------------------------------------------------------------------

    def connection_opened(self) -> None:
        self.counters.connections_active += 1
        self.counters.connections_total += 1

    def connection_closed(self) -> None:
        self.counters.connections_active -= 1

    # -- shutdown -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True from the moment the gateway starts shutting down."""
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        """Return when the gateway starts shutting down (listeners should close then)."""
        await self._stopping.wait()


def _put_many(
    buffer: MessageBuffer,
    payloads: Sequence[bytes],
    origin: Origin,
    ids: Sequence[str] | None,
    first: int,
    drop: bool,
) -> int:
    """``buffer.put_many_nowait``; with ``ids``, each payload with its own origin carrying
    ``ids[first + i]``."""
    if ids is None:
        return buffer.put_many_nowait(payloads, origin, drop=drop)
    where = (origin.transport, origin.listener, origin.peer, origin.received_at)
    origins = [Origin(*where, message_id) for message_id in ids[first : first + len(payloads)]]
    return buffer.put_each_nowait(payloads, origins, drop=drop)
