"""The talk's "array + mutex": a Python list guarded by a lock. A baseline, not a choice."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ._base import PolicyName, Queue
from ._locked import Locked

__all__ = ("LockedListQueue",)

T = TypeVar("T")


class LockedListQueue(Locked[T], Queue[T]):
    """A list with ``append``/``del lst[:n]`` and a :class:`trio.Lock` taken per operation.

    Removing from the front of a list moves every remaining element, so a batch dequeue is
    O(depth): fine for the baseline it is, wrong for production. Bounded like every queue here
    (the talk's version grew without limit).
    """

    kind = "locked_list"

    def __init__(
        self,
        capacity: int,
        *,
        policy: PolicyName = "block",
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        self._items: list[T] = []
        super().__init__(capacity, policy=policy, max_bytes=max_bytes, size_of=size_of)

    def __len__(self) -> int:
        return len(self._items)

    def _append(self, items: Sequence[T]) -> None:
        self._items.extend(items)

    def _popleft(self, n: int) -> list[T]:
        out = self._items[:n]
        del self._items[:n]
        return out
