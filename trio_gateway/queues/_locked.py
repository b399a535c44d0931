"""The lock the talk's "mutex" queues take around every synchronous operation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from ._base import PolicyName, Queue

__all__ = ("Locked",)

T = TypeVar("T")


class Locked(Queue[T]):
    """Takes a :class:`trio.Lock` with ``acquire_nowait`` around ``put_many_nowait``,
    ``get_batch_nowait`` and ``get_pieces_nowait``, before the storage's own (next in the MRO)
    runs.

    Mixed in before a storage class (``class LockedRingBuffer(Locked[T], RingBuffer[T])``).
    The lock is never held across a schedule point: the awaiting operations are the base
    class's, which checkpoint and then run these synchronous ones. ``async with lock`` would
    hold it across the checkpoint inside :meth:`trio.Lock.acquire`, and a synchronous operation
    from another task arriving then would find it taken: ``put_many_nowait`` would raise
    :class:`trio.WouldBlock` to a source, and ``get_batch`` would mistake it for an empty queue
    and park past the last wake-up.
    """

    def __init__(
        self,
        capacity: int,
        *,
        policy: PolicyName = "block",
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        super().__init__(capacity, policy=policy, max_bytes=max_bytes, size_of=size_of)
        self._lock = trio.Lock()

    def put_many_nowait(self, items: Sequence[T], *, drop: bool = True) -> int:
        self._lock.acquire_nowait()
        try:
            return super().put_many_nowait(items, drop=drop)
        finally:
            self._lock.release()

    def get_batch_nowait(self, max_items: int) -> list[T]:
        self._lock.acquire_nowait()
        try:
            return super().get_batch_nowait(max_items)
        finally:
            self._lock.release()

    def get_pieces_nowait(self, max_items: int) -> tuple[list[Any], int, bool]:
        if not self.stores_frames:  # Queue's calls get_batch_nowait, which takes the lock
            items = self.get_batch_nowait(max_items)
            return items, len(items), False
        self._lock.acquire_nowait()
        try:
            return super().get_pieces_nowait(max_items)
        finally:
            self._lock.release()
