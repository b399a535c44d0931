"""Ring buffers: a fixed array of slots, filled and emptied with slice assignment."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._frames import Frames
from ._base import PolicyName, Queue
from ._locked import Locked

__all__ = ("LockedRingBuffer", "RingBuffer")

T = TypeVar("T")


class RingBuffer(Queue[T]):
    """A fixed ring of ``capacity`` slots with no lock: the talk's "ring buffer + atomics".

    Go needed atomics because goroutines run in parallel. Trio tasks only switch at an
    ``await``, and no method here awaits between reading and writing the indices, so each
    operation is atomic for free. Batches move with at most two slice assignments.

    Packed newline frames (:class:`~trio_gateway._frames.Frames`, a TCP read's frames still
    in their chunk) take one slot and count as their frames: the bounds stay in messages
    (and bytes), and :meth:`get_pieces_nowait` hands them on still packed, cut at the batch's
    end when needed. :meth:`get_batch_nowait` and the drop policies split them. The slots of
    packed entries are noted (``_packs``), so plain items between them still move by slices.
    """

    kind = "ring"

    def __init__(
        self,
        capacity: int,
        *,
        policy: PolicyName = "block",
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        super().__init__(capacity, policy=policy, max_bytes=max_bytes, size_of=size_of)
        self._slots: list[Any] = [None] * capacity
        self._head = 0
        self._count = 0  # messages
        self._used = 0  # slots: fewer than messages while packed frames are queued
        self._taken = 0  # slots emptied since the start: the head slot's serial number
        self._packs: deque[int] = deque()  # serial numbers of the slots holding Frames
        # "Is anyone parked?" is asked on every put and get. ParkingLot.__bool__ is a Python
        # call (~75 ns, a third of a put+get); the lot's own dict of parked tasks answers the
        # same question at C speed. If trio ever renames it, fall back to the lot itself.
        # put_nowait's fast path runs while depth < this: the capacity, or -1 (never) once
        # closed or when bounded in bytes. One comparison instead of three.
        self._fast_put_below = capacity if max_bytes is None else -1
        self._consumers_parked: Any = getattr(self._consumers, "_parked", self._consumers)
        self._producers_parked: Any = getattr(self._producers, "_parked", self._producers)

    def __len__(self) -> int:
        return self._count

    @property
    def stores_frames(self) -> bool:
        # Bounded in bytes by another measure than len, a Frames' weight is not its nbytes.
        return self._max_bytes is None or self._size_of is len

    # One message at a time: the common case (room left, no byte bound, open) writes one slot
    # without building a batch; everything else takes the general path in Queue.
    def put_nowait(self, item: T) -> bool:
        count = self._count
        if count >= self._fast_put_below:
            # Queue's own put_many_nowait, not an override: LockedRingBuffer holds its lock.
            return Queue.put_many_nowait(self, (item,)) == 1
        used = self._used
        tail = self._head + used
        capacity = self._capacity
        if tail >= capacity:
            tail -= capacity
        self._slots[tail] = item
        self._count = count + 1
        self._used = used + 1
        self._put += 1
        if self._consumers_parked:
            self._consumers.unpark_all()
        return True

    def get_nowait(self) -> T:
        count = self._count
        if not count or self._max_bytes is not None or self._packs:
            return Queue.get_batch_nowait(self, 1)[0]
        head = self._head
        slots = self._slots
        item: T = slots[head]
        slots[head] = None  # release the reference
        head += 1
        self._head = 0 if head == self._capacity else head
        self._count = count - 1
        self._used -= 1
        self._taken += 1
        self._got += 1
        if self._producers_parked:
            self._producers.unpark_all()
        return item

    def close(self) -> None:
        self._fast_put_below = -1
        super().close()

    def _append(self, items: Sequence[T]) -> None:
        n = len(items)
        capacity = self._capacity
        tail = self._head + self._used
        if tail >= capacity:
            tail -= capacity
        if type(items) is Frames and self.stores_frames:
            self._slots[tail] = items
            self._packs.append(self._taken + self._used)
            self._used += 1
            self._count += n
            return
        first = capacity - tail
        if n <= first:
            self._slots[tail : tail + n] = items
        else:
            self._slots[tail:] = items[:first]
            self._slots[: n - first] = items[first:]
        self._used += n
        self._count += n

    def _popleft(self, n: int) -> list[T]:
        if not self._packs:
            return self._slice_out(n)
        out: list[Any] = []
        for piece in self._take(n)[0]:
            if type(piece) is Frames:
                out += piece.split()
            else:
                out.append(piece)
        return out

    def get_pieces_nowait(self, max_items: int) -> tuple[list[Any], int, bool]:
        """As :meth:`~trio_gateway.queues.Queue.get_pieces_nowait`: packed frames stay packed."""
        if not self._packs:  # (so not empty)
            # Queue's own, not an override: LockedRingBuffer holds its lock already.
            items = Queue.get_batch_nowait(self, max_items)
            return items, len(items), False
        n = min(max_items, self._count)
        pieces, packed = self._take(n)
        self._got += n
        if self._max_bytes is not None:
            size_of = self._size_of
            self._bytes -= sum(
                piece.nbytes if type(piece) is Frames else size_of(piece) for piece in pieces
            )
        if self._producers_parked:
            self._producers.unpark_all()
        return pieces, n, packed

    def _take(self, n: int) -> tuple[list[Any], bool]:
        """The ``n`` oldest messages as pieces: plain items, and Frames (the last maybe cut);
        and whether there is a Frames among them."""
        out: list[Any] = []
        packed = False
        packs = self._packs
        slots = self._slots
        while n:
            if packs and packs[0] == self._taken:
                head = self._head
                frames: Frames = slots[head]
                if frames.nframes <= n:
                    packs.popleft()
                    slots[head] = None
                    head += 1
                    self._head = 0 if head == self._capacity else head
                    self._used -= 1
                    self._taken += 1
                    self._count -= frames.nframes
                    n -= frames.nframes
                    out.append(frames)
                else:
                    part, slots[head] = frames.cut(n)
                    self._count -= n
                    n = 0
                    out.append(part)
                packed = True
            else:
                k = min(n, packs[0] - self._taken if packs else self._used)
                out += self._slice_out(k)
                n -= k
        return out, packed

    def _slice_out(self, n: int) -> list[T]:
        """Remove and return the ``n`` plain items at the head (no Frames among them)."""
        head = self._head
        capacity = self._capacity
        slots = self._slots
        end = head + n
        if end <= capacity:
            out = slots[head:end]
            slots[head:end] = [None] * n  # release the references
        else:
            end -= capacity
            out = slots[head:]
            out += slots[:end]
            slots[head:] = [None] * (capacity - head)
            slots[:end] = [None] * end
        self._head = end if end < capacity else 0
        self._count -= n
        self._used -= n
        self._taken += n
        return out


class LockedRingBuffer(Locked[T], RingBuffer[T]):
    """The same ring guarded by a :class:`trio.Lock` per operation: the talk's "ring + mutex".

    The lock protects nothing Trio does not already guarantee; it is kept as a baseline that
    shows the price of locking: every operation, synchronous or awaiting, pays
    ``acquire_nowait``/``release`` around the change. The lock is never held across a
    schedule point (:class:`~trio_gateway.queues._locked.Locked` says why).
    """

    kind = "locked_ring"

    def put_nowait(self, item: T) -> bool:
        self._lock.acquire_nowait()
        try:
            return RingBuffer.put_nowait(self, item)
        finally:
            self._lock.release()

    def get_nowait(self) -> T:
        self._lock.acquire_nowait()
        try:
            return RingBuffer.get_nowait(self)
        finally:
            self._lock.release()
