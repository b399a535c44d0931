"""MemorySource: a source that the test feeds by calling methods instead of opening sockets."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from .._errors import ConfigurationError, FrameTooLarge
from .._ingress import Ingress
from .._ledger import SourceCounters
from .._message import Origin
from ..sources._base import DEFAULT_MAX_MESSAGE_SIZE, Source

__all__ = ("MemorySource",)


class _Send:
    """One :meth:`MemorySource.send_many` call waiting for room."""

    __slots__ = ("cancel_mark", "finished", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.finished = trio.Event()
        self.cancel_mark: int | None = None


_State = Literal["idle", "running", "closed"]


class MemorySource(Source):
    """An in-memory source: ``await source.send(b"...")`` plays a client sending one message.

    It goes through the same :class:`~trio_gateway.Ingress` as the network sources, so it sees
    the same backpressure and is counted the same way:

    * :meth:`send` / :meth:`send_many` use ``Ingress.offer``, like the TCP source: under the
      ``block`` policy a full queue makes them wait until the pump makes room. They are
      checkpoints (like a network read), so the pump may run between two ``send`` calls; one
      :meth:`send_many` puts a whole burst in at once (like one read carrying many frames).
    * :meth:`send_nowait` / :meth:`send_many_nowait` use ``Ingress.offer_nowait``, like the UDP
      source: they never wait; under ``block`` what does not fit is refused (counted as
      rejected ``queue_full``).
    * :meth:`send_or_reject` uses ``Ingress.offer_or_reject``, like the HTTP and gRPC
      sources: it waits at most ``timeout`` for room and rejects the rest, so the test can
      check what a sender would be told (HTTP 503).

    A payload over ``max_message_size`` is refused like the TCP source refuses an oversized
    frame: counted as rejected ``oversize``, and the call raises
    :class:`~trio_gateway.FrameTooLarge` without offering any payload of that call.

    When the gateway shuts down, new sends raise :class:`trio.ClosedResourceError`; sends
    still waiting for room get the gateway's grace period, then are cancelled the way a real
    source cancels its connections: the call returns how many of its payloads were queued, and
    the rest are counted as abandoned.

    A source serves one gateway at a time; it can serve another one after the first stopped.
    """

    transport = "memory"

    def __init__(
        self,
        name: str = "memory",
        *,
        peer: str = "test",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if not name:
            raise ConfigurationError("memory.name", "must not be empty")
        super().__init__(name, 0, max_message_size=max_message_size)
        self.name = name
        self.peer = peer
        self.bound: list[tuple[str, int]] = []
        self._state: _State = "idle"
        self._ingress: Ingress | None = None
        self._counters: SourceCounters | None = None
        self._sending: dict[trio.CancelScope, _Send] = {}
        self._idle = trio.Event()
        self._idle.set()

    @property
    def label(self) -> str:
        """``memory:<name>``: the listener's name in the ledger, metrics and origins."""
        return f"memory:{self.name}"

    @property
    def running(self) -> bool:
        """True while attached to a gateway that is not shutting down."""
        return self._state == "running"

    @property
    def counters(self) -> SourceCounters:
        """This source's live counters in the gateway it serves (or served last)."""
        if self._counters is None:
            raise RuntimeError(f"{self.label} has not been started by a gateway")
        return self._counters

    @property
    def sending(self) -> int:
        """How many :meth:`send` calls are waiting for room right now."""
        return len(self._sending)

    # -- the Source contract --------------------------------------------------------------

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept sends until the gateway stops; then grace period, then cancel waiting sends."""
        if self._state == "running":
            raise RuntimeError(f"{self.label} already serves a gateway")
        self._state = "running"
        self._ingress = ingress
        self._counters = ingress.counters
        self.bound = []
        try:
            task_status.started([])
            await ingress.wait_stopping()
        finally:
            self._state = "closed"
            with trio.CancelScope(shield=True):
                await self._finish_sends(ingress.grace_period)

    async def _finish_sends(self, grace_period: float) -> None:
        with trio.move_on_after(grace_period):
            await self._idle.wait()
        # Cut the rest off one at a time, so each one can tell exactly how many of its
        # payloads Ingress.offer counted as abandoned.
        with trio.move_on_after(1.0):
            while self._sending:
                send = next(iter(self._sending.values()))
                send.cancel_mark = self.counters.abandoned
                send.scope.cancel()
                await send.finished.wait()

    # -- sending --------------------------------------------------------------------------

    def _check(self, payloads: Sequence[bytes]) -> Ingress:
        ingress = self._ingress
        if self._state == "idle" or ingress is None:
            raise RuntimeError(f"{self.label} is not running: start a gateway with it first")
        if self._state == "closed":
            raise trio.ClosedResourceError(f"{self.label}: the gateway is shutting down")
        if payloads:
            largest = max(map(len, payloads))
            if largest > self.max_message_size:
                ingress.reject("oversize", len(payloads))
                raise FrameTooLarge(largest, self.max_message_size)
        return ingress

    def _origin(self, peer: str | None) -> Origin:
        return Origin(self.transport, self.label, self.peer if peer is None else peer, time.time())

    async def send(self, payload: bytes, *, peer: str | None = None) -> bool:
        """Send one message, waiting for room under ``block``. True if it is queued.

        False means the queue's policy dropped it (``drop_newest``) or it was abandoned at
        shutdown.
        """
        return await self.send_many((payload,), peer=peer) == 1

    async def send_many(self, payloads: Sequence[bytes], *, peer: str | None = None) -> int:
        """Send a burst in one offer (like one read with many frames); returns how many queued."""
        await checkpoint_if_cancelled()
        ingress = self._check(payloads)
        send = _Send()
        done = 0
        with send.scope:
            self._sending[send.scope] = send
            if self._idle.is_set():
                self._idle = trio.Event()
            try:
                done = await ingress.offer(payloads, self._origin(peer))
            finally:
                del self._sending[send.scope]
                if not self._sending:
                    self._idle.set()
                if send.cancel_mark is not None:
                    # Cut off at shutdown: offer counted what it could not queue as abandoned.
                    done = len(payloads) - (self.counters.abandoned - send.cancel_mark)
                send.finished.set()
        if not send.scope.cancelled_caught:
            await cancel_shielded_checkpoint()
        return done

    def send_nowait(self, payload: bytes, *, peer: str | None = None) -> bool:
        """Send one message without waiting (like a UDP datagram). True if it is queued."""
        return self.send_many_nowait((payload,), peer=peer) == 1

    def send_many_nowait(self, payloads: Sequence[bytes], *, peer: str | None = None) -> int:
        """Send a burst without waiting; returns how many are queued.

        Under ``drop_newest`` / ``drop_oldest`` the queue drops and counts as usual; under
        ``block`` what does not fit now is refused and counted as rejected ``queue_full``.
        """
        ingress = self._check(payloads)
        return ingress.offer_nowait(payloads, self._origin(peer))

    async def send_or_reject(
        self,
        payloads: Sequence[bytes],
        *,
        timeout: float = 0.0,  # noqa: ASYNC109 - a bound on waiting for room, like Ingress
        peer: str | None = None,
    ) -> int:
        """Send what fits within ``timeout`` (seconds); the rest is rejected (``queue_full``).

        Returns how many were accepted: what an HTTP or gRPC source would answer its sender.
        """
        await checkpoint_if_cancelled()
        ingress = self._check(payloads)
        done = await ingress.offer_or_reject(payloads, self._origin(peer), timeout=timeout)
        await cancel_shielded_checkpoint()
        return done
