"""Implementation choice shared by every op: each op lists its implementations with a function
that says why one cannot run on given inputs (None when it can), in the spirit of xformers' fmha
dispatch. `impl="auto"` takes the first one that can run, in the op's documented order.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from . import _extension

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    return True, ""


TRITON_AVAILABLE, TRITON_REASON = _probe_triton()

WhyNot = Callable[..., Optional[str]]


def cpp_why_not(op: str, device: torch.device) -> Optional[str]:
    if not _extension.LOADED:
        return f"C++ library not loaded: {_extension.REASON}"
    if device.type != "cpu":
        return f"C++ kernels run on CPU tensors only, got {device.type}"
    if not _extension.has_cpu_kernel(op):
        return f"this build of pfp_kernels._C has no CPU kernel for pfp::{op}"
    return None


def triton_why_not(device: torch.device) -> Optional[str]:
    if not TRITON_AVAILABLE:
        return TRITON_REASON
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return None
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing pfp_kernels)"
    return f"Triton kernels need CUDA tensors, got {device.type}"


def resolve(op: str, impl: str, reasons: dict[str, Optional[str]], auto_order: Sequence[str]) -> str:
    """Pick an implementation name.

    reasons: impl name -> None if it can run on these inputs, else the reason it cannot.
    auto_order: the order `impl="auto"` tries.
    """
    valid = ("auto",) + tuple(reasons)
    if impl not in valid:
        raise ValueError(f"{op}: impl must be one of {valid}, got {impl!r}")
    if impl == "auto":
        for name in auto_order:
            if reasons.get(name) is None:
                return name
        details = "; ".join(f"{n}: {reasons[n]}" for n in auto_order)
        raise RuntimeError(f"{op}: no implementation can run these inputs ({details})")
    why = reasons[impl]
    if why is not None:
        raise RuntimeError(f"{op}: impl={impl!r} cannot run these inputs: {why}")
    return impl
