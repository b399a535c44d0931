"""One memory budget: every byte a peer can make the gateway hold, charged to one account.

The budget (``limits.max_memory``, ``serve --max-memory``; 256 MiB by default) is split in two:

* **the queue's share**: what is queued, bounded by the queue's own ``max_bytes``, which
  defaults to half the budget (:attr:`MemoryBudget.queue_bytes`);
* **the held pool** (the rest): what is outside the queue and in the gateway's hands, charged
  here as it comes and goes: the bytes a connection has read and not yet queued (a TCP read and
  its partial frame; once the pool is :attr:`~MemoryBudget.crowded`, a read only once its peer
  has sent, so idle connections cannot take it all; a WebSocket message still in fragments, an
  HTTP body being read) and the
  batch the pump has taken from the queue and not yet delivered.

Queued plus held never exceeds the budget, so neither can the payload bytes a gateway holds.
Within the pool, a connection takes at most :attr:`MemoryBudget.connection_share` (a
sixteenth), so one peer cannot take all of it. A source charges through a
:class:`ConnectionShare` (one per connection; ``with`` releases all of it at the end):
:meth:`~ConnectionShare.hold_nowait` for transports that refuse (HTTP ``503``, WebSocket close
``1013``, counted ``over_budget``), :meth:`~ConnectionShare.hold` for those that stop reading
(TCP: the kernel's window then pushes back). The pump charges its batch with
:meth:`MemoryBudget.charge`, which never refuses (the batch is already out of the queue); while
it is over, the connections wait or refuse.

Accounting is per read or per batch, never per message, and waiting uses a parking lot (no
polling).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import trio
from trio.lowlevel import ParkingLot

from ._errors import ConfigurationError

__all__ = ("DEFAULT_MAX_MEMORY", "BudgetStatistics", "ConnectionShare", "MemoryBudget")

DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
"""The default budget: 256 MiB."""
_CONNECTION_FRACTION = 16
"""A connection holds at most 1/16 of the held pool."""


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    """A snapshot of a :class:`MemoryBudget`."""

    max_memory: int
    queue_bytes: int
    """The queue's share (its ``max_bytes``)."""
    pool: int
    """What may be held outside the queue: ``max_memory - queue_bytes``."""
    connection_share: int
    held: int
    """Bytes charged now: :attr:`connections` plus :attr:`batch`."""
    connections: int
    """Of :attr:`held`, what connections hold (partial reads, bodies, fragments)."""
    batch: int
    """Of :attr:`held`, the batch the pump has in hand."""
    peak: int
    """The most ever held at once."""
    waiting: int
    """Connections waiting for room (TCP, stopped reading)."""


class MemoryBudget:
    """The gateway-wide account (see the module docstring).

    ``queue_bytes`` is the queue's share: the queue's ``max_bytes`` if it has one (it must be
    less than ``max_memory``), else half of ``max_memory``.
    """

    def __init__(self, max_memory: int = DEFAULT_MAX_MEMORY, *, queue_bytes: int | None = None):
        if not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory < 1:
            raise ConfigurationError(
                "limits.max_memory", f"must be a positive integer, got {max_memory!r}"
            )
        if queue_bytes is None:
            queue_bytes = max_memory // 2
        if queue_bytes >= max_memory:
            raise ConfigurationError(
                "queue.max_bytes",
                f"{queue_bytes} leaves nothing of limits.max_memory ({max_memory}) for the "
                "connections and the sink's batch; make it smaller",
            )
        self.max_memory = max_memory
        self.queue_bytes = queue_bytes
        self.pool = max_memory - queue_bytes
        self.connection_share = max(1, self.pool // _CONNECTION_FRACTION)
        self.held = 0
        self.connections_held = 0
        """Of :attr:`held`, what :class:`ConnectionShare` objects hold (the rest is batches)."""
        self.peak = 0
        self._room = ParkingLot()

    def check_message_size(self, key: str, max_message_size: int) -> None:
        """Refuse a source whose largest message could never fit in a connection's share."""
        if max_message_size > self.connection_share // 2:
            raise ConfigurationError(
                "limits.max_memory",
                f"{self.max_memory} is too small for {key} = {max_message_size}: a connection "
                f"may hold {self.connection_share} bytes (1/{_CONNECTION_FRACTION} of what is "
                "not the queue's), which must fit two such messages",
            )

    # -- the gateway-wide account ---------------------------------------------------------

    def _fits(self, more: int) -> bool:
        return self.held + more <= self.pool

    def _add(self, n: int) -> None:
        self.held += n
        if self.held > self.peak:
            self.peak = self.held

    @property
    def crowded(self) -> bool:
        """Whether half the held pool is taken: then a stream connection waiting for its
        peer holds only what it has, not the read it would make (TCP)."""
        return self.held > self.pool // 2

    def charge(self, n: int) -> None:
        """Charge ``n`` bytes that are already in hand (the pump's batch): never refused."""
        self._add(n)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes charged earlier; wakes whoever waits for room."""
        self.held -= n
        if self._room:
            self._room.unpark_all()

    def connection(self) -> ConnectionShare:
        """A new connection's share of the pool (``with`` it, to release it at the end)."""
        return ConnectionShare(self)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            max_memory=self.max_memory,
            queue_bytes=self.queue_bytes,
            pool=self.pool,
            connection_share=self.connection_share,
            held=self.held,
            connections=self.connections_held,
            batch=self.held - self.connections_held,
            peak=self.peak,
            waiting=len(self._room),
        )

    def __repr__(self) -> str:
        return f"<MemoryBudget held {self.held}/{self.pool} (+{self.queue_bytes} queue)>"


class ConnectionShare:
    """What one connection holds, charged to its :class:`MemoryBudget`.

    A connection says how much it holds now (not how much more): :meth:`hold_nowait` and
    :meth:`hold` set its charge, growing it only if both its share and the budget have room;
    shrinking always succeeds. :meth:`close` (or leaving the ``with`` block) releases it all.
    """

    __slots__ = ("budget", "held")

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def hold_nowait(self, n: int) -> bool:
        """Hold ``n`` bytes in all; False (nothing changed) if the share or the budget has no
        room: the caller refuses in its protocol and counts ``over_budget``."""
        more = n - self.held
        budget = self.budget
        if more > 0 and (n > budget.connection_share or not budget._fits(more)):
            return False
        self._set(n)
        return True

    async def hold(self, n: int) -> None:
        """Hold ``n`` bytes in all, waiting for room in the budget (a stream source stops
        reading meanwhile; it tries :meth:`hold_nowait` first, to count the pause). A
        connection is charged at most its share: the gateway checks that the largest message
        fits in half of it, and a read size that would not leaves the reads themselves to
        bound the rest."""
        budget = self.budget
        n = min(n, budget.connection_share)
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.hold_nowait(n):
            await budget._room.park()

    def close(self) -> None:
        """Release everything this connection held."""
        self._set(0)

    def _set(self, n: int) -> None:
        more = n - self.held
        self.budget.connections_held += more
        if more > 0:
            self.budget._add(more)
        elif more < 0:
            self.budget.release(-more)
        self.held = n

    def __enter__(self) -> ConnectionShare:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
