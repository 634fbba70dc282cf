"""The install keeps working where the C++ libraries cannot be built, keeps a user's own torch, and
loads only its own libraries."""
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _copy_sources(dest, with_setup: bool):
    """The package's Python files (no built library, no caches), and the build files if asked."""
    shutil.copytree(os.path.join(ROOT, "pfp_kernels"), dest / "pfp_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    if with_setup:
        for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(os.path.join(ROOT, name), dest / name)
        shutil.copytree(os.path.join(ROOT, "csrc"), dest / "csrc")


def _build(dest, **env):
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CXX": "false", "PFP_CPU_ISAS": "generic",
                                                       "PFP_REQUIRE_CPP": "0", **env})   # CI sets it to 1


@pytest.mark.skipif(sys.platform != "linux", reason="the stand-in compiler is the POSIX `false`")
def test_a_failed_cpp_build_installs_without_the_kernels_unless_they_are_required(tmp_path):
    _copy_sources(tmp_path, with_setup=True)
    built = _build(tmp_path)                      # `false` as the compiler: nothing can build
    assert built.returncode == 0, built.stderr
    assert "installing without its C++ kernels" in built.stderr
    assert not [f for f in os.listdir(tmp_path / "pfp_kernels") if f.endswith(".so")]
    required = _build(tmp_path, PFP_REQUIRE_CPP="1")
    assert required.returncode != 0 and "installing without" not in required.stderr


def test_a_checkout_without_built_libraries_loads_none_from_elsewhere(tmp_path):
    # an editable install elsewhere (this checkout's, when the tests run from it) must not lend its
    # libraries to a package folder that has none
    _copy_sources(tmp_path, with_setup=False)
    code = ("import warnings; warnings.simplefilter('ignore'); import pfp_kernels, pfp_kernels._extension as e; "
            "print(pfp_kernels.__file__); print(e.LOADED); print(e.REASON)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    where, loaded, reason = out.stdout.splitlines()[:3]
    assert where.startswith(str(tmp_path)) and loaded == "False" and "not built" in reason


def test_the_torch_requirement_keeps_prerelease_and_vendor_builds():
    # NGC containers and nightlies carry versions like 2.11.0a0+nv25.11; a bound that excludes
    # them makes pip replace the user's torch with the registry's
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    for version in ("2.11.0a0+nv25.11", "2.11.0", "2.13.0+cpu", "2.14.0.dev20261101"):
        assert torch_req.specifier.contains(version), version   # as pip reads it
    assert not torch_req.specifier.contains("2.10.0")
    assert not torch_req.specifier.contains("3.0.0")
