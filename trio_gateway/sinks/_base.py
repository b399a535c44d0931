"""The Sink contract: destinations take whole batches."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .._message import Batch

__all__ = ("Sink",)


class Sink(ABC):
    """A destination. The pump calls :meth:`open` once, :meth:`send` per batch, then :meth:`aclose`.

    ``send`` delivers the whole batch or raises :class:`~trio_gateway.SinkError` (or an
    ``OSError``); the pump then retries the same batch with backoff. A sink must therefore make
    a failed ``send`` safe to repeat: it may deliver a message twice, never lose one that it
    reported as sent.
    """

    name: str = "sink"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect or open the destination (called once, before the first batch)."""

    @abstractmethod
    async def send(self, batch: Batch) -> None:
        """Deliver ``batch`` (never empty).

        ``batch.payloads`` and ``batch.runs`` (origins by runs of messages) are the fast way
        in; iterating the batch yields ``(payload, origin)`` messages.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush and release the destination (called once, during shutdown, shielded)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
