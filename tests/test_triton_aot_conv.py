"""Every config the conv launchers can pick compiles for real GPUs, without a GPU.

For each entry of pfp_kernels.conv.triton.CONV_CONFIGS, each dtype of its precision class
(fp16 and bf16, or fp32) and each kernel (conv, causal conv with a prev tensor, token projection):
compile for sm_90 (H100) and sm_89 (RTX 4070), then check ptxas' report: no register spills on
sm_90, and shared memory within each card's per-block limit. The interpreter ignores these
limits, so this is the only check that the configs fit the hardware.

All compiles run once per test session, in two subprocesses with TRITON_INTERPRET=0
(see aot.compile_in_subprocesses): ~1.5 s of CPU per compile on an idle core.
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from pfp_kernels import _aot as aot  # noqa: E402
from pfp_kernels.conv import triton as tk  # noqa: E402

DTYPES = {"16bit_hopper": ("fp16", "bf16"), "16bit": ("fp16", "bf16"), "fp32": ("fp32",)}
# the Hopper table is only picked on sm_90 (its shared memory exceeds the RTX 4070's 99 KiB)
CLASS_CAPABILITIES = {"16bit_hopper": (90,)}
CASES = [(kernel, dtype, cls, role) for cls, role, _ in tk.all_configs()
         for dtype in DTYPES[cls] for kernel in tk.AOT_KERNELS]
CAPABILITIES = tuple(aot.TARGETS.values())


def test_dtype_classes_cover_every_config_table():
    assert set(DTYPES) == set(tk.CONV_CONFIGS)


@pytest.fixture(scope="module")
def reports():
    jobs, keys = [], []
    for kernel, dtype, cls, role in CASES:
        cfg = tk.CONV_CONFIGS[cls][role]
        for cap in CLASS_CAPABILITIES.get(cls, CAPABILITIES):
            jobs.append(("pfp_kernels.conv.triton", "aot_spec",
                         [kernel, dtype, [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages]],
                         cap))
            keys.append((kernel, dtype, cls, role, cap))
    return dict(zip(keys, aot.compile_in_subprocesses(jobs, processes=2)))


@pytest.mark.parametrize("kernel,dtype,cls,role", CASES, ids=[f"{k}-{d}-{c}-{r}" for k, d, c, r in CASES])
def test_config_fits_h100_and_rtx4070(reports, kernel, dtype, cls, role):
    cfg = tk.CONV_CONFIGS[cls][role]
    for card, cap in aot.TARGETS.items():
        if cap not in CLASS_CAPABILITIES.get(cls, CAPABILITIES):
            continue
        rep = reports[(kernel, dtype, cls, role, cap)]
        where = f"{kernel} {dtype} {role} {cfg} on {card} (sm_{cap}): {rep}"
        assert rep.registers > 0, f"no ptxas register report: {where}"
        assert rep.shared_ok, f"shared memory {rep.shared_bytes} B > {aot.SHARED_LIMIT[cap]} B: {where}"
        if cap == 90:
            assert rep.spills == 0, f"register spills: {where}"
