"""Triton kernels for pfp::conv3d_act, pfp::causal_conv3d_act and pfp::project_tokens.

The ops' contracts live beside it in pfp_kernels/conv/ (shapes.py: sizes and checks; autograd.py:
fakes and backward; __init__.py: the API); this module holds only the kernels, their launchers
and the config table.

Design
------
Both convolutions are one implicit-GEMM kernel, ``_conv3d_act_kernel``, over channels-last data:

* M = output positions (b, t, h, w) flattened, N = Cout, K = Cin * kt * kh * kw, walked as
  taps outer (dt, dh, dw) and Cin blocks inner, in ONE flat loop so that Triton's software
  pipeline (num_stages) overlaps the loads across tap boundaries too (a 16-channel first stage
  has a single Cin block per tap).
* Every operand is addressed through its strides, so x may be in any memory format. Channels-last-3d
  (channel stride 1) is the fast path: Triton specializes a stride of 1 as a constant, so the
  A tile loads become contiguous vector loads along Cin.
* The weight is read as ``[Cout, kt, kh, kw, Cin]`` ("K-major": K contiguous per output channel),
  i.e. the weight in channels-last-3d. The launcher calls ``weight.contiguous(memory_format=
  channels_last_3d)`` on every call: a no-op for a weight already stored that way (the nn modules
  can keep it so), otherwise one small repack per call (the largest compressor weight, 256->512
  k3, is 3.5 M elements: by bandwidth ~5 us on an H100, against ~0.1 ms of conv FLOPs; estimates,
  not measured). Nothing is cached, so a
  weight updated in place is never stale.
* Zero padding is folded into the load masks (no F.pad). Time is indexed in a virtual sequence
  V = [prev ; x]: output frame j reads V frames ``time_offset + stride_t * j + dt``; V frames < 0
  or >= P + T are zeros, frames < P come from ``prev`` and the rest from ``x``. With a prev
  (HAS_PREV) each A tile is two masked loads, one per tensor, every position enabled in exactly
  one of them, so the concatenation is never materialised. (One load through a per-position
  ``tl.where`` between the two row pointers hides their 16-byte alignment from Triton's
  analysis and the loads stop being vectorised: ~2x the registers, spills.) The non-causal conv
  is the same kernel without a prev, P = 0 and ``time_offset = -padding_t``.
* fp32 accumulation (fp64 for fp64 inputs); epilogue adds the bias and applies SiLU in fp32,
  then stores in the input dtype, into a channels-last-3d output (the fake kernels' layout).

``project_tokens`` is a plain GEMM kernel (``_project_tokens_kernel``): rows are the (b, t, h, w)
positions of h, read through h's strides, written straight into contiguous ``[B, T*H*W, Cout]``
tokens, with bias and residual added in the epilogue.

fp32 precision
--------------
fp32 inputs use ``tl.dot(..., input_precision="ieee")`` (exact fp32 products). TF32 would be ~8x
faster on tensor cores, but its 10-bit mantissa gives ~1e-3 relative error, which fails the fp32
contract (agreement with the fp32 reference to ~1e-4, streaming equality to 1e-5). fp16/bf16 are
the fast path (tensor cores, fp32 accumulation).

Configs
-------
No @triton.autotune: ``pick_config`` maps the shapes to one entry of the small table
``CONV_CONFIGS`` (used for both kernels), and ``CONV_CONFIGS`` lists every config it can return,
so the AOT test compiles exactly those. See ``pick_config`` for the rules and the compressor
stages each entry is for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .shapes import KERNEL_DTYPES, batch_item_span, causal_out_shape, check_op_activation, conv_out_shape

CL3 = torch.channels_last_3d

# fp32 tl.dot precision (see the module docstring).
FP32_DOT_PRECISION = "ieee"
SUPPORTED_DTYPES = KERNEL_DTYPES  # fp32, fp16, bf16, and fp64 for checks (shapes.py)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv3d_act_kernel(
    x_ptr, prev_ptr, w_ptr, bias_ptr, out_ptr,
    M, CIN, COUT,
    TV, P, H, W, TO, HO, WO,
    sxb, sxc, sxt, sxh, sxw,          # x strides [B, Cin, T, H, W]
    spb, spc, spt, sph, spw,          # prev strides (unused without HAS_PREV)
    swo, swi, swt, swh, sww,          # weight strides [Cout, Cin, kt, kh, kw]
    sob, soc, sot, soh, sow,          # output strides [B, Cout, To, Ho, Wo]
    stride_t, stride_h, stride_w, time_offset, pad_h, pad_w,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_PREV: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N tiles vary fastest: the few programs sharing an A tile (output positions) run together,
    # so its input rows are read from HBM once and then hit L2.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid - pid_m * n_tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < COUT

    # output position (b, to, ho, wo) of every row, once per program
    wo = offs_m % WO
    r = offs_m // WO
    ho = r % HO
    r = r // HO
    to = r % TO
    b = (r // TO).to(tl.int64)
    t_base = to * stride_t + time_offset     # V frame read by tap dt = 0
    h_base = ho * stride_h - pad_h
    w_base = wo * stride_w - pad_w
    x_batch = x_ptr + b * sxb
    if HAS_PREV:
        p_batch = prev_ptr + b * spb

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    n_cblk = tl.cdiv(CIN, BLOCK_K)
    for kk in range(0, KT * KH * KW * n_cblk):
        tap = kk // n_cblk
        c0 = (kk - tap * n_cblk) * BLOCK_K
        dt = tap // (KH * KW)
        dhw = tap - dt * (KH * KW)
        dh = dhw // KW
        dw = dhw - dh * KW

        v = t_base + dt
        hi = h_base + dh
        wi = w_base + dw
        row_ok = m_ok & (v >= 0) & (v < TV) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        ci = c0 + offs_k
        k_ok = ci < CIN
        x_rows = x_batch + ((v - P) * sxt + hi * sxh + wi * sxw)
        if HAS_PREV:
            # V = [prev ; x] without the concatenation: two masked loads, each position enabled
            # in one of them (see the module docstring for why not one load via tl.where).
            in_prev = v < P
            p_rows = p_batch + (v * spt + hi * sph + wi * spw)
            a_x = tl.load(x_rows[:, None] + ci[None, :] * sxc,
                          mask=(row_ok & (v >= P))[:, None] & k_ok[None, :], other=0.0)
            a_p = tl.load(p_rows[:, None] + ci[None, :] * spc,
                          mask=(row_ok & in_prev)[:, None] & k_ok[None, :], other=0.0)
            a = tl.where(in_prev[:, None], a_p, a_x)
        else:
            a = tl.load(x_rows[:, None] + ci[None, :] * sxc,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tap = w_ptr + (dt * swt + dh * swh + dw * sww)
        bt = tl.load(w_tap + ci[:, None] * swi + offs_n[None, :] * swo,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))

    out_row = out_ptr + (b * sob + to * sot + ho * soh + wo * sow)
    tl.store(out_row[:, None] + offs_n[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _project_tokens_kernel(
    h_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, C, N, THW, HW, W,
    shb, shc, sht, shh, shw,          # h strides [B, C, T, H, W]
    swn, swc,                         # weight strides [Cout, C]
    srb, srm, srn,                    # residual strides [B, THW, Cout]
    sob, som, son,                    # output strides [B, THW, Cout]
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC_FP64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid - pid_m * n_tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N

    # token m is position (b, t, hh, ww) of h; its row offset in h, once per program
    b = (offs_m // THW).to(tl.int64)
    tok = offs_m % THW
    t = tok // HW
    rem = tok % HW
    hh = rem // W
    ww = rem % W
    a_ptrs = h_ptr + (b * shb + t * sht + hh * shh + ww * shw)[:, None] + offs_k[None, :] * shc
    b_ptrs = w_ptr + offs_k[:, None] * swc + offs_n[None, :] * swn

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_ok = (k0 + offs_k) < C
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * shc
        b_ptrs += BLOCK_K * swc

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (b * srb + tok * srm)[:, None] + offs_n[None, :] * srn, mask=mask, other=0.0)
        acc += res.to(acc.dtype)
    tl.store(out_ptr + (b * sob + tok * som)[:, None] + offs_n[None, :] * son,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Precision class -> role -> config. Roles (rules in pick_config), with the compressor stage each
# is for at full 480p scale (HR latent T=120, H=60, W=104, batch 1; M = output positions):
#   narrow        Cin <= 32 or Cout <= 64: stage 16->64 s(2,1,1), M = 374,400, N = 64, K = 16*27.
#                 A K block of 16 is one tap's 16 channels (tl.dot needs K >= 16).
#   wide          Cin > 32, Cout > 64, at least two waves of 128x128 tiles on the GPU: 64->128
#                 (M = 93,600) and 128->256 (M = 23,400) s(1,2,2); the token projection.
#   wide_small_m  as wide with fewer tiles: 256->512 s(1,2,2) has M = 6,240, i.e. 49 x 4 = 196
#                 tiles of 128x128 for 132 SMs (the second wave half empty); 64-row tiles make 392.
# 16-bit: K blocks of 32 with 4 stages keep the causal variant (two A buffers per stage) within
# the RTX 4070's 99 KiB of shared memory. fp32 runs the ieee FMA path, whose dot operands live in
# registers: one config for all shapes, with 8 warps over a 128x64 tile so that it does not spill.
# Registers / shared memory of each on sm_90 and sm_89: tests/test_triton_aot_conv.py.
# 16bit_hopper (sm_90, 227 KiB of shared memory per block): the best spill-free candidates of a
# sweep on an H100 (conv3d_act, bf16; benchmarks/results/sweeps/cuda_sweep_NVIDIA_H100_80GB_HBM3_first.md):
# K blocks of 64 with 3 stages; stage times 0.148 -> 0.138 ms (narrow), 0.198 -> 0.145 and
# 0.181 -> 0.142 ms (wide; 4 warps was faster still but spills), 0.167 -> 0.132 ms (wide_small_m).
CONV_CONFIGS: dict[str, dict[str, ConvConfig]] = {
    "16bit_hopper": {
        "narrow": ConvConfig(128, 64, 16, 4, 3),
        "wide": ConvConfig(128, 128, 64, 8, 3),
        "wide_small_m": ConvConfig(64, 128, 64, 4, 3),
    },
    "16bit": {
        "narrow": ConvConfig(128, 64, 16, 4, 4),
        "wide": ConvConfig(128, 128, 32, 8, 4),
        "wide_small_m": ConvConfig(64, 128, 32, 4, 4),
    },
    "fp32": {
        "all": ConvConfig(128, 64, 16, 8, 3),
    },
}
# fp64 (not a GPU fast path; there for checks) uses the fp32 config.
DEFAULT_SM_COUNT = 132  # H100 SXM; used when the device is not CUDA (the interpreter)


def _precision_class(dtype: torch.dtype, device: torch.device) -> str:
    if dtype not in (torch.float16, torch.bfloat16):
        return "fp32"
    return "16bit_hopper" if _capability(device) == 90 else "16bit"


def _capability(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 0  # the interpreter: the portable table


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def pick_config(cin: int, cout: int, m: int, dtype: torch.dtype, device: torch.device) -> ConvConfig:
    """The config for a GEMM of M = m rows, N = cout, K = cin per tap (conv or projection).

    Always an entry of ``CONV_CONFIGS[_precision_class(dtype, device)]`` (Hopper GPUs have their
    own 16-bit table).
    """
    cls = _precision_class(dtype, device)
    if cls == "fp32":
        return CONV_CONFIGS["fp32"]["all"]
    table = CONV_CONFIGS[cls]
    if cin <= 32 or cout <= 64:
        return table["narrow"]
    tiles = triton.cdiv(m, 128) * triton.cdiv(cout, 128)
    return table["wide"] if tiles >= 2 * _sm_count(device) else table["wide_small_m"]


def all_configs() -> list[tuple[str, str, ConvConfig]]:
    """(precision class, role, config) for every config pick_config can return."""
    return [(cls, role, cfg) for cls, roles in CONV_CONFIGS.items() for role, cfg in roles.items()]


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _empty_cl3(shape: list[int], like: Tensor) -> Tensor:
    """An uninitialised channels-last-3d output with exactly the strides of the fake kernels in
    pfp_kernels/conv/autograd.py (``new_empty(shape).contiguous(memory_format=channels_last_3d)``: where
    a contiguous tensor already counts as channels-last-3d, e.g. Cout = 1, it keeps the
    contiguous strides), without that expression's copy."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if out.is_contiguous(memory_format=CL3):
        return out
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=CL3)


