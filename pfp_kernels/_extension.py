"""Loads the C++ op libraries: ``pfp_kernels._C`` (the op schemas), then the one CPU kernel library
(``_cpu_avx512``, ``_cpu_avx2`` or ``_cpu_generic``) that suits this CPU.

The choice is torch's own: :func:`torch.backends.cpu.get_cpu_capability` (which honours
``ATEN_CPU_CAPABILITY``). ``PFP_CPU_ISA=avx2`` (say) asks for a lower one, e.g. to compare them; a
variant that was not built, or that this CPU cannot run, falls back to the next one down.

If nothing can load (not built, an ABI mismatch), importing pfp_kernels still works: a single
warning is issued and every op falls back to its reference.
"""
from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

ISAS = ("avx512", "avx2", "generic")  # best first
_FROM_TORCH = {"AVX512": "avx512", "AVX2": "avx2"}  # anything else (DEFAULT, other arches): generic

LOADED: bool = False
ISA: str = ""     # the kernel library that is loaded ("" when none is)
REASON: str = ""  # why the C++ library is not loaded ("" when it is)


def _library(name: str):
    """The path of ``pfp_kernels.<name>``'s shared library in this package's own folder, or None.
    Only that folder: ``importlib``'s finders would also ask an editable install's finder, which
    maps the name to another checkout's build (so a fresh clone would load that tree's kernels)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, name + suffix)
        if os.path.isfile(path):
            return path
    return None


def built_isas() -> list:
    """The CPU kernel variants that were built, best first."""
    return [isa for isa in ISAS if _library(f"_cpu_{isa}") is not None]


def _candidates() -> list:
    """The ISA variants this CPU can run, best first, capped by PFP_CPU_ISA."""
    best = _FROM_TORCH.get(torch.backends.cpu.get_cpu_capability(), "generic")
    usable = list(ISAS[ISAS.index(best):])
    asked = os.environ.get("PFP_CPU_ISA", "").strip().lower()   # "AVX2" as torch spells it works too
    if asked:
        if asked not in ISAS:
            raise ValueError(f"PFP_CPU_ISA must be one of {', '.join(ISAS)}, got {asked!r}")
        usable = [isa for isa in usable if ISAS.index(isa) >= ISAS.index(asked)]
    return usable


def _load() -> tuple[bool, str, str]:
    if os.environ.get("PFP_DISABLE_CPP", "") not in ("", "0"):
        return False, "", "disabled by PFP_DISABLE_CPP"
    schemas = _library("_C")
    if schemas is None:
        return False, "", ("pfp_kernels._C is not built; run `pip install --no-build-isolation -e .` "
                           "(or `python setup.py build_ext --inplace`)")
    try:
        torch.ops.load_library(schemas)
    except Exception as exc:  # noqa: BLE001 - any failure means "fall back"
        return False, "", f"loading {schemas} failed: {exc}"
    tried = []
    for isa in _candidates():
        path = _library(f"_cpu_{isa}")
        if path is None:
            tried.append(f"{isa} not built")
            continue
        try:
            torch.ops.load_library(path)
        except Exception as exc:  # noqa: BLE001
            tried.append(f"{isa}: {exc}")
            continue
        return True, isa, ""
    return False, "", f"no CPU kernel library could load ({'; '.join(tried)})"


try:
    LOADED, ISA, REASON = _load()
except ValueError as exc:  # a bad PFP_CPU_ISA
    LOADED, ISA, REASON = False, "", str(exc)
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
