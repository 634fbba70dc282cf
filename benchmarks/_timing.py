"""Timing shared by the benchmarks: interleaved rounds, minima.

On a shared, jittery VM a neighbour's burst hits whichever contender happens to be running; taking
rounds in turn (A, B, C, A, B, C, ...) spreads it over all of them, and the minimum keeps each
one's least disturbed round.
"""
from __future__ import annotations

import time


def interleaved_mins(fns: dict, budget_s: float = 3.0, max_rounds: int = 20) -> dict:
    """Minimum time (s) of each callable over rounds run in turn; each gets as many rounds as fit
    in budget_s (at least 2; 1 for calls over a second), at most max_rounds."""
    want, times = {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up, and a first guess of its cost
        guess = time.perf_counter() - t0
        want[k] = max(1 if guess > 1.0 else 2, min(max_rounds, int(budget_s / max(guess, 1e-4))))
    for r in range(max(want.values())):
        for k, fn in fns.items():
            if r < want[k]:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}
