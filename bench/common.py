"""Shared helpers for the benchmarks: timing percentiles and a markdown table row."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def time_each(fn: Callable[[object], object], items: list, repeat: int) -> list[float]:
    """Milliseconds per call of fn(item), cycling through items."""
    it = itertools.cycle(items)
    return time_calls(lambda: fn(next(it)), repeat)


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
