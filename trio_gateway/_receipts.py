"""Delivery receipts: how a source learns that the sink confirmed its messages.

Every message that enters the queue gets a *position* (0, 1, 2 ... in queue order). The pump
takes batches from the head and settles each one after the sink has answered for it, in
order, so "everything before position p is settled" is one number that only grows. A source
that answers its sender only after delivery (``ack = "delivered"``) takes a :class:`Receipt`
for the positions its messages got and waits on it; the pump's settle of one batch wakes
every receipt that batch completes: many clients share one sink confirmation (group commit).

Failures are recorded as position ranges: a batch the sink gave up on, messages it refused
for good, messages the processor raised on, and messages ``drop_oldest`` evicted from the
head. A receipt reports how many of its messages, from the first, were delivered before the
first that failed: the prefix a source can acknowledge (a bidi stream's positive acks, an
NDJSON batch's ``accepted``); the sender sends the rest again. Nothing is recorded while no receipt
is waiting, so a gateway without ``ack = "delivered"`` pays a counter update per put.

An offer that puts part of a read, then waits for room (``block``) holds an *open* receipt from
before its first put (:meth:`Receipts.open`): failures are recorded while its first messages
are settled during that wait, and it is resolved only once the offer has put the last one
(:meth:`Receipts.close`).
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable, Iterable

import trio

__all__ = ("NOT_DELIVERED", "Answer", "Receipt", "Receipts")


class Receipt:
    """The positions of one answer's messages (in the order the sender sent them), and,
    once settled, how many of them from the first were delivered before one failed."""

    __slots__ = ("delivered", "done", "end", "forgotten", "limit", "open", "ranges")

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.end = max((end for _, end in ranges), default=0)
        self.delivered = sum(end - start for start, end in ranges)
        self.done = trio.Event()
        self.open = False
        """Its offer is still putting messages: not resolved before :meth:`Receipts.close`."""
        self.forgotten = False
        """Its waiter is gone: never resolved (:meth:`Receipts.forget`)."""
        self.limit: int | None = None
        """How many of its messages, from the first, were queued before one was never queued."""

    def add(self, start: int, end: int) -> None:
        """The offer put its next messages at positions ``start`` to ``end``."""
        self.ranges.append((start, end))
        self.end = max(self.end, end)
        self.delivered += end - start

    def lost(self, count: int) -> None:
        """``count`` messages of the offer, before those it adds next, were never queued (a
        batch longer than a ``drop_oldest`` queue drops its own head): none from here on may
        be acknowledged."""
        if count > 0 and self.limit is None:
            self.limit = sum(end - start for start, end in self.ranges)

    def resolve(self, failed: list[tuple[int, int]]) -> None:
        offset = 0
        for start, end in self.ranges:
            for f_start, f_end in failed:
                if f_start < end and f_end > start:
                    self.delivered = min(self.delivered, offset + max(f_start, start) - start)
            offset += end - start
        if self.limit is not None:
            self.delivered = min(self.delivered, self.limit)
        self.done.set()


class Receipts:
    """The positions of a queue: where its head is, what is settled, what failed.

    Closed receipts wait in a heap by their end, so a settle resolves those it completes
    without looking at the others (many reads of many connections may be in flight); a
    receipt forgotten is dropped when its end comes. Failures are recorded only while a
    receipt waits or is open, and kept only as long as one may need them."""

    __slots__ = ("_failed", "_open", "_serial", "_settled", "_waiting", "batch", "head")

    def __init__(self) -> None:
        self.head = 0
        """The position of the message at the queue's head (the next one taken)."""
        self.batch = (0, 0)
        """The batch in the pump's hands: (first position, length)."""
        self._settled = 0
        self._waiting: list[tuple[int, int, Receipt]] = []  # heap: (end, serial, receipt)
        self._serial = 0  # ties between equal ends, in the order closed
        self._open: list[Receipt] = []  # their offers still putting: a few at a time
        self._failed: list[tuple[int, int]] = []

    def evicted(self, count: int) -> None:
        """``count`` messages left the head without being taken (``drop_oldest``): failed."""
        if self._waiting or self._open:
            self._failed.append((self.head, self.head + count))
        self.head += count

    def taken(self, count: int) -> None:
        self.batch = (self.head, count)
        self.head += count

    def settle(self, failed: Iterable[int] = ()) -> None:
        """The batch in the pump's hands is done with; ``failed`` are the indices (within it)
        of the messages that were not delivered."""
        start, count = self.batch
        settled = self._settled = max(self._settled, start + count)
        waiting = self._waiting
        if not waiting and not self._open:
            self._failed.clear()
            return
        for index in failed:
            position = start + index
            last = self._failed[-1] if self._failed else None
            if last is not None and last[1] == position:
                self._failed[-1] = (last[0], position + 1)
            else:
                self._failed.append((position, position + 1))
        while waiting and waiting[0][0] <= settled:
            receipt = heapq.heappop(waiting)[2]
            if not receipt.forgotten:
                receipt.resolve(self._failed)
        if self._failed:
            # Keep the failures a receipt still waiting may need: from its first position on.
            firsts = [r.ranges[0][0] for _, _, r in waiting if r.ranges]
            firsts += [r.ranges[0][0] for r in self._open if r.ranges]
            oldest = min(firsts, default=settled)
            self._failed = [(s, e) for s, e in self._failed if e > oldest]

    def open(self) -> Receipt:
        """A receipt for an offer about to put messages (:meth:`Receipt.add` as it does):
        failures are recorded from now on, so that those settled while the offer waits for
        room to put the rest are not lost. :meth:`close` it once the last is put (or
        :meth:`forget` it)."""
        receipt = Receipt([])
        receipt.open = True
        self._open.append(receipt)
        return receipt

    def close(self, receipt: Receipt) -> None:
        """The offer of an :meth:`open` receipt put all it will: resolve it now if its
        messages are all settled already (with the failures recorded meanwhile), else with
        the settles to come."""
        receipt.open = False
        self._open.remove(receipt)
        if receipt.end <= self._settled:
            receipt.resolve(self._failed)
        else:
            self._serial += 1
            heapq.heappush(self._waiting, (receipt.end, self._serial, receipt))

    def forget(self, receipt: Receipt) -> None:
        """Stop resolving ``receipt`` (its waiter is gone); again: nothing."""
        if receipt.open:
            receipt.open = False
            self._open.remove(receipt)
        receipt.forgotten = True


