"""The counters every component updates, and the shutdown ledger computed from them.

Counters are plain integers bumped once per batch (never per message on the hot path). The
shutdown ledger and the metrics endpoint read these same objects, so they always agree.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ._histogram import LatencyHistogram

__all__ = ("Ledger", "PumpCounters", "SourceCounters")


@dataclass(slots=True, eq=False)
class SourceCounters:
    """What one listener has seen."""

    transport: str
    listener: str
    received: int = 0
    """Messages handed to the queue (accepted, or silently dropped by its policy)."""
    received_bytes: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages or connections refused with an answer to the sender, by reason."""
    abandoned: int = 0
    """Messages read but still waiting for room when the connection was cancelled."""
    connections_active: int = 0
    connections_total: int = 0


@dataclass(slots=True, eq=False)
class PumpCounters:
    """What the pump (queue -> processor -> sink) has done."""

    delivered: int = 0
    filtered: int = 0
    """Messages the processor dropped on purpose (returned None)."""
    failed: Counter[str] = field(default_factory=Counter)
    """Messages the processor raised on, by exception type name."""
    sink_failed: int = 0
    """Messages given up after the sink's retry budget ran out."""
    dead_lettered: int = 0
    """Messages the destination refused for good (or given up), written to the dead letter."""
    refused: int = 0
    """Messages the destination refused for good, with no dead letter to take them."""
    sink_batches: int = 0
    sink_errors: int = 0
    """Failed attempts to send a batch (each retry that failed counts once)."""
    sink_retries: int = 0
    abandoned: int = 0
    """Messages still queued or in flight when the drain deadline passed."""
    batch_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Time of each successful sink send (one observation per batch)."""


@dataclass(frozen=True, slots=True)
class Ledger:
    """Where every received message went. ``received == delivered + dropped + abandoned``."""

    received: int
    delivered: int
    dropped: Mapping[str, int]
    """By reason: ``drop_newest``, ``drop_oldest`` (queue policy), ``filtered``,
    ``processor_error``, ``sink_failed``."""
    abandoned: int
    rejected: Mapping[str, int]
    """Refused at the door with an answer to the sender (never counted as received)."""
    recovered: int = 0
    """Messages a disk queue held from before this start (received by an earlier run)."""
    kept: int = 0
    """Messages a disk queue keeps for the next start (not lost: not abandoned)."""

    @property
    def balanced(self) -> bool:
        return self.received + self.recovered == (
            self.delivered + sum(self.dropped.values()) + self.abandoned + self.kept
        )

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "received": self.received,
            "delivered": self.delivered,
            "dropped": dict(self.dropped),
            "abandoned": self.abandoned,
            "rejected": dict(self.rejected),
        }
        # Only a disk queue has these: a memory queue's ledger reads as it always did.
        if self.recovered or self.kept:
            out["recovered"] = self.recovered
            out["kept"] = self.kept
        out["balanced"] = self.balanced
        return out

    def to_json(self) -> str:
        return json.dumps({"ledger": self.as_dict()}, sort_keys=False)

    @classmethod
    def compute(
        cls,
        sources: Iterable[SourceCounters],
        pump: PumpCounters,
        queue_dropped: Mapping[str, int],
        queue_depth: int,
        *,
        recovered: int = 0,
        kept: int = 0,
    ) -> Ledger:
        """Build the ledger from the live counters (``queue_depth`` counts as abandoned;
        a disk queue's ``recovered`` and ``kept`` balance as described on the fields)."""
        received = 0
        abandoned = pump.abandoned + queue_depth
        rejected: Counter[str] = Counter()
        for counters in sources:
            received += counters.received
            abandoned += counters.abandoned
            rejected.update(counters.rejected)
        dropped = {
            "drop_newest": queue_dropped.get("drop_newest", 0),
            "drop_oldest": queue_dropped.get("drop_oldest", 0),
            "filtered": pump.filtered,
            "processor_error": sum(pump.failed.values()),
            "sink_failed": pump.sink_failed,
        }
        # Shown when not 0, so a gateway without poison batches prints the ledger it always did.
        if pump.dead_lettered:
            dropped["dead_letter"] = pump.dead_lettered
        if pump.refused:
            dropped["refused"] = pump.refused
        return cls(
            received=received,
            delivered=pump.delivered,
            dropped=dropped,
            abandoned=abandoned,
            rejected=dict(rejected),
            recovered=recovered,
            kept=kept,
        )
