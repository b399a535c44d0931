"""A fixed-bucket latency histogram cheap enough to update once per sink batch.

It imports nothing of the package, so the ledger's counters can hold one: the pump calls
:meth:`LatencyHistogram.observe` once per batch (one ``bisect`` and three additions) and the
metrics collector reads it at scrape time. Buckets are per-bucket counts here; the collector
turns them into Prometheus' cumulative ``le`` buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import pairwise

__all__ = ("DEFAULT_BATCH_BUCKETS", "LatencyHistogram")

DEFAULT_BATCH_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds in seconds, from 100 us (a batch to a null sink) to 10 s (a stalled sink)."""


class LatencyHistogram:
    """Counts observations per bucket; ``counts[i]`` holds values in ``(bounds[i-1], bounds[i]]``.

    ``counts`` has one more slot than ``bounds``: the last one holds values above every bound
    (Prometheus' ``+Inf`` bucket).
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BATCH_BUCKETS) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or any(b <= a for a, b in pairwise(ordered)):
            raise ValueError("histogram bounds must be a non-empty, strictly increasing sequence")
        if ordered[0] <= 0:
            raise ValueError("histogram bounds must be positive")
        self.bounds = ordered
        self.counts = [0] * (len(ordered) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one value (once per batch, never per message)."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper_bound, observations <= bound), ..., (inf, count)]`` as Prometheus wants."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={self.count} sum={self.sum:.6f}>"