NOT_DELIVERED = "not_delivered"
"""The reason a source gives for messages the queue took but whose delivery the sink did not
confirm (``ack = "delivered"``: refused or given up by the sink, evicted by ``drop_oldest``,
or after such a message in the same read): a WebSocket ack's refused range, a gRPC bidi
``Ack``'s reason; HTTP says ``"not delivered"`` and unary gRPC ``UNAVAILABLE``. Unlike
``queue_full`` they were received (the ledger says how each ended): the sender sends them
again, and with ids the destination keeps one copy."""


class Answer:
    """What a source may answer for one offer, once it is final: ``accepted`` messages went
    into the queue; :meth:`wait` returns when they are delivered (a :class:`Receipt`, with
    ``ack = "delivered"``) or committed (a disk queue), and how many of them, from the first,
    may be acknowledged. Lets a source go on reading while earlier answers wait (WebSocket).
    Those of the ``accepted`` that :meth:`wait` does not count are :data:`NOT_DELIVERED`."""

    __slots__ = ("_receipt", "_receipts", "_stored", "accepted")

    def __init__(
        self,
        accepted: int,
        receipts: Receipts,
        receipt: Receipt | None = None,
        stored: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.accepted = accepted
        self._receipts = receipts
        self._receipt = receipt
        self._stored = stored

    @property
    def final(self) -> bool:
        """Nothing to wait for: ``accepted`` is the answer."""
        return self._receipt is None and self._stored is None

    async def wait(self) -> int:
        receipt = self._receipt
        if receipt is not None:
            try:
                await receipt.done.wait()
            finally:
                self._receipts.forget(receipt)
            return receipt.delivered
        if self._stored is not None:
            await self._stored()
        return self.accepted

    def forget(self) -> None:
        """Nobody will wait for this answer (its connection ended)."""
        if self._receipt is not None:
            self._receipts.forget(self._receipt)
