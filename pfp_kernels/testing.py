"""One tolerance rule for comparing an implementation with its fp64 reference, used by every test
of this package (and usable by code that imports the kernels).

The error is the largest absolute difference, and it must not exceed ``TOLERANCE[kind][dtype]``
times the reference's scale, ``max(floor, max|reference|)``. A scale floor of 1 keeps values near
zero from demanding relative accuracy they cannot have; streaming comparisons (the same kernel on
other chunk boundaries) use a floor near 0, since they should agree to the dtype's rounding.

- ``forward``: an op's output against the fp64 reference. fp32 allows for long fp32 reductions
  (~1e-5 relative); fp16 and bf16 about four units in the last place of the dtype.
- ``grad``: gradients, whose reductions run over the batch and the sequence as well.
- ``stream``: a streamed result against one call on the whole input, both in the same dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

TOLERANCE = {
    "forward": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
    "grad": {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2},
    "stream": {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2},
}
_FLOOR = {"forward": 1.0, "grad": 1.0, "stream": 1e-30}


def tolerance(dtype: torch.dtype, kind: str = "forward") -> float:
    """The allowed error per unit of scale for ``dtype`` and comparison ``kind``."""
    if kind not in TOLERANCE:
        raise ValueError(f"kind must be one of {tuple(TOLERANCE)}, got {kind!r}")
    if dtype not in TOLERANCE[kind]:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {tuple(TOLERANCE[kind])}")
    return TOLERANCE[kind][dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                 kind: str = "forward", factor: float = 1.0, what: str = "") -> float:
    """Assert ``got`` matches ``want`` under the rule above; returns the error found.

    got: the implementation's output (any dtype; compared in fp64). want: the reference (any
    dtype; usually fp64). dtype: whose tolerance applies (default ``got.dtype``). factor: a stated
    multiple of the tolerance, for comparisons known to be looser (say why where it is used).
    NaN anywhere in ``got`` fails: outputs are poisoned before kernels write them.
    """
    dtype = got.dtype if dtype is None else dtype
    label = f"{what}: " if what else ""
    assert tuple(got.shape) == tuple(want.shape), f"{label}shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return 0.0
    got64 = got.detach().double().cpu()
    want64 = want.detach().double().cpu()
    assert not torch.isnan(got64).any(), f"{label}NaN in the result (an element was not written)"
    scale = max(_FLOOR[kind], want64.abs().max().item())
    err = (got64 - want64).abs().max().item()
    allowed = factor * tolerance(dtype, kind) * scale
    assert err <= allowed, f"{label}max error {err:.3e} > {allowed:.3e} ({kind}, {dtype}, scale {scale:.3g})"
    return err


__all__ = ["TOLERANCE", "tolerance", "assert_close"]
