"""Bounded queues with an explicit overflow policy: the four structures the talk compared."""

from .._names import canonical
from ._base import POLICIES as POLICIES
from ._base import OverflowPolicy as OverflowPolicy
from ._base import Queue as Queue
from ._base import QueueStatistics as QueueStatistics
from ._channel import ChannelQueue as ChannelQueue
from ._disk import FSYNC_POLICIES as FSYNC_POLICIES
from ._disk import DiskQueue as DiskQueue
from ._list import LockedListQueue as LockedListQueue
from ._ring import LockedRingBuffer as LockedRingBuffer
from ._ring import RingBuffer as RingBuffer

QUEUE_KINDS: dict[str, type[Queue[object]]] = {
    "ring": RingBuffer,
    "locked_ring": LockedRingBuffer,
    "channel": ChannelQueue,
    "locked_list": LockedListQueue,
}
"""The in-memory queue classes by the name used in configuration (``--queue``), in the shown
spelling (``locked_ring``; :func:`queue_class` also takes ``locked-ring``). The disk queue
(``--queue disk:DIR``, :class:`DiskQueue`) takes a directory, so it is built apart."""


def queue_class(kind: str) -> type[Queue[object]] | None:
    """The queue class ``kind`` names, in either spelling; None if it names none."""
    return QUEUE_KINDS.get(canonical(kind))


__all__ = (
    "FSYNC_POLICIES",
    "POLICIES",
    "QUEUE_KINDS",
    "ChannelQueue",
    "DiskQueue",
    "LockedListQueue",
    "LockedRingBuffer",
    "OverflowPolicy",
    "Queue",
    "QueueStatistics",
    "RingBuffer",
    "queue_class",
)
