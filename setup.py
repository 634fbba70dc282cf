"""Builds pfp_kernels._C, the C++ op library (TORCH_LIBRARY(pfp, ...) schemas + CPU kernels).

The CPU ISA flags are chosen from what *this* machine's compiler and processor support,
because ATen's at::vec::Vectorized only uses SIMD when CPU_CAPABILITY_* is defined.
The chosen level is written to pfp_kernels/_build_config.py; at import the loader checks the
running CPU supports it before loading the library, so a wheel moved to an older CPU
falls back to the reference ops instead of dying with SIGILL.

Override with PFP_CPU_ISA=generic|avx2|avx512 (e.g. generic for portable wheels).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
ISA_NEEDS = {"generic": set(), "avx2": {"avx2", "fma", "f16c"},
             "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _choose_isa():
    forced = os.environ.get("PFP_CPU_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise SystemExit(f"PFP_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {forced!r}")
        return forced
    flags = _cpu_flags()
    for isa in ("avx512", "avx2"):
        if ISA_NEEDS[isa] <= flags:
            return isa
    return "generic"


ISA = _choose_isa()
with open(os.path.join(ROOT, "pfp_kernels", "_build_config.py"), "w") as f:
    f.write("# Written by setup.py: the CPU ISA pfp_kernels._C was compiled for.\n")
    f.write(f"CPU_ISA = {ISA!r}\n")
    f.write(f"CPU_FLAGS_REQUIRED = {sorted(ISA_NEEDS[ISA])!r}\n")

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-parameter"] + ISA_FLAGS[ISA]

setup(
    ext_modules=[
        CppExtension(
            "pfp_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
