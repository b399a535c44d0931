"""Reads whose answer waits, in flight on one connection or stream, answered in order.

With ``ack = "delivered"`` (or a disk queue) the answer to a read comes once the sink
confirmed it (or the commit is on disk). A source that answers per read (WebSocket acks, a
gRPC bidi stream) keeps reading meanwhile: each read's :class:`~trio_gateway._ingress.Answer`
goes in a :class:`Flight`, and one task (:meth:`Flight.answer_in_order`) waits for the oldest
and records it, so the answers go out in the order of the reads, and many reads share one
sink confirmation. The flight is bounded in messages and in payload bytes; past either, the
reader stops reading until the oldest read is answered (one read is always let through,
however large), so flow control pushes back on the sender as it would with one read in
flight.

What the flight itself holds (the answers and what each read must answer with: sequence
numbers, counts) can be charged to the connection's share of the memory budget
(``hold``/``release``): a read the share has no room for waits until nothing older is in
flight. The payloads are not charged here: they are in the queue or the sink's batch, charged
there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from .._ingress import Answer

__all__ = ("HELD_PER_MESSAGE", "HELD_PER_READ", "MAX_IN_FLIGHT", "MAX_IN_FLIGHT_BYTES", "Flight")

MAX_IN_FLIGHT = 4096
"""The most messages of one connection (or stream) whose answer waits for their delivery
(``ack = "delivered"``) or their commit (a disk queue) while the source goes on reading it;
past it (or :data:`MAX_IN_FLIGHT_BYTES`), the source stops reading until the oldest read is
answered. One read is always let through, however large."""

MAX_IN_FLIGHT_BYTES = 4 << 20
"""The most payload bytes of one connection awaiting their answer (see :data:`MAX_IN_FLIGHT`)."""

HELD_PER_READ = 512
"""Bytes a read in flight is charged for its bookkeeping (its answer, its receipt's ranges,
the entry in the flight), measured with ``sys.getsizeof`` and rounded up."""
HELD_PER_MESSAGE = 48
"""Bytes each message of a read in flight is charged (a sequence number in a list: an int
object and its slot)."""

T = TypeVar("T")


class Flight(Generic[T]):
    """The reads of one connection whose answer waits, oldest first (see the module
    docstring). Each carries an ``item``: what its answer is recorded with (a read's
    sequence numbers, or how many messages it had)."""

    __slots__ = (
        "_answered",
        "_bytes",
        "_count",
        "_hold",
        "_reads",
        "_release",
        "max_bytes",
        "max_messages",
        "open",
    )

    def __init__(
        self,
        *,
        max_messages: int | None = None,
        max_bytes: int | None = None,
        hold: Callable[[int], bool] | None = None,
        release: Callable[[int], None] | None = None,
    ) -> None:
        # Not given: the module's bounds as they are now (a test may lower them).
        self.max_messages = MAX_IN_FLIGHT if max_messages is None else max_messages
        self.max_bytes = MAX_IN_FLIGHT_BYTES if max_bytes is None else max_bytes
        self._hold = hold
        self._release = release
        # (answer, messages, payload bytes, bytes charged, item)
        self._reads: deque[tuple[Answer, int, int, int, T]] = deque()
        self._count = 0
        self._bytes = 0
        self._answered = trio.lowlevel.ParkingLot()  # a read was added or answered
        self.open = True
        """False once no answer can be given any more (:meth:`close`): nothing waits."""

    def __bool__(self) -> bool:
        return bool(self._reads)

    def __len__(self) -> int:
        """Messages in flight."""
        return self._count

    def _room(self) -> bool:
        return self._count < self.max_messages and self._bytes < self.max_bytes

    async def add(self, answer: Answer, n: int, nbytes: int, item: T) -> None:
        """Put the answer to the next read of ``n`` messages (``nbytes`` of payload) in
        flight; then wait while the flight is over its bounds, or while this read is not
        charged (the budget had no room) and older reads are in flight."""
        if not self.open:
            answer.forget()
            return
        cost = 0
        uncharged = False  # over budget: let through only once alone in flight
        if self._hold is not None:
            cost = HELD_PER_READ + HELD_PER_MESSAGE * n
            if not self._hold(cost):
                cost, uncharged = 0, True
        reads = self._reads
        reads.append((answer, n, nbytes, cost, item))
        self._count += n
        self._bytes += nbytes
        self._answered.unpark_all()
        while reads and self.open and (not self._room() or (uncharged and len(reads) > 1)):
            await self._answered.park()

    async def answer_in_order(self, record: Callable[[T, int], Awaitable[None]]) -> None:
        """A task of the connection: wait for the oldest read's answer, ``record(item, n)``
        with how many of its messages, from the first, may be acknowledged, and so on. At
        its end (cancelled, or ``record`` raised) the answers still in flight are forgotten:
        never acknowledged."""
        reads = self._reads
        try:
            while True:
                while not reads:
                    await self._answered.park()
                answer, n, nbytes, cost, item = reads[0]
                await record(item, await answer.wait())
                if not self.open:
                    return  # closed meanwhile: the rest is forgotten
                reads.popleft()  # only now: its answer is out (wait_answered)
                self._count -= n
                self._bytes -= nbytes
                self._give_back(cost)
                self._answered.unpark_all()
        finally:
            self.close()

    def _give_back(self, cost: int) -> None:
        if cost and self._release is not None:
            self._release(cost)

    async def wait_answered(self) -> None:
        """Wait until every read in flight is answered and recorded (or the flight closed)."""
        while self._reads and self.open:
            await self._answered.park()

    def close(self) -> None:
        """No answer can be given any more: forget those in flight, release their charge,
        wake whoever waits."""
        self.open = False
        for answer, _, _, cost, _ in self._reads:
            answer.forget()
            self._give_back(cost)
        self._reads.clear()
        self._count = self._bytes = 0
        self._answered.unpark_all()
