"""What travels through the gateway.

The hot path never builds an object per message: a source reads a chunk, splits it into
payloads, and attaches one shared :class:`Origin` to all of them. A queue item is the plain
tuple ``(payload, origin)``; :class:`Message` is the named view handed to processors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

__all__ = ("Item", "Message", "Origin")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where and when a group of messages was received (shared by every message of one read)."""

    transport: str
    """``"tcp"``, ``"udp"``, ``"http"``, ``"websocket"``, ``"grpc"``, ``"memory"``."""
    listener: str
    """The listener's label, e.g. ``"tcp:127.0.0.1:7000"``."""
    peer: str
    """The sender's address as ``host:port`` (empty when unknown)."""
    received_at: float
    """Wall-clock time (``time.time()``) of the read that produced the messages."""


Item: TypeAlias = tuple[bytes, Origin]
"""One queued message: ``(payload, origin)``. Plain tuples keep enqueueing C-speed."""


class Message(NamedTuple):
    """A message as a processor sees it."""

    payload: bytes
    origin: Origin
