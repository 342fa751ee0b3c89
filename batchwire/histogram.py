"""A fixed-bucket histogram cheap enough for the hot path (one bisect and two adds)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

#: Latency bucket upper bounds in seconds: 100 µs to 10 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS_S: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Counts of observations per bucket (`le` upper bounds, Prometheus-style), plus their sum.

    Not locked: update it from one thread (the event loop); readers (a metrics scrape) may
    see a count and a sum that are one observation apart, which Prometheus tolerates.

    Args:
        bounds_s: increasing bucket upper bounds in seconds; an implicit +Inf bucket follows.
    """

    __slots__ = ("bounds_s", "_bounds_ns", "counts", "sum_ns")

    def __init__(self, bounds_s: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        if list(bounds_s) != sorted(set(bounds_s)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds_s = tuple(bounds_s)
        self._bounds_ns = tuple(round(b * 1e9) for b in bounds_s)
        self.counts = [0] * (len(bounds_s) + 1)
        self.sum_ns = 0

    def observe_ns(self, ns: int) -> None:
        """Add one observation of `ns` nanoseconds."""
        self.counts[bisect_left(self._bounds_ns, ns)] += 1
        self.sum_ns += ns

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, observations <= it) per bucket, ending with +Inf."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds_s, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
