"""RecordingSink: a sink that keeps what it was given and fails, stalls or recovers on demand."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio
from trio.lowlevel import ParkingLot

from .._errors import ConfigurationError, SinkError
from .._message import Batch, Message, Origin
from ..sinks._base import Sink

__all__ = ("RecordingSink",)


class RecordingSink(Sink):
    """Records every batch the gateway's pump delivers, in order.

    Faults are switched on and off from the test, at any time:

    * :meth:`fail` makes the next ``times`` sends raise (default a
      :class:`~trio_gateway.SinkError`), then it works again: the pump retries with backoff;
    * :meth:`fail_forever` makes every send raise until :meth:`recover`;
    * :meth:`stall` makes sends wait (cancellably, like a destination that stopped
      answering) until :meth:`recover`; the queue fills up behind it;
    * :meth:`recover` clears every fault; a stalled send proceeds and is recorded.

    A failed or stalled-then-cancelled send records nothing, so a batch the pump retries is
    recorded once, when it succeeds. ``latency`` seconds are spent in every send (virtual time
    under ``autojump_clock``). At most ``max_records`` messages are kept (the oldest go first);
    :attr:`count` counts all of them.
    """

    def __init__(
        self, name: str = "recording", *, latency: float = 0.0, max_records: int = 1_000_000
    ) -> None:
        if latency < 0:
            raise ConfigurationError("recording.latency", "must not be negative")
        if max_records < 1:
            raise ConfigurationError("recording.max_records", "must be at least 1")
        self.name = name
        self.latency = latency
        self._records: deque[Message] = deque(maxlen=max_records)
        self._batch_sizes: deque[int] = deque(maxlen=max_records)
        self.count = 0
        """Messages delivered so far (including any no longer kept)."""
        self.attempts = 0
        """Sends that finished, delivered or failed (a stalled send counts once it ends)."""
        self.failures = 0
        """Calls of :meth:`send` that raised an injected error."""
        self.opened = 0
        """Calls of :meth:`open`."""
        self.closed = False
        """True once the pump called :meth:`aclose` (at the end of the shutdown)."""
        self._fail_times = 0
        self._fail_forever = False
        self._error: Callable[[], BaseException] = _default_error
        self._stalled = False
        self._recovered = trio.Event()
        self._stalled_sends = 0
        self._changed = ParkingLot()

    # -- what was delivered ---------------------------------------------------------------

    @property
    def items(self) -> list[Message]:
        """Every kept message (a ``(payload, origin)`` named tuple), in delivery order."""
        return list(self._records)

    @property
    def payloads(self) -> list[bytes]:
        """Every kept payload, in delivery order."""
        return [payload for payload, _ in self._records]

    @property
    def origins(self) -> list[Origin]:
        """The origin of every kept message, in delivery order."""
        return [origin for _, origin in self._records]

    @property
    def batch_sizes(self) -> list[int]:
        """The size of every batch delivered, in order (how the pump batched)."""
        return list(self._batch_sizes)

    @property
    def stalled(self) -> bool:
        """True while :meth:`stall` is in effect."""
        return self._stalled

    @property
    def waiting(self) -> int:
        """How many sends are held by :meth:`stall` right now."""
        return self._stalled_sends

    def clear(self) -> None:
        """Forget what was recorded (counters stay)."""
        self._records.clear()
        self._batch_sizes.clear()

    # -- fault injection ------------------------------------------------------------------

    def fail(self, times: int = 1, *, error: Callable[[], BaseException] | None = None) -> None:
        """Make the next ``times`` sends raise ``error()`` (default: a :class:`SinkError`)."""
        if times < 1:
            raise ValueError("times must be at least 1")
        self._fail_times = times
        self._fail_forever = False
        self._error = error or _default_error

    def fail_forever(self, *, error: Callable[[], BaseException] | None = None) -> None:
        """Make every send raise ``error()`` until :meth:`recover`."""
        self._fail_forever = True
        self._error = error or _default_error

    def stall(self) -> None:
        """Make sends wait until :meth:`recover` (they stay cancellable)."""
        if not self._stalled:
            self._stalled = True
            self._recovered = trio.Event()

    def recover(self) -> None:
        """Clear every fault: failures stop, stalled sends go on."""
        self._fail_times = 0
        self._fail_forever = False
        self._stalled = False
        self._recovered.set()

    # -- waiting --------------------------------------------------------------------------

    async def wait_for(self, count: int) -> None:
        """Wait until at least ``count`` messages have been delivered in total."""
        await self._wait_until(lambda: self.count >= count)

    async def wait_stalled(self, sends: int = 1) -> None:
        """Wait until ``sends`` sends are held by :meth:`stall`."""
        await self._wait_until(lambda: self._stalled_sends >= sends)

    async def wait_attempts(self, attempts: int) -> None:
        """Wait until ``attempts`` sends have finished, delivered or failed."""
        await self._wait_until(lambda: self.attempts >= attempts)

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        await trio.lowlevel.checkpoint()
        while not condition():
            await self._changed.park()

    # -- the Sink contract ----------------------------------------------------------------

    async def open(self) -> None:
        self.opened += 1
        await trio.lowlevel.checkpoint()

    async def send(self, batch: Batch) -> None:
        await trio.lowlevel.checkpoint()
        if self.latency:
            await trio.sleep(self.latency)
        while self._stalled:
            self._stalled_sends += 1
            self._changed.unpark_all()
            try:
                await self._recovered.wait()
            finally:
                self._stalled_sends -= 1
        # From here on nothing awaits: when a waiter wakes up, the pump has already counted
        # this outcome (delivered, or failed and retrying).
        self.attempts += 1
        self._changed.unpark_all()
        if self._fail_forever or self._fail_times:
            if self._fail_times:
                self._fail_times -= 1
            self.failures += 1
            raise self._error()
        self._records.extend(batch)
        self._batch_sizes.append(len(batch))
        self.count += len(batch)

    async def aclose(self) -> None:
        self.closed = True
        self._changed.unpark_all()
        await trio.lowlevel.checkpoint()


def _default_error() -> BaseException:
    return SinkError("recording sink: injected failure")
