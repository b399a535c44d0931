"""The Sink contract: destinations take whole batches."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from .._message import Batch

__all__ = ("Sink", "connect_failure")


class Sink(ABC):
    """A destination. The pump calls :meth:`open` once, :meth:`send` per batch, then :meth:`aclose`.

    ``send`` delivers the whole batch or raises :class:`~trio_gateway.SinkError` (or an
    ``OSError``); the pump then retries the same batch with backoff. A sink must therefore make
    a failed ``send`` safe to repeat: it may deliver a message twice, never lose one that it
    reported as sent. A destination gone for good raises
    :class:`~trio_gateway.SinkUnavailable` instead: the gateway stops at once.
    """

    name: str = "sink"

    statistics_gauges: frozenset[str] = frozenset()
    """The keys of :meth:`statistics` that are levels (clients connected), not running
    counts: /metrics shows them as gauges, the others as ``_total`` counters."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Open the destination and check that it can work (called once, before the gateway
        is ready and before the first batch).

        Raise :class:`~trio_gateway.SinkUnavailable` naming the cause when it cannot (a
        missing directory, no permission, a refused connection): the gateway then fails at
        start, or waits for the destination (``sink_wait``), instead of reporting ready and
        retrying batches forever. Each sink checks what it can: the file sink opens its file,
        the TCP and NATS sinks connect, the HTTP sink connects (and shakes hands over TLS).
        """

    @abstractmethod
    async def send(self, batch: Batch) -> None:
        """Deliver ``batch`` (never empty).

        ``batch.payloads`` and ``batch.runs`` (origins by runs of messages) are the fast way
        in; iterating the batch yields ``(payload, origin)`` messages.

        A ``send`` that has nothing to wait for (the broadcast sink hands the batch to its
        clients' outboxes) may return without a checkpoint: the pump makes one per batch,
        its wait for the batch or a checkpoint when it did not wait. A scheduler pass costs
        a few microseconds, and a relay sends batches of one message.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush and release the destination (called once, during shutdown, shielded)."""

    def statistics(self) -> dict[str, int]:
        """What this sink counts of its own, beyond the pump's counters (rows written,
        messages stored...): /metrics shows each key as ``trio_gateway_sink_<key>_total``
        (a gauge, ``trio_gateway_sink_<key>``, for the keys of :attr:`statistics_gauges`).
        None by default."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def connect_failure(exc: BaseException) -> str:
    """A failed connect in a few words (``connection refused``), for :class:`SinkUnavailable`.

    ``trio.open_tcp_stream`` raises ``OSError("all attempts to connect ... failed")`` from a
    group of the real errors: the first one with an errno says what happened.
    """
    errors: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        errors = [*cause.exceptions, exc]
    elif cause is not None:
        errors = [cause, exc]
    for error in errors:
        if isinstance(error, OSError) and error.errno:
            # Trio's strerror carries the address too; the errno's own text is enough.
            reason = os.strerror(error.errno)
            return reason[:1].lower() + reason[1:]
    return str(exc) or repr(exc)
