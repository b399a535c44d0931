"""The talk's "channel": a Trio memory channel behind the queue contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from .._errors import ConfigurationError
from ._base import OverflowPolicy, PolicyName, Queue

__all__ = ("ChannelQueue",)

T = TypeVar("T")


class ChannelQueue(Queue[T]):
    """A :func:`trio.open_memory_channel` of ``capacity`` items.

    A channel cannot evict what it already holds, so ``drop_oldest`` is not offered, and it
    counts items, not bytes, so ``max_bytes`` is not either. Every message is a separate
    ``send_nowait``/``receive_nowait`` call: this is the idiomatic Trio baseline.
    """

    kind = "channel"
    supported_policies: tuple[OverflowPolicy, ...] = ("block", "drop_newest")

    def __init__(
        self,
        capacity: int,
        *,
        policy: PolicyName = "block",
        max_bytes: int | None = None,
        size_of: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        if max_bytes is not None:
            raise ConfigurationError("max_bytes", "the channel queue is bounded in items only")
        super().__init__(capacity, policy=policy, size_of=size_of)
        self._send, self._receive = trio.open_memory_channel[T](capacity)

    def __len__(self) -> int:
        return self._send.statistics().current_buffer_used

    def _append(self, items: Sequence[T]) -> None:
        send = self._send.send_nowait
        for item in items:
            send(item)

    def _popleft(self, n: int) -> list[T]:
        receive = self._receive.receive_nowait
        return [receive() for _ in range(n)]
