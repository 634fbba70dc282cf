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


def impls_chosen(run, ops) -> str:
    """Which implementation each of ``ops`` (pfp_kernels registry ops, e.g.
    ``pfp_kernels.conv.CAUSAL_CONV3D_ACT``) ran while ``run()`` did the benchmarked work once more
    under ``torch.no_grad()``: ``auto``'s measured choice where the tuning table has one, else its
    static order, e.g. ``"causal_conv3d_act=cpp, project_tokens=cpp"``; ops that did not run are
    left out."""
    from unittest import mock

    import torch
    from pfp_kernels import _registry
    chosen: dict = {}
    real_choose = _registry.Op.choose

    def choose(op, impl, *inputs, **kwargs):
        name = real_choose(op, impl, *inputs, **kwargs)
        picks = chosen.setdefault(op.name, [])
        if name not in picks:
            picks.append(name)
        return name
    with mock.patch.object(_registry.Op, "choose", choose), torch.no_grad():
        run()
    return ", ".join(f"{op.name}={'+'.join(chosen[op.name])}" for op in ops if op.name in chosen)
