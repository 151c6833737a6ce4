"""What every benchmark case shares: a result row, timing, and throwaway stores."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Row:
    """One line of bench/RESULTS.md."""

    case: str
    figure: str
    comparison: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def median_ms(call: Callable[[], Awaitable[object]], runs: int, warmup: int = 3) -> float:
    """Median wall time of call in milliseconds, after a few unmeasured warm-up runs."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def timed_s(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started
