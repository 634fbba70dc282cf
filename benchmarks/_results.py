"""Where the benchmarks write their tables: the folder named by ``PFP_BENCH_OUT``, by default
``bench-results/`` at the top of the checkout, which git ignores. So running a benchmark never
overwrites the published figures in ``benchmarks/results/``; to publish, name that folder
(``PFP_BENCH_OUT=benchmarks/results pytest benchmarks/ --benchmark-only``) and commit the tables
with the machine they came from.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "benchmarks" / "results"


def results_dir(area: str = "") -> Path:
    """The output folder's subfolder for one area (``conv``, ``attention``, ``compressor``,
    ``context_modes``, ``generate``, ``train``, ``sweeps``), made if missing."""
    base = Path(os.environ.get("PFP_BENCH_OUT") or ROOT / "bench-results")
    if not base.is_absolute():
        base = Path.cwd() / base
    out = base / area if area else base
    out.mkdir(parents=True, exist_ok=True)
    return out
