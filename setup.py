"""Builds the C++ op libraries of pfp_kernels against the torch that is installed.

- ``pfp_kernels._C``: the op schemas (``TORCH_LIBRARY(pfp, ...)``), csrc/schemas.cpp.
- ``pfp_kernels._cpu_avx512``, ``_cpu_avx2``, ``_cpu_generic``: the CPU kernels (every other
  csrc/*.cpp), compiled once per instruction set. At import, pfp_kernels loads the best one the
  running CPU supports (torch's own CPU capability check), so one build serves any x86-64 CPU.
  ATen's ``at::vec::Vectorized`` only uses SIMD when ``CPU_CAPABILITY_*`` is defined, hence one
  library per ISA rather than one compiled for the build machine. Each is a separate shared
  library, and only one is loaded, so no inline function compiled for AVX-512 can be picked by
  code that runs on a CPU without it.

torch is imported only when the libraries are built, never to read the metadata: ``pip install
--no-build-isolation .`` builds against the torch already installed, and an sdist needs no torch.
Objects go to build/ in the source tree and ninja rebuilds only what changed, so installing twice
(e.g. the README's two Quickstart lines) compiles once. ``PFP_CPU_ISAS=avx2,generic`` limits the
variants built (``generic`` is always built, as the fallback; off x86-64 it is the only one).

A library that fails to build (no C++ compiler, a toolchain torch's headers reject) or a build
without torch is skipped with a warning, and the install goes on: pfp_kernels then says at import
why its C++ kernels are unavailable and runs every op through its reference. ``PFP_REQUIRE_CPP=1``
makes either an error instead (CI sets it).
"""
import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "generic": ["-DCPU_CAPABILITY=DEFAULT"],
}
# -g0 overrides the -g that Python's own CFLAGS put first: debug info for these template-heavy
# kernels costs a third of the compile time and 25x the object size.
COMMON_FLAGS = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-parameter"]
SCHEMAS = "csrc/schemas.cpp"
KERNELS = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc"))
                 if f.endswith(".cpp") and f != "schemas.cpp")


def _isas() -> list:
    asked = os.environ.get("PFP_CPU_ISAS", "")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["generic"]  # the AVX flags exist on x86-64 only
    if not asked:
        return list(ISA_FLAGS)
    isas = [s.strip() for s in asked.split(",") if s.strip()]
    bad = [s for s in isas if s not in ISA_FLAGS]
    if bad:
        raise SystemExit(f"PFP_CPU_ISAS: {bad} unknown; choose from {', '.join(ISA_FLAGS)}")
    return sorted(set(isas) | {"generic"}, key=list(ISA_FLAGS).index)


def _cpp_required() -> bool:
    return os.environ.get("PFP_REQUIRE_CPP", "") not in ("", "0")


def _skip_cpp(why: str) -> None:
    """A C++ library cannot be built: an error under PFP_REQUIRE_CPP, else a warning (the package
    installs and falls back to the reference ops)."""
    if _cpp_required():
        raise SystemExit(f"pfp_kernels: {why} (PFP_REQUIRE_CPP is set)")
    print(f"WARNING: pfp_kernels: {why}; installing without its C++ kernels (every op runs its "
          "plain-PyTorch reference; set PFP_REQUIRE_CPP=1 to make this an error)", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _NeedsTorch(build_ext):
    """build_ext without torch: enough to list the sources (an sdist), not to compile them."""

    def run(self):
        _skip_cpp("building the C++ libraries needs torch installed first, then "
                  "`pip install --no-build-isolation .` so that the build uses that torch")
        self.extensions = []


def _torch_build_ext():
    """torch's BuildExtension (ninja), imported when the build_ext command is first needed."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, include_paths, library_paths
    except ImportError:
        return _NeedsTorch

    class BuildTorchOps(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # objects persist in the source tree, keyed by platform, Python and torch, so a second
            # install rebuilds nothing (pip builds editable installs in a new temp folder each time)
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

        def build_extension(self, ext):
            isa = ext.name.rsplit("_", 1)[1] if "._cpu_" in ext.name else "generic"
            ext.include_dirs = [*include_paths(), os.path.join(ROOT, "csrc")]
            ext.library_dirs = library_paths()
            ext.libraries = ["c10", "torch", "torch_cpu"]
            ext.language = "c++"
            ext.extra_compile_args = {"cxx": COMMON_FLAGS + ISA_FLAGS[isa]}
            ext.extra_link_args = ["-fopenmp"]
            # the kernel libraries compile the same sources with other flags: each gets its own
            # object folder (and ninja file)
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name.rsplit(".", 1)[1])
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - compiler, linker or ninja: all mean "no kernels"
                if _cpp_required():
                    raise
                self._failed.append(ext.name)
                _skip_cpp(f"building {ext.name} failed ({_first_line(exc)})")
            finally:
                self.build_temp = base

        def build_extensions(self):
            self._failed = []
            try:  # torch checks the compiler here, before any library is built
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                if _cpp_required():
                    raise
                self._failed = [e.name for e in self.extensions]
                _skip_cpp(f"no C++ library could be built ({_first_line(exc)})")
            # what failed is left out of the outputs (and of the copy into the source tree)
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

    return BuildTorchOps.with_options(use_ninja=True)


class _LazyCommands(dict):
    """cmdclass whose values may be factories, called on first use (so reading the metadata never
    imports torch)."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if not isinstance(value, type):
            value = value()
            self[name] = value
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default


setup(
    ext_modules=[Extension("pfp_kernels._C", [SCHEMAS])]
    + [Extension(f"pfp_kernels._cpu_{isa}", KERNELS) for isa in _isas()],
    cmdclass=_LazyCommands(build_ext=_torch_build_ext),
)
