#!/usr/bin/env bash
# Downloads, here, the wheels of the packages benchmarks/cuda_checks.sh needs that the GPU machine's
# image lacks (it has no package index), for its Python (CPython 3.12, manylinux x86-64), into
# benchmarks/wheels/ (git-ignored). cuda_checks.sh installs whatever is there.
#
#   bash benchmarks/fetch_wheels.sh            diffusers (6 MB): the wan5b, models and memory steps;
#                                              torchao (3 MB): the fp8 rows (its fp8 path is Python
#                                              over torch._scaled_mm; TORCHAO=0 leaves it out,
#                                              TORCHAO=x.y.z picks another version); pytest-xdist and
#                                              execnet (0.1 MB): the tests in parallel (the image's
#                                              own pytest and pytest-benchmark ran the 2026-11-26
#                                              checks, so they are not shadowed)
#   WITH_AV=1 bash benchmarks/fetch_wheels.sh  also PyAV (36 MB; with the repository's ~37 MB that is
#                                              over a device call's 64 MiB, so only where it fits)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
pkgs=("diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)")
[ "${WITH_AV:-0}" = 1 ] && pkgs+=("av==$(python3 -c 'import av; print(av.__version__)' 2>/dev/null || echo 18.1.0)")
TORCHAO=${TORCHAO:-0.16.0}
[ "$TORCHAO" != 0 ] && pkgs+=("torchao==$TORCHAO")
pkgs+=(pytest-xdist execnet)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels "${pkgs[@]}"
ls -la wheels
