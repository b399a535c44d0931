"""The combined shutdown ledger of ``serve --workers N``, and the pieces it is summed from."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._ledger import Ledger

__all__ = ("WorkersLedger", "ledger_from_event", "sum_ledgers", "sum_reports")


@dataclass(frozen=True, slots=True)
class WorkersLedger:
    """The combined shutdown ledger: the sum of the workers' ledgers.

    ``crashed`` counts worker runs that ended without a ledger of their own (killed, or
    crashed); their part comes from the last metrics scrape, what they had not delivered then
    counts as abandoned, and what they received after that scrape is in no count.
    """

    ledger: Ledger
    workers: int
    restarts: int
    crashed: int

    @property
    def balanced(self) -> bool:
        return self.ledger.balanced

    def as_dict(self) -> dict[str, object]:
        return {
            **self.ledger.as_dict(),
            "workers": self.workers,
            "restarts": self.restarts,
            "crashed": self.crashed,
        }

    def to_json(self) -> str:
        return json.dumps({"ledger": self.as_dict()})


def sum_ledgers(ledgers: Iterable[Ledger]) -> Ledger:
    received = delivered = abandoned = 0
    dropped: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for ledger in ledgers:
        received += ledger.received
        delivered += ledger.delivered
        abandoned += ledger.abandoned
        dropped.update(ledger.dropped)
        rejected.update(ledger.rejected)
    for reason in ("drop_newest", "drop_oldest", "filtered", "processor_error", "sink_failed"):
        dropped.setdefault(reason, 0)
    return Ledger(received, delivered, dict(dropped), abandoned, dict(rejected))


def ledger_from_event(data: Mapping[str, Any]) -> Ledger:
    """A worker's ``ledger`` event (its :meth:`Ledger.as_dict`) back into a :class:`Ledger`."""
    return Ledger(
        received=int(data["received"]),
        delivered=int(data["delivered"]),
        dropped={str(k): int(v) for k, v in dict(data["dropped"]).items()},
        abandoned=int(data["abandoned"]),
        rejected={str(k): int(v) for k, v in dict(data["rejected"]).items()},
    )


def sum_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The workers' reports of one pipeline (its ledger, its sinks' ledgers, its routes, as
    :meth:`Pipeline.report <trio_gateway.Pipeline.report>` makes them) summed: counts add up,
    key by key at every level; ``balanced`` holds when it held in every one."""
    total: dict[str, Any] = {}
    for report in reports:
        _add(total, report)
    return total


def _add(into: dict[str, Any], report: Mapping[str, Any]) -> None:
    for key, value in report.items():
        if isinstance(value, bool):
            into[key] = into.get(key, True) and value
        elif isinstance(value, int):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, Mapping):
            _add(into.setdefault(key, {}), value)
