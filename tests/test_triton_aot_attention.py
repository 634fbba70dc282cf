"""Every config the attention Triton launcher can pick compiles for real GPUs (no GPU needed).

The interpreter ignores hardware limits, so each (kernel, head dim, dtype) config the launcher
chooses is compiled ahead of time for the H100 (sm_90) and the RTX 4070 (sm_89) with
pfp_kernels/_aot.py: no register spills on sm_90, shared memory within each card's
per-block limit. Head dims 64, 128, 256 fill the head axis; 96 stands for the padded, masked
ones (it uses the 128 config). Compiles run in a process pool: ptxas is the slow part.
"""
import concurrent.futures
import multiprocessing
import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from pfp_kernels.attention import triton as ta  # noqa: E402
from pfp_kernels._aot import SHARED_LIMIT, TARGETS  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CASES = [(kernel, d, dt, cap, False) for kernel in ta.KERNELS for d in (64, 128, 256)
         for dt in DTYPES for cap in TARGETS.values() if not (dt == "fp32" and d > ta.MAX_FP32_HEAD_DIM)]
CASES += [(kernel, 96, "bf16", cap, False) for kernel in ta.KERNELS for cap in TARGETS.values()]
# the context-key-mask variants (HAS_MASK): every dtype at head dims 64 and 128 (tests/test_cuda.py
# runs the masked kernels at both), and 256 in the 16-bit dtypes
CASES += [(kernel, d, dt, cap, True) for kernel in ta.KERNELS for d in (64, 128, 256) for dt in DTYPES
          for cap in TARGETS.values() if not (d == 256 and dt == "fp32")]


def _compile(case):
    import torch as _torch
    from pfp_kernels.attention import triton as _ta
    from pfp_kernels._aot import compile_for
    kernel, head_dim, dtype, cap, with_dlse = case
    if kernel == "preprocess":
        t = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
        bd = _ta.block_d_for(head_dim)
        sig = {"Out": t, "DOut": t, "DLse": "*fp32", "Delta": "*fp32"}
        sig.update({n: "i32" for n in ("stride_ob", "stride_on", "stride_oh", "stride_dob", "stride_don",
                                       "stride_doh", "n_heads", "n_q")})
        consts = dict(HAS_DLSE=with_dlse, HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=_ta.PREPROCESS_BLOCK_M)
        sig.update({n: "constexpr" for n in consts})
        return compile_for(_ta.joint_attention_bwd_preprocess_kernel, sig, consts, cap, 4, 1)
    fn, sig, consts, warps, stages = _ta.aot_specs(kernel, head_dim, getattr(_torch, {
        "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]), cap, with_dlse)
    return compile_for(fn, sig, consts, cap, warps, stages)


# the backward's preprocess kernel, with and without the LSE's gradient (the last field: HAS_DLSE;
# for the other kernels it is HAS_MASK), on both cards
ALL = CASES + [("preprocess", d, dt, cap, dlse) for d in (64, 128, 256) for dt in DTYPES
               for cap in TARGETS.values() for dlse in (True, False)]


@pytest.fixture(scope="module")
def reports():
    workers = max(1, min(len(ALL), os.cpu_count() or 1))
    ctx = multiprocessing.get_context("spawn")
    # The workers compile real kernels, so they must not start under the interpreter (which
    # conftest turns on for this process); spawned children copy the environment at start.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return dict(zip(ALL, pool.map(_compile, ALL)))
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.slow
def test_every_attention_config_compiles_within_limits(reports):
    problems = []
    for (kernel, d, dt, cap, flag), rep in reports.items():
        if kernel == "preprocess":
            where = f"{kernel} D={d} {dt} sm_{cap}{' with dLSE' if flag else ''}"
        else:
            where = f"{kernel} D={d} {dt} sm_{cap}{' masked' if flag else ''} {ta.config_for(kernel, d, DTYPES[dt], cap, flag)}"
        if rep.shared_bytes > SHARED_LIMIT[cap]:
            problems.append(f"{where}: shared memory {rep.shared_bytes} B > {SHARED_LIMIT[cap]} B")
        if cap == 90 and rep.spills:
            problems.append(f"{where}: {rep.spill_stores} B spill stores / {rep.spill_loads} B spill "
                            f"loads, {rep.registers} registers")
    assert not problems, "\n".join(problems)


def test_launcher_configs_are_the_ones_compiled():
    # Every head dim maps onto the config of 64, 128 or 256 compiled above (below 64 the same
    # tiles with a smaller BLOCK_D); fp32 stops at 128 and 272 is refused.
    for d in (16, 32, 48, 64, 80, 96, 128, 160, 200, 256):
        bd = ta.block_d_for(d)
        assert bd >= d and bd in ta.BLOCK_DS
        for kernel in ta.KERNELS:
            for dtype in DTYPES.values():
                for cap in TARGETS.values():
                    if dtype == torch.float32 and d > ta.MAX_FP32_HEAD_DIM:
                        with pytest.raises(ValueError, match="fp32 head dim"):
                            ta.config_for(kernel, d, dtype, cap)
                        continue
                    assert ta.config_for(kernel, d, dtype, cap) == ta.config_for(kernel, max(bd, 64), dtype, cap)
    with pytest.raises(ValueError, match="head dim 272"):
        ta.config_for("fwd", 272, torch.bfloat16, 90)
