"""The gateway's queue: any :class:`~trio_gateway.queues.Queue` of payloads, plus their origins.

The queue itself stays generic (it holds ``bytes``); this wrapper keeps, beside it, the origins
as runs ``[origin, count]`` in queue order. Whatever the queue's policy removes, it removes
from the head (``drop_oldest``) or never admits (``drop_newest``, ``block``), so after every
put the runs are trimmed at the head until they add up to the queue's depth again. Every
method is synchronous between the queue operation and the bookkeeping, so no other task can
observe them out of step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from ._frames import Frames
from ._message import Batch, Origin
from ._receipts import Receipts
from .queues import DiskQueue, Queue

__all__ = ("UNKNOWN_ORIGIN", "MessageBuffer")

UNKNOWN_ORIGIN = Origin("unknown", "", "", 0.0)
"""The origin reported for items that reached the queue without going through the buffer."""


class MessageBuffer:
    """A queue of payloads with their origins kept as runs (see the module docstring)."""

    __slots__ = ("_disk", "_held", "_runs", "queue", "receipts")

    def __init__(self, queue: Queue[bytes]) -> None:
        self.queue = queue
        self._disk = queue if isinstance(queue, DiskQueue) else None
        """A disk queue keeps the origins itself, on disk beside the payloads."""
        self.receipts = Receipts()
        """Positions, for sources that answer only after delivery (``ack = "delivered"``)."""
        self._runs: deque[list[Any]] = deque()  # [origin, count], mutable to trim in place
        self._held = 0

    @property
    def policy(self) -> str:
        return self.queue.policy

    def __len__(self) -> int:
        return len(self.queue)

    def put_many_nowait(
        self, payloads: Sequence[bytes], origin: Origin, *, drop: bool = True
    ) -> int:
        """Offer ``payloads`` (all from ``origin``); returns how many the queue accepted.

        They are the last ``accepted`` before :attr:`end_position`. Packed newline frames
        (:class:`~trio_gateway._frames.Frames`) stay packed in a queue that stores them, and
        are split into their payloads for any other."""
        before = len(self.queue)
        if type(payloads) is Frames and not self.queue.stores_frames:
            payloads = payloads.split()
        if self._disk is not None:
            accepted = self._disk.put_many_nowait(payloads, drop=drop, origin=origin)
        else:
            accepted = self._put(payloads, origin, drop)
        evicted = before + accepted - len(self.queue)
        if evicted > 0:  # drop_oldest made room at the head
            self.receipts.evicted(evicted)
        return accepted

    def put_each_nowait(
        self, payloads: Sequence[bytes], origins: Sequence[Origin], *, drop: bool = True
    ) -> int:
        """:meth:`put_many_nowait` for messages with an origin each (each with its sender's
        id): one queue operation for all of them, a run of one per message."""
        if self._disk is not None:
            accepted = 0
            for payload, origin in zip(payloads, origins, strict=True):
                if not self.put_many_nowait((payload,), origin, drop=drop):
                    break
                accepted += 1
            return accepted
        before = len(self.queue)
        accepted = self.queue.put_many_nowait(payloads, drop=drop)
        if accepted:
            # What is queued: the prefix that fit, or, under drop_oldest when there are more
            # than the capacity, the newest (the queue dropped the others as the oldest).
            start = len(payloads) - accepted if self.policy == "drop_oldest" else 0
            self._runs.extend([origin, 1] for origin in origins[start : start + accepted])
            self._held += accepted
        excess = self._held - len(self.queue)
        if excess > 0:
            self._drop_head(excess)
        evicted = before + accepted - len(self.queue)
        if evicted > 0:
            self.receipts.evicted(evicted)
        return accepted

    @property
    def end_position(self) -> int:
        """The position just after the last message queued."""
        return self.receipts.head + len(self.queue)

    def _put(self, payloads: Sequence[bytes], origin: Origin, drop: bool) -> int:
        accepted = self.queue.put_many_nowait(payloads, drop=drop)
        if accepted:
            self._runs.append([origin, accepted])
            self._held += accepted
        excess = self._held - len(self.queue)
        if excess > 0:
            self._drop_head(excess)
        return accepted

    def _drop_head(self, n: int) -> list[tuple[Origin, int]]:
        """Remove ``n`` messages' worth of runs from the head; return them."""
        taken: list[tuple[Origin, int]] = []
        runs = self._runs
        self._held = max(self._held - n, 0)
        while n:
            if not runs:
                # Items put into the queue directly, not through this buffer: origin unknown.
                taken.append((UNKNOWN_ORIGIN, n))
                break
            run = runs[0]
            origin, count = run
            if count <= n:
                runs.popleft()
                taken.append((origin, count))
                n -= count
            else:
                run[1] = count - n
                taken.append((origin, n))
                n = 0
        return taken

    def get_batch_nowait(self, max_items: int) -> Batch:
        """Take up to ``max_items``; :class:`trio.WouldBlock` / :class:`trio.EndOfChannel`.

        Call :meth:`settle` once the batch is delivered or given up for good."""
        if self._disk is not None:
            batch = self._disk.take_batch_nowait(max_items)
        else:
            pieces, count, packed = self.queue.get_pieces_nowait(max_items)
            runs = self._drop_head(count)
            batch = Batch.of_pieces(pieces, count, runs) if packed else Batch(pieces, runs)
        self.receipts.taken(len(batch))
        return batch

    def settle(self, failed: Sequence[int] = ()) -> None:
        """The oldest batch taken is done with: a disk queue may forget it (memory queues
        forgot it when it was taken); ``failed`` are the indices (in the batch) of the
        messages that were not delivered, for the receipts waiting on them."""
        if self._disk is not None:
            self._disk.settle()
        self.receipts.settle(failed)

    @property
    def durable(self) -> bool:
        """Whether an accepted message is only acknowledged once on disk (a disk queue)."""
        return self._disk is not None

    @property
    def stored_mark(self) -> int | None:
        """A disk queue's position after the last message accepted (to :meth:`wait_stored`
        for later); None for a memory queue."""
        return None if self._disk is None else self._disk.position

    async def wait_stored(self, mark: int | None = None) -> None:
        """Wait until every message accepted so far (up to ``mark``, a :attr:`stored_mark`)
        is on disk (a disk queue; else at once)."""
        if self._disk is not None:
            await self._disk.wait_stored(mark)

    async def get_batch(self, max_items: int) -> Batch:
        """Wait for at least one message, then take up to ``max_items``.

        Always a checkpoint, and never cancelled between taking the messages and returning
        them (the same discipline as :meth:`trio.MemoryReceiveChannel.receive`).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                batch = self.get_batch_nowait(max_items)
            except trio.WouldBlock:
                await self.queue.wait_not_empty()
                waited = True
                continue
            if not waited:  # the wait was the checkpoint
                await trio.lowlevel.cancel_shielded_checkpoint()
            return batch
