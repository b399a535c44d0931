"""Read deadlines for many connections, without a cancel scope per read.

A connection's reads are bounded by a deadline (``idle_timeout`` since the last complete
frame: a client that goes quiet, or one that trickles a frame byte by byte, is cut). The
plain way is ``with trio.CancelScope(deadline=...)`` around each read; entering and leaving
a cancel scope costs about a quarter of a small read's time: the WebSocket source alone
went from 55 to 49 us of CPU a message at 10,000 one-message reads a second, and from 126
to 96 at 1,000, with this instead (``python -m bench.chat_paths --paths source``, medians
of three interleaved rounds; docs/websocket.md).

Here one task per listener, the :class:`Reaper`, keeps the connections' deadlines in a heap
and cancels a connection's scope only when its deadline has passed while it waits in a read.
The connection runs its reads inside one scope for as long as nothing cuts it
(:class:`ReadWatch` says how); an offer that waits for room in the queue is never cut.

The race this must get right: the reaper runs while the reader task is suspended; if the
read has already completed (the task is rescheduled and has not run yet) when the reaper
cancels, the reader still gets its bytes (nothing in a read checkpoints after the wait), sees
``cancel_called`` before its next checkpoint, and leaves the cancelled scope at once for a
fresh one: what it read is handled, as with a deadline scope around the read.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio

__all__ = ("ReadWatch", "Reaper")


class ReadWatch:
    """One connection's reads: its ``deadline`` (``trio.current_time()`` based), whether it
    is ``waiting`` in a read now, and the cancel ``scope`` its reads run in."""

    __slots__ = ("_armed", "_closed", "_reaper", "deadline", "scope", "waiting")

    def __init__(self, reaper: Reaper, deadline: float) -> None:
        self._reaper = reaper
        self._armed = False
        self._closed = False
        self.deadline = deadline
        self.scope = trio.CancelScope()
        self.waiting = False

    def expired(self) -> bool:
        """Whether the deadline has passed (checked before each read: a connection busy
        elsewhere, in an offer that waited, is not cut there)."""
        return trio.current_time() >= self.deadline

    def arm(self) -> None:
        """Make sure the reaper looks at this connection by its deadline (before a read)."""
        if not self._armed:
            self._armed = True
            self._reaper.watch(self)

    def disarm(self) -> None:
        self._armed = False

    def close(self) -> None:
        """The connection is done: its heap entry is dead weight from now on."""
        if not self._closed:
            self._closed = True
            if self._armed:
                self._reaper.dead()


class Reaper:
    """The deadlines of one listener's connections; :meth:`run` is its task."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ReadWatch]] = []
        self._dead = 0  # entries of connections that ended
        self._order = itertools.count()
        self._wakeup = trio.Event()
        self._next = math.inf  # when run() looks next

    def dead(self) -> None:
        """A watched connection ended. Its entry would stay until its deadline, so a flood of
        short connections could grow the heap for a whole idle period: once the dead are
        most of it, the heap is rebuilt from the living (amortised: each rebuild follows at
        least as many ends as it keeps)."""
        self._dead += 1
        heap = self._heap
        if self._dead > 64 and 2 * self._dead > len(heap):
            heap[:] = [entry for entry in heap if not entry[2]._closed]
            heapq.heapify(heap)
            self._dead = 0

    def watch(self, watch: ReadWatch) -> None:
        heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
        if watch.deadline < self._next:
            self._wakeup.set()

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, watch = heapq.heappop(heap)
                if watch._closed:
                    self._dead = max(0, self._dead - 1)
                elif watch.deadline > now:  # pushed back by frames since: look again then
                    heapq.heappush(heap, (watch.deadline, next(self._order), watch))
                elif watch.waiting:
                    watch.disarm()
                    watch.scope.cancel()
                else:  # busy elsewhere: the next read checks its deadline, and re-arms
                    watch.disarm()
            self._next = heap[0][0] if heap else math.inf
            self._wakeup = trio.Event()
            with trio.move_on_at(self._next):
                await self._wakeup.wait()
