"""What travels through the gateway.

The hot path never builds an object per message. A source reads a chunk, splits it into
payloads, and attaches one shared :class:`Origin` to all of them; the queue holds the payloads
(plain ``bytes``) and, beside them, the origins as *runs*: ``(origin, count)`` for each group
of consecutive messages from one read. A :class:`Batch` is what the pump hands to a processor
and a sink: the payloads of up to ``batch_size`` messages and their runs.

(Building a ``(payload, origin)`` tuple per message cost 165-530 ns each here, most of it
allocation and cyclic-GC traversal of millions of tracked tuples; a run costs one list entry
per read. See docs/design.md, "the fast path".)

Streaming TCP goes further: a read's newline frames stay in their chunk as one
:class:`~trio_gateway._frames.Frames` through the ring buffer, and a batch made of such
*pieces* splits them into ``payloads`` only when something first asks for them one by one
(``len``, ``nbytes`` and ``runs`` never do).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias, overload

from ._frames import Frames

__all__ = ("Batch", "Item", "Message", "Origin")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where and when a group of messages was received (shared by every message of one read),
    and the message's id when its sender gave one."""

    transport: str
    """``"tcp"``, ``"udp"``, ``"http"``, ``"websocket"``, ``"grpc"``, ``"memory"``."""
    listener: str
    """The listener's label, e.g. ``"tcp:127.0.0.1:7000"``."""
    peer: str
    """The sender's address as ``host:port`` (empty when unknown)."""
    received_at: float
    """Wall-clock time (``time.time()``) of the read that produced the messages."""
    id: str | None = None
    """The sender's id for the message (``Idempotency-Key``, gRPC ``idempotency-key``
    metadata), or None. An origin with an id carries exactly one message: a source that has
    ids makes one origin per message, so the id survives any cut of the runs into batches.
    Sinks pass it on (``Nats-Msg-Id``, the JSON Lines ``"id"``) so that a sender's retry of
    the same message is recognised downstream (docs/reliability.md, "Idempotency ids")."""


class Message(NamedTuple):
    """One message with its origin, as a processor sees it (and as a Batch iterates)."""

    payload: bytes
    origin: Origin


Item: TypeAlias = Message
"""Alias of :class:`Message` (what iterating a :class:`Batch` yields)."""


class Batch(Sequence[Message]):
    """Messages taken from the queue together.

    ``payloads`` holds the payloads in order; ``runs`` says which origin each has: the first
    ``runs[0][1]`` payloads came from ``runs[0][0]``, and so on. Fast sinks work on these two
    lists directly; iterating (or indexing) yields :class:`Message` tuples for convenience.
    A batch taken from packed frames (:meth:`of_pieces`) builds ``payloads`` on first use.
    """

    __slots__ = ("_count", "_payloads", "_pieces", "runs")

    def __init__(self, payloads: list[bytes], runs: list[tuple[Origin, int]]) -> None:
        self._payloads: list[bytes] | None = payloads
        self._pieces: list[bytes | Frames] = []
        self._count = 0  # of the pieces (payloads, once there, count themselves)
        self.runs = runs

    @classmethod
    def of_pieces(
        cls, pieces: list[bytes | Frames], count: int, runs: list[tuple[Origin, int]]
    ) -> Batch:
        """A batch of ``count`` messages held as ``pieces``: payloads and packed
        :class:`~trio_gateway._frames.Frames` (each counting as its frames), in order."""
        batch = cls.__new__(cls)
        batch._payloads = None
        batch._pieces = pieces
        batch._count = count
        batch.runs = runs
        return batch

    @property
    def payloads(self) -> list[bytes]:
        """The payloads in order (split out of packed pieces on first use)."""
        payloads = self._payloads
        if payloads is None:
            payloads = []
            for piece in self._pieces:
                if isinstance(piece, Frames):
                    payloads += piece.split()
                else:
                    payloads.append(piece)
            self._payloads = payloads
            self._pieces = []
        return payloads

    @property
    def packed(self) -> bool:
        """Whether the batch is still made of packed pieces (``payloads`` not built yet)."""
        return self._payloads is None

    @property
    def pieces(self) -> list[bytes | Frames]:
        """The batch as it left the queue: payloads and packed frames, in order. A sink that
        can write newline frames as they came (or only counts) reads this, not ``payloads``."""
        return self._pieces if self._payloads is None else list(self._payloads)

    @classmethod
    def of(cls, messages: Sequence[tuple[bytes, Origin]]) -> Batch:
        """Build a batch from ``(payload, origin)`` pairs (tests, custom sources)."""
        payloads = [payload for payload, _ in messages]
        runs: list[tuple[Origin, int]] = []
        for _, origin in messages:
            if runs and runs[-1][0] is origin:
                runs[-1] = (origin, runs[-1][1] + 1)
            else:
                runs.append((origin, 1))
        return cls(payloads, runs)

    def __len__(self) -> int:
        payloads = self._payloads
        return self._count if payloads is None else len(payloads)

    def __iter__(self) -> Iterator[Message]:
        payloads = self.payloads
        start = 0
        for origin, count in self.runs:
            for payload in payloads[start : start + count]:
                yield Message(payload, origin)
            start += count

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += len(self.payloads)
        payload = self.payloads[index]  # raises IndexError when out of range
        for origin, count in self.runs:
            if index < count:
                return Message(payload, origin)
            index -= count
        raise IndexError(index)  # pragma: no cover - runs and payloads always agree

    @property
    def nbytes(self) -> int:
        """Total payload bytes."""
        if self._payloads is not None:
            return sum(map(len, self._payloads))
        return sum(
            piece.nbytes if isinstance(piece, Frames) else len(piece) for piece in self._pieces
        )

    def __repr__(self) -> str:
        return f"<Batch {len(self)} messages in {len(self.runs)} runs>"
