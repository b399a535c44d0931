"""Run a Gateway inside a test: a handle with its addresses, statistics, ledger and shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .._errors import ConfigurationError
from .._gateway import Gateway
from .._ledger import Ledger
from ..queues import QueueStatistics
from ..sinks._base import Sink
from ..sources._base import Source

__all__ = (
    "GatewayFactory",
    "GatewayHandle",
    "GatewayStatistics",
    "open_gateway",
    "start_gateway",
)


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    """A snapshot of a running (or finished) gateway, as returned by
    :meth:`GatewayHandle.statistics`."""

    state: str
    """``"running"``, ``"draining"`` or ``"stopped"``."""
    accepting: bool
    queue: QueueStatistics
    ledger: Ledger
    """The ledger so far (queued and in-flight messages count as abandoned until delivered)."""
    filtered: int
    failed: Mapping[str, int]
    """Messages the processor raised on, by exception type name."""
    sink_batches: int
    sink_errors: int
    sink_retries: int
    connections_active: int


class GatewayHandle:
    """A gateway running in a test's nursery (see :func:`start_gateway`, :func:`open_gateway`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.bound: tuple[list[tuple[str, int]], ...] = ()
        """Each source's bound ``(host, port)`` addresses, in the order of the sources."""
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    def address(self, source: int = 0) -> tuple[str, int]:
        """The first bound address of source number ``source`` (for a client to connect to)."""
        addresses = self.bound[source]
        if not addresses:
            raise LookupError(f"source {source} ({self.gateway.sources[source]!r}) binds nothing")
        return addresses[0]

    async def _run(self, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            with self._scope:
                await self.gateway.run(task_status=task_status)
        finally:
            self._stopped.set()

    # -- inspection -----------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The ledger so far; final once the gateway has stopped."""
        return self.gateway.ledger

    @property
    def stopped(self) -> bool:
        """True once the gateway's ``run`` has returned (its ledger is final)."""
        return self._stopped.is_set()

    def statistics(self) -> GatewayStatistics:
        gateway = self.gateway
        pump = gateway.pump_counters
        return GatewayStatistics(
            state=gateway.state,
            accepting=gateway.accepting,
            queue=gateway.queue.statistics(),
            ledger=gateway.ledger,
            filtered=pump.filtered,
            failed=dict(pump.failed),
            sink_batches=pump.sink_batches,
            sink_errors=pump.sink_errors,
            sink_retries=pump.sink_retries,
            connections_active=sum(c.connections_active for c in gateway.source_counters),
        )

    # -- stopping -------------------------------------------------------------------------

    async def shutdown(self) -> Ledger:
        """Start the graceful shutdown and wait for it; returns the final ledger."""
        self.gateway.shutdown()
        return await self.wait_stopped()

    async def wait_stopped(self) -> Ledger:
        """Wait until the gateway has stopped (after a shutdown, abort or cancel); its ledger."""
        await self._stopped.wait()
        return self.gateway.ledger

    def cancel(self) -> None:
        """Cancel the scope the gateway runs in, as a parent's cancellation would.

        The gateway still flushes (shielded, bounded by its ``drain_timeout``) before it stops.
        """
        self._scope.cancel()

    def abort(self) -> None:
        """Stop at once: no grace period, no drain; what is left is counted as abandoned."""
        self.gateway.abort()


async def start_gateway(nursery: trio.Nursery, gateway: Gateway) -> GatewayHandle:
    """Run ``gateway`` in ``nursery`` and return its handle once every source listens.

    The gateway runs until :meth:`GatewayHandle.shutdown`, :meth:`~GatewayHandle.abort`,
    :meth:`~GatewayHandle.cancel` or the cancellation of ``nursery``; an exception from the
    gateway propagates into ``nursery`` (so it fails the test)::

        async with trio.open_nursery() as nursery:
            handle = await start_gateway(nursery, gateway)
            ...
            ledger = await handle.shutdown()
    """
    handle = GatewayHandle(gateway)
    handle.bound = tuple(await nursery.start(handle._run))
    return handle


@asynccontextmanager
async def open_gateway(gateway: Gateway) -> AsyncIterator[GatewayHandle]:
    """Run ``gateway`` for the duration of an ``async with`` block.

    Leaving the block normally shuts the gateway down gracefully and waits for its ledger (in
    :attr:`GatewayHandle.ledger`); leaving it with an exception cancels the gateway, which
    still flushes, and then the exception propagates as it is (not in an exception group)::

        async with open_gateway(Gateway(sources=[source], sink=sink)) as handle:
            await source.send(b"hello")
            await sink.wait_for(1)
        assert handle.ledger.balanced
    """
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        handle = await start_gateway(nursery, gateway)
        try:
            yield handle
        except Exception as exc:
            error = exc
            nursery.cancel_scope.cancel()
        else:
            gateway.shutdown()
    if error is not None:
        raise error


class GatewayFactory:
    """Builds gateways and runs them in one nursery (what the ``gateway_factory`` fixture is).

    ``await factory(**options)`` creates ``Gateway(sources=..., sink=..., **options)`` with the
    factory's default sources and sink unless given, starts it with :func:`start_gateway` and
    returns its handle. :meth:`aclose` shuts down every gateway it started that still runs
    and waits for them.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        sources: Sequence[Source] = (),
        sink: Sink | None = None,
    ) -> None:
        self._nursery = nursery
        self._sources = tuple(sources)
        self._sink = sink
        self.handles: list[GatewayHandle] = []
        """Every gateway started, in order."""

    async def __call__(
        self,
        *,
        sources: Sequence[Source] | None = None,
        sink: Sink | None = None,
        **options: Any,
    ) -> GatewayHandle:
        sources = self._sources if sources is None else sources
        sink = self._sink if sink is None else sink
        if sink is None:
            raise ConfigurationError("sink", "the factory has no default sink; pass sink=")
        gateway = Gateway(sources=sources, sink=sink, **options)
        handle = await start_gateway(self._nursery, gateway)
        self.handles.append(handle)
        return handle

    async def aclose(self) -> list[Ledger]:
        """Shut down every gateway still running, wait for them; return every final ledger."""
        for handle in self.handles:
            handle.gateway.shutdown()
        return [await handle.wait_stopped() for handle in self.handles]
