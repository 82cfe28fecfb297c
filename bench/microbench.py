"""The timing loop shared by the micro-benchmarks (bench/micro_*.py)."""

from __future__ import annotations

import time
from collections.abc import Callable


def bench(name: str, fn: Callable[[int], None], n: int) -> float:
    """Best of 5 runs of ``fn(n)``, printed and returned in µs per iteration."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    print(f"{name:<52} {best:8.3f} µs")
    return best