# The kernels' row index (b, t, h, w flattened) is int32: a launch covers fewer rows than this,
# so a larger batch runs as several launches over slices of it (each batch item's rows fit, since
# its output already spans fewer than 2**31 elements: _check_offsets).
MAX_LAUNCH_ROWS = 2 ** 31 - 1


def _batch_slices(batch: int, rows_per_item: int, op: str):
    """``(start, stop)`` slices of the batch, each within :data:`MAX_LAUNCH_ROWS` rows."""
    if rows_per_item > MAX_LAUNCH_ROWS:
        raise ValueError(f"{op} (triton): one batch item has {rows_per_item} rows (output positions); the "
                         f"kernels index them in int32 (at most {MAX_LAUNCH_ROWS}); split the input")
    per = MAX_LAUNCH_ROWS // max(1, rows_per_item)
    return [(i, min(batch, i + per)) for i in range(0, batch, per)]


def _check_offsets(t: Tensor, name: str, op: str) -> None:
    # The kernels index within one batch item in int32 (the batch offset is int64).
    span = batch_item_span(t)
    if span >= 2 ** 31:
        raise ValueError(f"{op} (triton): one batch item of {name} spans {span} elements; the kernels "
                         f"index within a batch item in int32 (< 2**31); split the input")


def _check_dtype(t: Tensor, op: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op} (triton): dtype must be one of float32, float16, bfloat16 (float64 "
                         f"for checks), got {t.dtype}")


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    # input_precision only matters for fp32 operands; fp16/bf16/fp64 dots ignore it.
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def _launch_conv(x: Tensor, prev: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                 stride: list[int], pad_h: int, pad_w: int, time_offset: int, out: Tensor,
                 activation: str) -> Tensor:
    b, cout, t_out, h_out, w_out = out.shape
    cin = x.shape[1]
    for t, name in ((x, "x"), (prev, "prev"), (out, "the output")):
        if t is not None:
            _check_offsets(t, name, "conv3d_act")
    m = b * t_out * h_out * w_out
    if m == 0 or cout == 0:
        return out
    if m > MAX_LAUNCH_ROWS:
        for i, j in _batch_slices(b, m // b, "conv3d_act"):
            _launch_conv(x[i:j], prev[i:j] if prev is not None else None, weight, bias, stride, pad_h, pad_w,
                         time_offset, out[i:j], activation)
        return out
    kt, kh, kw = weight.shape[2:]
    # K-major weight ([Cout, kt, kh, kw, Cin] in memory); a no-op when it is already stored so.
    weight = weight.contiguous(memory_format=CL3)
    # the kernels read the bias at unit stride; a strided view (e.g. a column of a matrix) is copied
    bias = bias.contiguous() if bias is not None else None
    p = prev.shape[2] if prev is not None else 0
    src_prev = prev if prev is not None else x
    cfg = pick_config(cin, cout, m, x.dtype, x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(cout, cfg.block_n),)
    with _device_guard(x):
        _conv3d_act_kernel[grid](
            x, src_prev, weight, bias if bias is not None else weight, out,
            m, cin, cout,
            p + x.shape[2], p, x.shape[3], x.shape[4], t_out, h_out, w_out,
            *x.stride(), *src_prev.stride(), *weight.stride(), *out.stride(),
            stride[0], stride[1], stride[2], time_offset, pad_h, pad_w,
            KT=kt, KH=kh, KW=kw, HAS_PREV=prev is not None,
            HAS_BIAS=bias is not None, SILU=activation == "silu", ACC_FP64=x.dtype == torch.float64,
            DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def conv3d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
               padding: list[int], activation: str) -> Tensor:
    """``activation(conv3d(x, weight, bias, stride, padding))``, one kernel.

    x: ``[B, Cin, T, H, W]`` any memory format (channels-last-3d is the fast path);
    weight: ``[Cout, Cin, kt, kh, kw]``; bias ``[Cout]`` or None; activation "silu" or "none".
    Returns ``[B, Cout, To, Ho, Wo]`` in channels-last-3d, x's dtype.
    """
    _check_dtype(x, "conv3d_act")
    check_op_activation(activation, "conv3d_act (triton)")
    out = _empty_cl3(conv_out_shape(x.shape, weight.shape, stride, padding), x)
    # Non-causal = the two-source kernel with no prev (P = 0) and V frame -padding_t first.
    return _launch_conv(x, None, weight, bias, stride, padding[1], padding[2], -padding[0], out, activation)


def causal_conv3d_act(x: Tensor, prev: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                      stride: list[int], padding_hw: list[int], activation: str, time_offset: int,
                      num_out: int) -> Tensor:
    """Causal conv over V = [prev ; x] (frames of V before index 0 are zeros).

    Output frame j (0 <= j < num_out) reads V frames ``time_offset + stride_t*j + dt``,
    dt in [0, kt). prev: ``[B, Cin, P, H, W]`` or None, x: ``[B, Cin, N, H, W]``, any memory
    formats (independently). Returns ``[B, Cout, num_out, Ho, Wo]`` channels-last-3d.
    """
    _check_dtype(x, "causal_conv3d_act")
    check_op_activation(activation, "causal_conv3d_act (triton)")
    if prev is not None and (prev.dtype != x.dtype or prev.device != x.device
                             or prev.shape[:2] != x.shape[:2] or prev.shape[3:] != x.shape[3:]):
        raise ValueError(f"causal_conv3d_act (triton): prev must be [B, Cin, P, H, W] matching x "
                         f"{tuple(x.shape)} ({x.dtype} on {x.device}), got {tuple(prev.shape)} "
                         f"({prev.dtype} on {prev.device})")
    if num_out < 0:
        raise ValueError(f"causal_conv3d_act (triton): num_out must be >= 0, got {num_out}")
    out = _empty_cl3(causal_out_shape(x.shape, weight.shape, stride, padding_hw, num_out), x)
    return _launch_conv(x, prev, weight, bias, stride, padding_hw[0], padding_hw[1], time_offset,
                        out, activation)


def project_tokens(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    """``tokens(h) @ weight.T + bias + residual`` written as contiguous ``[B, T*H*W, Cout]``.

    h: ``[B, C, T, H, W]`` any memory format (channels-last-3d makes every row contiguous);
    weight ``[Cout, C]`` any strides; bias ``[Cout]`` or None; residual ``[B, T*H*W, Cout]`` or None.
    """
    _check_dtype(h, "project_tokens")
    if weight.dim() == 5:
        weight = weight.flatten(1)
    b, _, t, hh, ww = h.shape
    out = torch.empty(b, t * hh * ww, weight.shape[0], dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    for x, name in ((h, "h"), (residual, "residual"), (out, "the output")):
        if x is not None:
            _check_offsets(x, name, "project_tokens")
    for i, j in _batch_slices(b, t * hh * ww, "project_tokens"):
        _launch_project(h[i:j], weight, bias, residual[i:j] if residual is not None else None, out[i:j])
    return out


def _launch_project(h: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    out: Tensor) -> None:
    b, c, t, hh, ww = h.shape
    n = weight.shape[0]
    thw = t * hh * ww
    m = b * thw
    cfg = pick_config(c, n, m, h.dtype, h.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    res = residual if residual is not None else out
    bias = bias.contiguous() if bias is not None else None  # read at unit stride
    with _device_guard(h):
        _project_tokens_kernel[grid](
            h, weight, bias if bias is not None else weight, res, out,
            m, c, n, thw, hh * ww, ww,
            *h.stride(), *weight.stride(), *res.stride(), *out.stride(),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ACC_FP64=h.dtype == torch.float64, DOT_PRECISION=_dot_precision(h.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


# ----------------------------------------------------------------------------------------------
# AOT compile specs (for tests/test_triton_aot_conv.py; see pfp_kernels/_aot.py)
# ----------------------------------------------------------------------------------------------
_TRITON_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
AOT_KERNELS = ("conv", "causal_conv", "project")


def aot_spec(kernel: str, dtype: str, cfg) -> dict:
    """Arguments for ``aot.compile_for`` that mirror a real launch on the compressor's fast path.

    kernel: "conv" (no prev), "causal_conv" (with a prev tensor: the conv kernel compiled with
    HAS_PREV, which also loads from prev) or "project". dtype: "fp16", "bf16" or "fp32".
    cfg: a ConvConfig or its fields as a sequence (so that the spec can be built in a subprocess).
    The specialization is what a launch on channels-last-3d tensors with channel counts that are
    multiples of 16 gets: channel strides are 1 (Triton makes an int argument equal to 1 a
    constant), pointers and the other strides are divisible by 16. Geometry ints (sizes, conv
    strides, padding, time offset) are left as runtime ints: a launch where some equal 1 only
    gets simpler code.
    """
    if kernel not in AOT_KERNELS:
        raise ValueError(f"kernel must be one of {AOT_KERNELS}, got {kernel!r}")
    if dtype not in _TRITON_PTR:
        raise ValueError(f"dtype must be one of {tuple(_TRITON_PTR)}, got {dtype!r}")
    if not isinstance(cfg, ConvConfig):
        cfg = ConvConfig(*cfg)
    ptr = _TRITON_PTR[dtype]
    common = {"ACC_FP64": False, "DOT_PRECISION": _dot_precision(_TORCH_DTYPE[dtype]),
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
    if kernel in ("conv", "causal_conv"):
        fn = _conv3d_act_kernel
        ones = ("sxc", "spc", "swi", "soc")
        div16 = ("x_ptr", "prev_ptr", "w_ptr", "bias_ptr", "out_ptr", "CIN", "COUT",
                 "sxb", "sxt", "sxh", "sxw", "spb", "spt", "sph", "spw",
                 "swo", "swt", "swh", "sww", "sob", "sot", "soh", "sow")
        constexprs = dict(common, KT=3, KH=3, KW=3, HAS_PREV=kernel == "causal_conv", HAS_BIAS=True,
                          SILU=True)
    else:
        fn = _project_tokens_kernel
        ones = ("shc", "swc", "srn", "son")
        div16 = ("h_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "C", "N",
                 "shb", "sht", "shh", "shw", "swn", "srb", "srm", "sob", "som")
        constexprs = dict(common, HAS_BIAS=True, HAS_RESIDUAL=True)
    constexprs.update({name: 1 for name in ones})
    arg_names = list(getattr(fn, "arg_names", None) or fn.fn.__code__.co_varnames[:fn.fn.__code__.co_argcount])
    signature = {}
    for name in arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ptr
        else:
            signature[name] = "i32"
    return {"fn": fn, "signature": signature, "constexprs": constexprs,
            "divisible_by_16": div16, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
