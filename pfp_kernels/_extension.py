"""Loads the C++ op library pfp_kernels._C (schemas + CPU kernels).

If it cannot load (not built, built for a CPU ISA this machine lacks, ABI mismatch), importing
pfp_kernels still works: a single warning is issued and every op falls back to its reference.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

LOADED: bool = False
REASON: str = ""  # why the C++ library is not loaded ("" when it is)


def _missing_cpu_flags(required) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in required if flag not in have]
    except OSError:
        pass
    return []  # cannot tell (non-Linux): trust the build


def _load() -> tuple[bool, str]:
    if os.environ.get("PFP_DISABLE_CPP", "") not in ("", "0"):
        return False, "disabled by PFP_DISABLE_CPP"
    spec = importlib.util.find_spec("pfp_kernels._C")
    if spec is None or spec.origin is None:
        return False, ("pfp_kernels._C is not built; run `pip install --no-build-isolation -e .` "
                       "(or `python setup.py build_ext --inplace`)")
    try:
        from . import _build_config
        missing = _missing_cpu_flags(_build_config.CPU_FLAGS_REQUIRED)
        if missing:
            return False, (f"pfp_kernels._C was built for {_build_config.CPU_ISA} but this CPU lacks "
                           f"{', '.join(missing)}; rebuild with PFP_CPU_ISA=generic")
    except ImportError:
        pass
    try:
        torch.ops.load_library(spec.origin)
    except Exception as exc:  # noqa: BLE001 - any failure means "fall back"
        return False, f"loading {spec.origin} failed: {exc}"
    return True, ""


LOADED, REASON = _load()
if not LOADED and not REASON.startswith("disabled"):
    # Module import runs once, so this warns once per process.
    warnings.warn(f"pfp_kernels: C++ kernels unavailable ({REASON}); using the reference ops.",
                  RuntimeWarning, stacklevel=2)


# The pfp ops with a CPU kernel, read once after loading: a plain frozenset lookup is something
# torch.compile can trace (the dispatcher query itself is not), so impl="auto" compiles fullgraph.
CPU_KERNELS: frozenset = frozenset(
    name.split("::", 1)[1] for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    if name.startswith("pfp::")) if LOADED else frozenset()


def has_cpu_kernel(op: str) -> bool:
    """Whether the loaded library registered a CPU kernel for pfp::<op>."""
    return op in CPU_KERNELS
