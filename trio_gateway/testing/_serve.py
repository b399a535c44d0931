"""Serve one source into a queue, without a Gateway: the way to test a source on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._ingress import Ingress
from .._ledger import SourceCounters
from ..queues import OverflowPolicy, Queue, RingBuffer
from ..sources._base import Source, format_peer

__all__ = ("ServedSource", "serve_source")


class ServedSource:
    """A source listening on its own (see :func:`serve_source`): its addresses, queue and
    counters, and a way to start its shutdown early."""

    def __init__(
        self, source: Source, queue: Queue[bytes], ingress: Ingress, stopping: trio.Event
    ) -> None:
        self.source = source
        self.queue = queue
        """The queue the source feeds; nothing consumes it but the test."""
        self.ingress = ingress
        """The :class:`~trio_gateway.Ingress` the source was given."""
        self.bound: list[tuple[str, int]] = []
        """Every ``(host, port)`` the source bound (a ``port=0`` source reports the real port)."""
        self._stopping = stopping

    @property
    def counters(self) -> SourceCounters:
        """The source's live counters: ``received``, ``rejected`` (by reason), ``abandoned``,
        ``connections_active``, ``connections_total``."""
        return self.ingress.counters

    @property
    def address(self) -> tuple[str, int]:
        """The first bound address, for a client to connect to."""
        if not self.bound:
            raise LookupError(f"{self.source!r} binds nothing")
        return self.bound[0]

    @property
    def port(self) -> int:
        """The first bound port."""
        return self.address[1]

    @property
    def target(self) -> str:
        """The first bound address as ``host:port`` (IPv6 in brackets): what a gRPC channel
        or a TCP client is given."""
        return format_peer(self.address)

    @property
    def url(self) -> str:
        """``scheme://host:port/path`` for a source that has a scheme and a path (HTTP and
        WebSocket: ``http://127.0.0.1:39211/ingest``, ``wss://[::1]:40001/``)."""
        scheme = getattr(self.source, "scheme", None)
        path = getattr(self.source, "path", None)
        if not isinstance(scheme, str) or not isinstance(path, str):
            raise AttributeError(f"{self.source!r} has no URL (no scheme and path)")
        return f"{scheme}://{self.target}{path}"

    def payloads(self) -> list[bytes]:
        """Take every payload queued so far, oldest first (empties the queue)."""
        if not len(self.queue):
            return []
        return self.queue.get_batch_nowait(len(self.queue))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Start the source's shutdown, as a gateway's would: the listener closes and open
        connections get the grace period. Leaving the ``async with`` block does this too."""
        self._stopping.set()


@asynccontextmanager
async def serve_source(
    source: Source,
    queue: Queue[bytes] | None = None,
    *,
    capacity: int = 10_000,
    policy: OverflowPolicy = "block",
    grace_period: float = 1.0,
) -> AsyncIterator[ServedSource]:
    """Run ``source`` into ``queue`` for the duration of an ``async with`` block.

    No gateway, no pump and no sink: what the source accepts stays in the queue for the test to
    take (:meth:`ServedSource.payloads`), so a test can assert exactly what a client's bytes
    became, and what the source counted (:attr:`ServedSource.counters`). Without ``queue``, a
    :class:`~trio_gateway.RingBuffer` of ``capacity`` with ``policy`` is used; pass a small one
    to test what a sender sees when the queue is full. The block starts once the source
    listens; leaving it starts the shutdown (``grace_period`` for open connections) and waits
    for the source to return. An exception from the block cancels the source and propagates as
    it is (not in an exception group)::

        async with serve_source(HttpSource(port=0)) as served:
            async with httpx.AsyncClient() as client:
                await client.post(served.url, content=b"hello")
            assert served.payloads() == [b"hello"]
            assert served.counters.received == 1
    """
    if queue is None:
        queue = RingBuffer(capacity, policy=policy)
    stopping = trio.Event()
    counters = SourceCounters(source.transport, source.label)
    ingress = Ingress(queue, counters, stopping, grace_period=grace_period)
    served = ServedSource(source, queue, ingress, stopping)
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        bound: Any = await nursery.start(source.run, ingress)
        served.bound = [tuple(address) for address in bound]
        counters.listener = source.label  # named by the port it got, as the gateway does
        try:
            yield served
        except Exception as exc:
            error = exc
            nursery.cancel_scope.cancel()
        finally:
            stopping.set()
    if error is not None:
        raise error
