"""Timing shared by the benchmarks: interleaved rounds, minima.

On a shared, jittery VM a neighbour's burst hits whichever contender happens to be running; taking
rounds in turn (A, B, C, A, B, C, ...) spreads it over all of them, and the minimum keeps each
one's least disturbed round.
"""
from __future__ import annotations

import time


def interleaved_mins(fns: dict, budget_s: float = 3.0, max_rounds: int = 20) -> dict:
    """Minimum time (s) of each callable over rounds run in turn; each gets as many rounds as fit
    in budget_s (at least 2; 1 for calls over a second), at most max_rounds. Odd rounds run the
    callables in reverse order, so that none always follows the same neighbour (whose freed
    output buffer and cache state it would inherit)."""
    want, times = {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up, and a first guess of its cost
        guess = time.perf_counter() - t0
        want[k] = max(1 if guess > 1.0 else 2, min(max_rounds, int(budget_s / max(guess, 1e-4))))
    order = list(fns.items())
    for r in range(max(want.values())):
        for k, fn in (order if r % 2 == 0 else order[::-1]):
            if r < want[k]:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def cuda_times(fns: dict, rounds: int = 20, target_ms: float = 20.0) -> dict:
    """{name: (min_s, median_s, peak_mib)} per call of each zero-argument CUDA callable.

    Each round times a back-to-back run of ``inner`` calls between two CUDA events, so the host's
    launch and sync overhead between rounds stays out; ``inner`` is picked per callable so that a
    round takes about ``target_ms``. Rounds run in turn across the callables (A, B, A, B, ...).
    peak_mib: the peak CUDA allocation during one call above what was allocated before it.
    """
    import statistics

    import torch
    inner, peak, times = {}, {}, {k: [] for k in fns}
    for k, fn in fns.items():
        fn()  # warm-up: compilation, autotuning, cuDNN's algorithm search
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        peak[k] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        inner[k] = max(1, min(1000, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    for _ in range(rounds):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner[k]):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end) / 1e3 / inner[k])
    return {k: (min(v), statistics.median(v), peak[k]) for k, v in times.items()}
