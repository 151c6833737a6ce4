"""How long each store operation takes: one histogram a store, by operation, kept by the store
itself (metrics.py collects it at scrape time), and the recent window `availability status`
judges a store slow by. On the hot path an operation costs a perf_counter pair and one
observe on a histogram child bound once per operation."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Histogram
from prometheus_client.core import Metric

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""The latency buckets of every histogram the service exports."""

_INF = float("inf")


@dataclass(frozen=True)
class Recent:
    """The operations of a recent window, every operation of the store together."""

    operations: int
    mean_seconds: float
    p99_seconds: float
    """As Prometheus's histogram_quantile reads it: interpolated within the bucket."""


class StoreTimes:
    """One store's `availability_<store>_seconds{op}`. Operations are names the code gives
    (a script, a query method), so the series stay bounded."""

    def __init__(self, name: str, documentation: str, window: int = 5) -> None:
        """window: how many `mark`s the recent window spans (the server marks at each
        announcement, every 2 s: about server.RECENT_SECONDS)."""
        self._histogram = Histogram(name, documentation, ["op"], buckets=BUCKETS, registry=None)
        self._children: dict[str, Histogram] = {}
        self._marks: deque[tuple[list[float], float]] = deque(maxlen=window + 1)

    def op(self, name: str) -> Histogram:
        """The child to observe `name` with: bind it once, observe it per operation."""
        return self._histogram.labels(name)

    def observe(self, name: str, seconds: float) -> None:
        child = self._children.get(name)
        if child is None:
            child = self._children[name] = self.op(name)
        child.observe(seconds)

    def collect(self) -> Iterable[Metric]:
        return self._histogram.collect()

    def _totals(self) -> tuple[list[float], float]:
        """Cumulative counts per bucket and the sum, over every operation."""
        counts = [0.0] * (len(BUCKETS) + 1)
        total = 0.0
        for family in self._histogram.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    at = len(BUCKETS) if bound == _INF else BUCKETS.index(bound)
                    counts[at] += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
        return counts, total

    def mark(self) -> Recent:
        """Note the totals now (every ANNOUNCE_SECONDS); the operations since the oldest
        mark kept, as one Recent."""
        self._marks.append(self._totals())
        (first, first_sum), (last, last_sum) = self._marks[0], self._marks[-1]
        window = [b - a for a, b in zip(first, last, strict=True)]
        count = window[-1]
        if count <= 0:
            return Recent(0, 0.0, 0.0)
        return Recent(int(count), (last_sum - first_sum) / count, quantile(0.99, window))


def quantile(q: float, cumulative: list[float]) -> float:
    """histogram_quantile over cumulative bucket counts of BUCKETS and +Inf (a rank in the
    +Inf bucket reads as the highest bound)."""
    rank = q * cumulative[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip((*BUCKETS, _INF), cumulative, strict=True):
        if count >= rank:
            if bound == _INF:
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower
