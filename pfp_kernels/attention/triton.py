"""Triton kernels for joint context attention: softmax attention of the target queries over the
keys/values of two segments, ``[context ; target]``, read in place (no concatenation).

Layout is flash-attn's ``[B, N, H, D]`` with arbitrary strides; the context may have batch 1 and
serve every query batch (batch stride 0, no copy). Head dims up to 256 (any size: the head axis
is padded to a power of two >= 16 in registers and masked). fp16, bf16 and fp32.

Forward (FlashAttention-2 style): one program per (query block, batch*head) keeps a running row
max ``m``, row sum ``l`` and fp32 accumulator, streaming the context blocks then the target blocks;
it writes ``out`` and ``lse = m + log(l)`` (natural log, fp32, ``[B, H, Nq]``).

Backward: ``delta = rowsum(dO * O) - dlse`` (the ``- dlse`` term makes the gradient through a
returned lse exact, for merged / cascaded attention), then one kernel per key/value segment
accumulates dK, dV for a block of keys over all queries (for a batch-1 context it also loops over
the query batches, which sums the broadcast gradient without atomics), and one kernel accumulates
dQ over both segments. Probabilities are recomputed from the saved lse, as in FlashAttention.

Context key mask (``HAS_MASK``, a constexpr: without one the kernels are the unmasked ones): a
``[B or 1, Nc]`` uint8 row per query batch (batch stride 0 for a shared mask), 0 = the key takes no
part. Masked scores are -inf; a row with no valid key so far keeps its running max at -inf and
adds nothing (its exponentials are taken against 0), and a row left with no key at all gets out 0
and lse -inf. The backward gives masked keys probability 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MIN_BLOCK_D = 16  # tl.dot needs an inner dimension of at least 16


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_segment(acc, m_i, l_i, q, kv_k_ptr, kv_v_ptr, stride_kn, stride_vn, n_keys, qk_scale,
                 offs_d, keep_ptr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    """Fold one key/value segment (pointers already at this batch and head) into the running
    softmax state. Scores are kept in the log2 domain: qk_scale = scale * log2(e). With HAS_MASK,
    keep_ptr points at this batch's row of the key mask."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < HEAD_DIM
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_keys
        k = tl.load(kv_k_ptr + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            col_ok = col_ok & (tl.load(keep_ptr + cols, mask=col_ok, other=0) != 0)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if HAS_MASK:  # a row with no valid key yet: exponentials against 0 (all exactly 0); its max stays -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_v_ptr + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def joint_attention_fwd_kernel(
        Q, K, V, CK, CV, Out, Lse,
        stride_qb, stride_qn, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ckb, stride_ckn, stride_ckh,
        stride_cvb, stride_cvn, stride_cvh,
        stride_ob, stride_on, stride_oh,
        n_heads, n_q, n_k, n_ctx, qk_scale, Keep, stride_keepb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # A batch-1 context arrives with batch stride 0, so every b reads the same rows.
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q,
                                 CK + b * stride_ckb + h * stride_ckh,
                                 CV + b * stride_cvb + h * stride_cvh,
                                 stride_ckn, stride_cvn, n_ctx, qk_scale, offs_d, Keep + b * stride_keepb,
                                 BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION, HAS_MASK)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q,
                                 K + b * stride_kb + h * stride_kh,
                                 V + b * stride_vb + h * stride_vh,
                                 stride_kn, stride_vn, n_k, qk_scale, offs_d, Keep,
                                 BLOCK_N, HEAD_DIM, BLOCK_D, PRECISION, False)
    if HAS_MASK:  # a row with no key at all: out 0, lse -inf
        none = l_i == 0.0
        l_i = tl.where(none, 1.0, l_i)
        m_i = tl.where(none, float("-inf"), m_i)
    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    # lse in natural log: m and the scores are in log2 units.
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(Lse + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def joint_attention_bwd_preprocess_kernel(Out, DOut, DLse, Delta,
                                          stride_ob, stride_on, stride_oh,
                                          stride_dob, stride_don, stride_doh,
                                          n_heads, n_q,
                                          HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O - dlse (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh.to(tl.int64) * n_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + row, mask=offs_m < n_q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < n_q)


@triton.jit
def joint_attention_bwd_dkdv_kernel(
        Q, K, V, DOut, Lse, Delta, DK, DV,
        stride_qb, stride_qn, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_don, stride_doh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        n_heads, n_q, n_keys, q_batches_per_kv, qk_scale, sm_scale, Keep, stride_keepb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    """dK, dV of one block of one key segment (batch kb, head h). The key batch kb serves query
    batches kb*q_batches_per_kv .. + q_batches_per_kv (all B of them for a batch-1 context). With
    HAS_MASK, query batch b reads row b of the key mask (Keep + b * stride_keepb)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kb = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < n_keys
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok
    k = tl.load(K + kb * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + kb * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for i in range(0, q_batches_per_kv):
        b = kb * q_batches_per_kv + i
        key_ok = col_ok
        if HAS_MASK:
            key_ok = col_ok & (tl.load(Keep + b * stride_keepb + offs_n, mask=col_ok, other=0) != 0)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        row_base = (b * n_heads + h) * n_q
        for start in range(0, n_q, BLOCK_M):
            rows = start + offs_m
            row_ok = rows < n_q
            q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok, other=0.0)
            # Out-of-range rows get lse=+inf, so their probabilities are exactly 0.
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            # Transposed scores: sT[n, m] = k_n . q_m
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pT = tl.math.exp2(sT - lse[None, :])
            pT = tl.where(key_ok[:, None], pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    dk *= sm_scale
    tl.store(DK + kb * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kb * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_segment(dq, q, do, lse, delta, kv_k_ptr, kv_v_ptr, stride_kn, stride_vn, n_keys, qk_scale,
                offs_d, keep_ptr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                HAS_MASK: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < HEAD_DIM
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_keys
        k = tl.load(kv_k_ptr + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)
        v = tl.load(kv_v_ptr + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if HAS_MASK:
            col_ok = col_ok & (tl.load(keep_ptr + cols, mask=col_ok, other=0) != 0)
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def joint_attention_bwd_dq_kernel(
        Q, K, V, CK, CV, DOut, Lse, Delta, DQ,
        stride_qb, stride_qn, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ckb, stride_ckn, stride_ckh,
        stride_cvb, stride_cvn, stride_cvh,
        stride_dob, stride_don, stride_doh,
        stride_dqb, stride_dqn, stride_dqh,
        n_heads, n_q, n_k, n_ctx, qk_scale, sm_scale, Keep, stride_keepb,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0)
    row = pid_bh.to(tl.int64) * n_q + offs_m
    lse = tl.load(Lse + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_segment(dq, q, do, lse, delta, CK + b * stride_ckb + h * stride_ckh,
                     CV + b * stride_cvb + h * stride_cvh, stride_ckn, stride_cvn, n_ctx, qk_scale,
                     offs_d, Keep + b * stride_keepb, BLOCK_N, HEAD_DIM, PRECISION, HAS_MASK)
    dq = _dq_segment(dq, q, do, lse, delta, K + b * stride_kb + h * stride_kh,
                     V + b * stride_vb + h * stride_vh, stride_kn, stride_vn, n_k, qk_scale,
                     offs_d, Keep, BLOCK_N, HEAD_DIM, PRECISION, False)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configs: the only place block sizes are chosen (the AOT test compiles every one of them)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_DS = (16, 32, 64, 128, 256)
PREPROCESS_BLOCK_M = 16


def block_d_for(head_dim: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


# Block sizes per (kernel, padded head dim, dtype, arch): each one compiled by
# tests/test_triton_aot_attention.py for sm_90 (no spills) and sm_89 (shared memory <= 99 KiB).
# Head axes below 64 use the 64 tiles. fp32 runs its dots as 3xTF32 (or TF32), whose split
# operands double the registers: hence its small tiles, and no fp32 head dim above 128.
MAX_FP32_HEAD_DIM = 128
# bwd_dkdv at D=128 on Hopper: (64, 64, 8, 2) ran forward + backward at the paper's shape in 3.65 ms
# on an H100 against 4.41 ms for (32, 64, 8, 2), triton 3.6
# (benchmarks/results/sweeps/cuda_sweep_NVIDIA_H100_80GB_HBM3_first.md). Faster candidates there, with
# 4 warps, spill registers under triton 3.9.
_CONFIGS_16BIT = {
    "fwd": {64: Config(128, 64, 8, 3), 128: Config(128, 64, 8, 3), 256: Config(64, 32, 8, 2)},
    "bwd_dkdv": {64: Config(32, 128, 8, 3), 128: Config(64, 64, 8, 2), 256: Config(16, 32, 8, 1)},
    "bwd_dq": {64: Config(128, 32, 8, 3), 128: Config(64, 32, 4, 2), 256: Config(32, 32, 8, 1)},
}
# Ada (and anything not Hopper) has 99 KiB of shared memory per block and mma.sync only; its
# entries stay as they were, unmeasured there.
_CONFIGS_16BIT_NON_HOPPER = {("fwd", 128): Config(64, 64, 4, 2), ("bwd_dkdv", 128): Config(32, 64, 8, 2)}
# The masked forward holds the mask row and one more select per score tile: at D=128 on Hopper
# (128, 64) spilled 12 B (255 registers) under triton 3.9; (128, 32) does not (232). Unmeasured.
_CONFIGS_16BIT_MASKED_HOPPER = {("fwd", 128): Config(128, 32, 8, 3)}
_CONFIGS_FP32 = {
    "fwd": {64: Config(64, 16, 4, 2), 128: Config(16, 16, 4, 2)},
    "bwd_dkdv": {64: Config(16, 32, 4, 2), 128: Config(16, 16, 8, 1)},
    "bwd_dq": {64: Config(64, 16, 4, 2), 128: Config(16, 32, 4, 1)},
}


def config_for(kernel: str, head_dim: int, dtype: torch.dtype, capability: int, masked: bool = False) -> Config:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    bd = max(64, block_d_for(head_dim))
    if bd > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if dtype == torch.float32:
        if bd > MAX_FP32_HEAD_DIM:
            raise ValueError(f"fp32 head dim {head_dim} > {MAX_FP32_HEAD_DIM} is not supported by the "
                             "Triton kernels (register spills); use fp16/bf16")
        return _CONFIGS_FP32[kernel][bd]
    if masked and capability == 90 and (kernel, bd) in _CONFIGS_16BIT_MASKED_HOPPER:
        return _CONFIGS_16BIT_MASKED_HOPPER[(kernel, bd)]
    if capability != 90 and (kernel, bd) in _CONFIGS_16BIT_NON_HOPPER:
        return _CONFIGS_16BIT_NON_HOPPER[(kernel, bd)]
    return _CONFIGS_16BIT[kernel][bd]


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 90  # interpreter: any config runs; use the Hopper one
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _precision(dtype: torch.dtype) -> str:
    # fp16/bf16 ignore it. fp32 follows torch's matmul setting: TF32 when allowed, otherwise
    # 3xTF32 (fp32-level accuracy on tensor cores; plain "ieee" FMA dots spill badly at these tiles).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _strides(t: torch.Tensor, broadcast_batch: bool = False):
    sb, sn, sh, sd = t.stride()
    if sd != 1 and t.shape[-1] > 1:
        raise ValueError(f"the head dim must have stride 1, got strides {t.stride()}")
    return (0 if broadcast_batch else sb), sn, sh


def _context_or_empty(context: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return context if context is not None else like.new_empty(1, 0, like.shape[2], like.shape[3])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the head dim contiguously; other strides are free.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


_NO_KEEP: dict = {}   # device -> the one-byte placeholder passed for Keep when there is no mask


def _keep(context_mask, like: torch.Tensor):
    """(uint8 key mask [B or 1, Nc], its batch stride (0 for one row), HAS_MASK): the bool mask's
    own bytes, viewed. Without a mask, a cached one-byte placeholder the kernels never read (no
    allocation or fill on the unmasked path)."""
    if context_mask is None:
        if like.device not in _NO_KEEP:
            _NO_KEEP[like.device] = torch.zeros(1, dtype=torch.uint8, device=like.device)
        return _NO_KEEP[like.device], 0, False
    keep = context_mask.contiguous().view(torch.uint8)
    return keep, (0 if keep.shape[0] == 1 else keep.stride(0)), True


def joint_attention_fwd(q, k, v, context_k, context_v, scale: float, context_mask=None):
    """(out [B, Nq, H, D] in q's dtype, lse [B, H, Nq] fp32). context_mask: [B or 1, Nc] bool or None."""
    q, k, v = (_unit_stride_d(t) for t in (q, k, v))
    ck = _unit_stride_d(_context_or_empty(context_k, k))
    cv = _unit_stride_d(_context_or_empty(context_v, v))
    b, n_q, n_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, n_heads, n_q, device=q.device, dtype=torch.float32)
    if b == 0 or n_q == 0 or n_heads == 0:
        return out, lse
    bcast = ck.shape[0] != b
    *keep, has_mask = _keep(context_mask if ck.shape[1] else None, q)
    cfg = config_for("fwd", head_dim, q.dtype, _capability(q.device), has_mask)
    grid = (triton.cdiv(n_q, cfg.block_m), b * n_heads)
    joint_attention_fwd_kernel[grid](
        q, k, v, ck, cv, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(ck, bcast), *_strides(cv, bcast),
        *_strides(out),
        n_heads, n_q, k.shape[1], ck.shape[1], scale * LOG2E, *keep,
        HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PRECISION=_precision(q.dtype), HAS_MASK=has_mask,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def joint_attention_bwd(grad_out, grad_lse, q, k, v, context_k, context_v, out, lse, scale: float,
                        context_mask=None):
    """Gradients (dq, dk, dv, dcontext_k, dcontext_v); the context ones are None without context.
    A batch-1 context gets the gradient summed over the query batches; masked context keys get 0."""
    q, k, v, out, grad_out = (_unit_stride_d(t) for t in (q, k, v, out, grad_out))
    has_ctx = context_k is not None
    ck = _unit_stride_d(_context_or_empty(context_k, k))
    cv = _unit_stride_d(_context_or_empty(context_v, v))
    b, n_q, n_heads, head_dim = q.shape
    n_k, n_ctx, ctx_b = k.shape[1], ck.shape[1], ck.shape[0]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dck = torch.empty(ctx_b, n_ctx, n_heads, head_dim, dtype=ck.dtype, device=ck.device)
    dcv = torch.empty(ctx_b, n_ctx, n_heads, head_dim, dtype=cv.dtype, device=cv.device)
    if b * n_heads == 0 or n_q == 0:
        for t in (dq, dk, dv, dck, dcv):
            t.zero_()
        return dq, dk, dv, (dck if has_ctx else None), (dcv if has_ctx else None)
    bd = block_d_for(head_dim)
    cap = _capability(q.device)
    prec = _precision(q.dtype)
    qk_scale = scale * LOG2E
    delta = torch.empty_like(lse)
    has_dlse = grad_lse is not None
    dlse = grad_lse.float().contiguous() if has_dlse else lse
    joint_attention_bwd_preprocess_kernel[(triton.cdiv(n_q, PREPROCESS_BLOCK_M), b * n_heads)](
        out, grad_out, dlse, delta, *_strides(out), *_strides(grad_out), n_heads, n_q,
        HAS_DLSE=has_dlse, HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=4, num_stages=1)

    cfg = config_for("bwd_dkdv", head_dim, q.dtype, cap)
    ctx_keep = _keep(context_mask if n_ctx else None, q)
    *keep, has_mask = ctx_keep
    segments = [(k, v, dk, dv, 1, n_k, _keep(None, q))]
    if n_ctx > 0:
        segments.append((ck, cv, dck, dcv, b // ctx_b, n_ctx, ctx_keep))
    elif has_ctx:
        dck.zero_(), dcv.zero_()
    for seg_k, seg_v, seg_dk, seg_dv, q_per_kv, n_keys, (seg_keep, seg_keep_sb, seg_has) in segments:
        if n_keys == 0:
            continue
        grid = (triton.cdiv(n_keys, cfg.block_n), seg_k.shape[0] * n_heads)
        joint_attention_bwd_dkdv_kernel[grid](
            q, seg_k, seg_v, grad_out, lse, delta, seg_dk, seg_dv,
            *_strides(q), *_strides(seg_k), *_strides(seg_v), *_strides(grad_out),
            *_strides(seg_dk), *_strides(seg_dv),
            n_heads, n_q, n_keys, q_per_kv, qk_scale, scale, seg_keep, seg_keep_sb,
            HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            PRECISION=prec, HAS_MASK=seg_has, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    bcast = ctx_b != b
    cfg = config_for("bwd_dq", head_dim, q.dtype, cap)
    joint_attention_bwd_dq_kernel[(triton.cdiv(n_q, cfg.block_m), b * n_heads)](
        q, k, v, ck, cv, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(ck, bcast), *_strides(cv, bcast),
        *_strides(grad_out), *_strides(dq),
        n_heads, n_q, n_k, n_ctx, qk_scale, scale, *keep,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PRECISION=prec, HAS_MASK=has_mask, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv, (dck if has_ctx else None), (dcv if has_ctx else None)


# ----------------------------------------------------------------------------------------------
# AOT description (used by tests/test_triton_aot_attention.py)
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs(kernel: str, head_dim: int, dtype: torch.dtype, capability: int, masked: bool = False):
    """(fn, signature, constexprs, num_warps, num_stages) of the kernel the launcher would run
    (``masked``: its context-key-mask variant)."""
    cfg = config_for(kernel, head_dim, dtype, capability, masked)
    t = "*" + _TRITON_DTYPE[dtype]
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, PRECISION=_precision(dtype), HAS_MASK=masked)
    if kernel == "fwd":
        fn = joint_attention_fwd_kernel
        ptrs = {"Q": t, "K": t, "V": t, "CK": t, "CV": t, "Out": t, "Lse": "*fp32"}
        ints = [f"stride_{x}{y}" for x in ("q", "k", "v", "ck", "cv", "o") for y in "bnh"]
        ints += ["n_heads", "n_q", "n_k", "n_ctx"]
        floats = ["qk_scale"]
    elif kernel == "bwd_dkdv":
        fn = joint_attention_bwd_dkdv_kernel
        ptrs = {"Q": t, "K": t, "V": t, "DOut": t, "Lse": "*fp32", "Delta": "*fp32", "DK": t, "DV": t}
        ints = [f"stride_{x}{y}" for x in ("q", "k", "v", "do", "dk", "dv") for y in "bnh"]
        ints += ["n_heads", "n_q", "n_keys", "q_batches_per_kv"]
        floats = ["qk_scale", "sm_scale"]
    else:
        fn = joint_attention_bwd_dq_kernel
        ptrs = {"Q": t, "K": t, "V": t, "CK": t, "CV": t, "DOut": t, "Lse": "*fp32", "Delta": "*fp32",
                "DQ": t}
        ints = [f"stride_{x}{y}" for x in ("q", "k", "v", "ck", "cv", "do", "dq") for y in "bnh"]
        ints += ["n_heads", "n_q", "n_k", "n_ctx"]
        floats = ["qk_scale", "sm_scale"]
    signature = dict(ptrs)
    signature.update({name: "i32" for name in ints})
    signature.update({name: "fp32" for name in floats})
    signature.update({"Keep": "*u8", "stride_keepb": "i32"})
    signature.update({name: "constexpr" for name in common})
    return fn, signature, common, cfg.num_warps, cfg.num_stages
