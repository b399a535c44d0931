"""The queue contract shared by the four structures, and the bookkeeping they have in common.

Every queue is bounded (``capacity`` items, optionally ``max_bytes``) and applies a named
overflow policy when a producer offers more than fits:

* ``"block"``: ``put_nowait`` refuses (returns False / accepts a prefix); ``put`` waits for room.
* ``"drop_newest"``: the offered items that do not fit are dropped and counted.
* ``"drop_oldest"``: the oldest queued items are evicted (and counted) to make room.

``policy="drop-oldest"`` is accepted too: one spelling rule for every enum-like value
(:mod:`trio_gateway._names`); the policy is always reported as ``drop_oldest``.

Producers on the hot path call :meth:`put_many_nowait` once per read; consumers call
:meth:`get_batch`. Neither costs a checkpoint per message. Waiting uses Trio parking lots, so a
consumer of an empty queue sleeps instead of polling. Every waiting method is one checkpoint:
parked, the park is it (with a second trip through the scheduler after each wake-up, a pump
woken once per request of a one-request-at-a-time HTTP client made two trips more per request).

Under Trio a synchronous section with no ``await`` cannot be interrupted, so a queue needs no
lock: :class:`LockedListQueue` and :class:`LockedRingBuffer` take one anyway, as the talk's
mutex versions did, to measure what it costs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, get_args

import trio
from trio.lowlevel import ParkingLot, cancel_shielded_checkpoint, checkpoint_if_cancelled

from .._errors import ConfigurationError
from .._frames import Frames
from .._names import canonical

__all__ = ("POLICIES", "OverflowPolicy", "PolicyName", "Queue", "QueueStatistics")

T = TypeVar("T")

OverflowPolicy = Literal["block", "drop_newest", "drop_oldest"]
POLICIES: tuple[OverflowPolicy, ...] = get_args(OverflowPolicy)
PolicyName = Literal[OverflowPolicy, "drop-newest", "drop-oldest"]
"""What a queue's ``policy=`` takes: the shown spelling or the hyphenated one."""


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A snapshot of a queue, as returned by :meth:`Queue.statistics`."""

    kind: str
    policy: OverflowPolicy
    capacity: int
    max_bytes: int | None
    depth: int
    bytes: int
    """Payload bytes currently queued (tracked only when ``max_bytes`` is set, else 0)."""
    put: int
    """Items accepted since creation."""
    got: int
    """Items handed to consumers since creation."""
    dropped: Mapping[str, int]
    """Items dropped by policy: ``{"drop_newest": n, "drop_oldest": n}``."""
    closed: bool
    waiting_producers: int
    waiting_consumers: int


class Queue(ABC, Generic[T]):
    """A bounded FIFO with an overflow policy; subclasses supply the storage."""

    kind = "queue"
    supported_policies: tuple[OverflowPolicy, ...] = POLICIES

    def __init__(
        self,
        capacity: int,
        *,
        policy: PolicyName = "block",
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigurationError("capacity", f"must be a positive integer, got {capacity!r}")
        spelled = canonical(policy) if isinstance(policy, str) else policy
        if spelled not in self.supported_policies:
            choices = ", ".join(self.supported_policies)
            raise ConfigurationError("policy", f"{self.kind} supports {choices}; got {policy!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigurationError("max_bytes", f"must be a positive integer, got {max_bytes!r}")
        self._capacity = capacity
        self._policy: OverflowPolicy = spelled
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._bytes = 0
        self._refused_size = 1
        """Bytes the last item refused for lack of byte room needs (see :meth:`_is_full`)."""
        self._put = 0
        self._got = 0
        self._dropped_newest = 0
        self._dropped_oldest = 0
        self._closed = False
        self._consumers = ParkingLot()
        self._producers = ParkingLot()

    # -- storage, supplied by subclasses --------------------------------------------------

    @abstractmethod
    def __len__(self) -> int:
        """Items queued now."""

    @abstractmethod
    def _append(self, items: Sequence[T]) -> None:
        """Store ``items`` at the tail; the caller has checked that they fit."""

    @abstractmethod
    def _popleft(self, n: int) -> list[T]:
        """Remove and return the ``n`` oldest items (``0 < n <= len(self)``)."""

    # -- properties -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def policy(self) -> OverflowPolicy:
        return self._policy

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stores_frames(self) -> bool:
        """Whether packed newline frames (:class:`~trio_gateway._frames.Frames`) offered to
        :meth:`put_many_nowait` are stored packed (:class:`RingBuffer`); else they are split
        into their payloads, one item each."""
        return False

    # -- producers ------------------------------------------------------------------------

    def put_nowait(self, item: T) -> bool:
        """Offer one item; False when the policy refused or dropped it (drops are counted)."""
        return self.put_many_nowait((item,)) == 1

    def put_many_nowait(self, items: Sequence[T], *, drop: bool = True) -> int:
        """Offer ``items`` in order and return how many of them are now queued.

        Under ``block`` a prefix that fits is accepted and the rest is left to the caller.
        Under ``drop_newest`` the rest is dropped and counted, unless ``drop=False``: then the
        caller refuses them to its sender itself (an HTTP 503), and they are not counted here.
        Under ``drop_oldest`` everything is accepted; the oldest items make room (counted).

        Raises :class:`trio.ClosedResourceError` after :meth:`close`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the queue is closed")
        n = len(items)
        if not n:
            return 0
        if self._max_bytes is None:
            room = self._capacity - len(self)
            if n <= room:
                self._append(items)
                accepted = n
            elif self._policy == "drop_oldest":
                accepted = self._make_room_by_count(items, n, room)
            else:
                accepted = room
                if room:
                    self._append(items[:room])
                if drop and self._policy == "drop_newest":
                    self._dropped_newest += n - room
        else:
            accepted = self._put_by_bytes(items, drop)
        if accepted:
            self._put += accepted
            if self._consumers:
                self._consumers.unpark_all()
        return accepted

    def _make_room_by_count(self, items: Sequence[T], n: int, room: int) -> int:
        capacity = self._capacity
        if n >= capacity:
            # The batch alone fills the queue: everything queued and the batch's own head go.
            self._dropped_oldest += len(self) + n - capacity
            if len(self):
                self._popleft(len(self))
            self._append(items[n - capacity :])
            return capacity
        self._popleft(n - room)
        self._dropped_oldest += n - room
        self._append(items)
        return n

    def _put_by_bytes(self, items: Sequence[T], drop: bool) -> int:
        # Byte-bounded path: per-item sizes are needed, so this is a Python loop. It only runs
        # when max_bytes is configured.
        assert self._max_bytes is not None
        size_of = self._size_of
        limit = self._max_bytes
        # The usual case: what the count allows also fits in bytes. One C-level sum over it,
        # no loop per item (a full queue re-offered a read's 14,000 frames per wake-up).
        n = len(items)
        room = self._capacity - len(self)
        if n <= room or self._policy != "drop_oldest":
            head = items if n <= room else items[:room]
            if type(head) is Frames and size_of is len:
                total = head.nbytes
            else:
                total = sum(map(size_of, head))
            if self._bytes + total <= limit:
                if head:
                    self._append(head)
                    self._bytes += total
                if drop and self._policy == "drop_newest":
                    self._dropped_newest += n - len(head)
                return len(head)
        sizes = list(map(size_of, items))
        if self._policy == "drop_oldest":
            # Keep the longest suffix of the batch that fits alone, then evict old items.
            start, total = len(items), 0
            while (
                start > 0
                and total + sizes[start - 1] <= limit
                and len(items) - start < self._capacity
            ):
                start -= 1
                total += sizes[start]
            self._dropped_oldest += start
            need_items = len(items) - start
            while len(self) and (
                self._bytes + total > limit or len(self) + need_items > self._capacity
            ):
                (old,) = self._popleft(1)
                self._bytes -= size_of(old)
                self._dropped_oldest += 1
            if need_items:
                self._append(items[start:])
                self._bytes += total
            return need_items
        room = self._capacity - len(self)
        accepted, total = 0, 0
        for size in sizes:
            if accepted == room:
                break
            if self._bytes + total + size > limit:
                # Capped: an item larger than max_bytes can never fit, and must not make
                # every producer wait on an empty queue.
                self._refused_size = min(max(size, 1), limit)
                break
            accepted += 1
            total += size
        if accepted:
            self._append(items[:accepted])
            self._bytes += total
        if drop and self._policy == "drop_newest":
            self._dropped_newest += len(items) - accepted
        return accepted

    async def wait_not_full(self) -> None:
        """Wait until there is room for at least one more item (or the queue is closed)."""
        await checkpoint_if_cancelled()
        if self._closed or not self._is_full():
            await cancel_shielded_checkpoint()
            return
        while not self._closed and self._is_full():
            await self._producers.park()  # (a checkpoint: no second one after it)

    def _is_full(self) -> bool:
        # Bounded in bytes, "full" means "no room for the item last refused for bytes": a
        # queue with 2 free bytes is full for a 5-byte item. Without this, wait_not_full
        # would return at once and a producer's retry loop would spin until consumers caught
        # up. With several producers the size is the latest refusal's: a waiter may wake
        # once too early (and park again) or later than it could have, never spin.
        if len(self) >= self._capacity:
            return True
        max_bytes = self._max_bytes
        return max_bytes is not None and self._bytes + self._refused_size > max_bytes

    async def put(self, item: T) -> bool:
        """Offer one item; under ``block`` wait for room. Returns False if it was dropped."""
        await checkpoint_if_cancelled()
        while True:
            if self.put_nowait(item):
                await cancel_shielded_checkpoint()
                return True
            if self._policy != "block":
                await cancel_shielded_checkpoint()
                return False
            await self._producers.park()

    # -- consumers ------------------------------------------------------------------------

    def get_batch_nowait(self, max_items: int) -> list[T]:
        """Take up to ``max_items`` of the oldest items at once.

        Raises :class:`trio.WouldBlock` when empty, :class:`trio.EndOfChannel` when closed and
        empty (end of stream).
        """
        depth = len(self)
        if not depth:
            if self._closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        batch = self._popleft(min(max_items, depth))
        self._got += len(batch)
        if self._max_bytes is not None:
            self._bytes -= sum(map(self._size_of, batch))
        if self._producers:
            self._producers.unpark_all()
        return batch

    def get_pieces_nowait(self, max_items: int) -> tuple[list[Any], int, bool]:
        """As :meth:`get_batch_nowait`, but packed frames stay packed: ``(pieces, count,
        packed)``, where the pieces hold ``count`` items (a
        :class:`~trio_gateway._frames.Frames` counts as its frames) and ``packed`` says
        whether any piece is a Frames. Only :attr:`stores_frames` queues return any."""
        items = self.get_batch_nowait(max_items)
        return items, len(items), False

    def get_nowait(self) -> T:
        """Take the oldest item; :class:`trio.WouldBlock` / :class:`trio.EndOfChannel` as above."""
        return self.get_batch_nowait(1)[0]

    async def wait_not_empty(self) -> None:
        """Wait until there is at least one item to take (or the queue is closed)."""
        await checkpoint_if_cancelled()
        if self._closed or len(self):
            await cancel_shielded_checkpoint()
            return
        while not self._closed and not len(self):
            await self._consumers.park()  # (a checkpoint: no second one after it)

    async def get_batch(self, max_items: int) -> list[T]:
        """Wait for at least one item, then take up to ``max_items`` of them."""
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        await checkpoint_if_cancelled()
        parked = False
        while True:
            try:
                batch = self.get_batch_nowait(max_items)
            except trio.WouldBlock:
                await self._consumers.park()
                parked = True
                continue
            if not parked:  # parking was the checkpoint; one per call is enough
                await cancel_shielded_checkpoint()
            return batch

    async def get(self) -> T:
        """Wait for an item and take it; :class:`trio.EndOfChannel` once closed and drained."""
        return (await self.get_batch(1))[0]

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse further puts. Consumers drain what is left, then see end-of-stream."""
        self._closed = True
        self._consumers.unpark_all()
        self._producers.unpark_all()

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            kind=self.kind,
            policy=self._policy,
            capacity=self._capacity,
            max_bytes=self._max_bytes,
            depth=len(self),
            bytes=self._bytes,
            put=self._put,
            got=self._got,
            dropped={"drop_newest": self._dropped_newest, "drop_oldest": self._dropped_oldest},
            closed=self._closed,
            waiting_producers=len(self._producers),
            waiting_consumers=len(self._consumers),
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {len(self)}/{self._capacity} policy={self._policy}"
            f"{' closed' if self._closed else ''}>"
        )
