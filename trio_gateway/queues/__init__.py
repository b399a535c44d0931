"""Bounded queues with an explicit overflow policy: the four structures the talk compared."""

from ._base import POLICIES as POLICIES
from ._base import OverflowPolicy as OverflowPolicy
from ._base import Queue as Queue
from ._base import QueueStatistics as QueueStatistics
from ._channel import ChannelQueue as ChannelQueue
from ._list import LockedListQueue as LockedListQueue
from ._ring import LockedRingBuffer as LockedRingBuffer
from ._ring import RingBuffer as RingBuffer

QUEUE_KINDS: dict[str, type[Queue[object]]] = {
    "ring": RingBuffer,
    "locked-ring": LockedRingBuffer,
    "channel": ChannelQueue,
    "locked-list": LockedListQueue,
}
"""The queue classes by the name used in configuration (``--queue``)."""

__all__ = (
    "POLICIES",
    "QUEUE_KINDS",
    "ChannelQueue",
    "LockedListQueue",
    "LockedRingBuffer",
    "OverflowPolicy",
    "Queue",
    "QueueStatistics",
    "RingBuffer",
)
