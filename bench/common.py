"""Shared helpers for the benchmarks: timing percentiles, a markdown table row, and what /proc says of
a process (its children, resident memory, CPU time)."""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


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


def frac(done: int, total: int) -> str:
    """A count out of a total, with its percentage: "7/24 (29%)"."""
    return f"{done}/{total} ({100 * done / total:.0f}%)" if total else "-"


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def children(pid: int, named: bytes = b"") -> list[int]:
    """A process's children (those whose command line holds `named`): the service's engine server
    (llama-server) and its parsing sandbox."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and f"PPid:\t{pid}\n" in (p / "status").read_text():
                if named in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
        except OSError:  # gone meanwhile
            pass
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
