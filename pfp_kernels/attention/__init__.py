"""Joint context attention: softmax attention of target queries over ``[context ; target]``.

The DiT attends from the target tokens of the chunk being generated over the compressed history
(context) plus the target itself. This module is the whole op apart from its kernels: argument
checks, the plain-PyTorch reference, the exact merge of partial attentions, registration (fake
kernels and autograd) and the choice of backend.

Layout is flash-attn's: ``q [B, Nq, H, D]``, ``k, v [B, Nk, H, D]``, context ``[B or 1, Nc, H, D]``.
A batch-1 context serves all B query batches without a copy (stride-0 expand, never a repeat):
the CFG cond/uncond pair, or many samples, sharing one history. The result equals softmax
attention over ``cat(context, target)`` without that concatenation ever being built.

Backends (``attention_backends`` says which can run given inputs, and why not):

- ``flash_attn``  flash-attn when installed (CUDA): FA3 (``flash_attn_interface``) on sm_90,
  FA2 elsewhere (never FA3 on Ada); one call per segment with its LSE, then the exact merge.
- ``triton``      pfp_kernels/_triton/attention.py: one FlashAttention-style pass over both
  segments, forward and backward kernels (head dim <= 256 in fp16/bf16, <= 128 in fp32).
- ``xformers``    xformers when installed (CUDA): partial attention per segment + exact merge.
- ``cpp``         csrc/joint_attention.cpp (CPU): one FlashAttention-2-style pass of our own whose key
  loop walks the context blocks then the target blocks (fp32 SGEMMs on per-thread fp32 blocks,
  online softmax in fp32); where torch exports no ``sgemm_``, ATen's CPU flash kernel once per
  segment with the merge fused into one pass. ``torch.ops.pfp._attention_cpu_path`` forces either.
- ``sdpa``        PyTorch's fused SDPA kernels with LSE once per segment + the merge in PyTorch
  (CPU: ``_scaled_dot_product_flash_attention_for_cpu``; CUDA: the memory-efficient kernel).
- ``torch``       the reference (fp32/fp64 math, materialises the scores).

``impl="auto"`` order: CUDA ``flash_attn, triton, xformers, sdpa, torch``; CPU ``cpp, sdpa, torch``
(benchmarks/bench_attention.py measures cpp and sdpa against SDPA over the concatenation).

Backward: every backend saves (out, lse) and shares one backward: the Triton backward kernels on
CUDA (and for the Triton backend under the interpreter), elsewhere a per-segment math backward.
The gradient through a returned lse is exact (it enters as ``delta = rowsum(dO*O) - dlse``).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, _extension

ATTENTION_BACKENDS = ("flash_attn", "triton", "xformers", "cpp", "sdpa", "torch")
_AUTO_ORDER = {"cuda": ("flash_attn", "triton", "xformers", "sdpa", "torch"),
               "cpu": ("cpp", "sdpa", "torch")}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_FP32_HEAD_DIM = 128
# Asked once: the dispatcher query inside cpp_why_not is not traceable by torch.compile.
_CPP_WHY_NOT_ON_CPU = _dispatch.cpp_why_not("joint_attention", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                  context_v: Optional[Tensor]) -> None:
    op = "joint_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, N, H, D] (flash-attn layout), got shape {tuple(t.shape)}")
    if (context_k is None) != (context_v is None):
        raise ValueError(f"{op}: context_k and context_v must be given together (got context_k "
                         f"{'None' if context_k is None else 'a tensor'}, context_v "
                         f"{'None' if context_v is None else 'a tensor'})")
    b, _, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{op}: q, k and v must have the same batch size, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[2] != h:
            raise ValueError(f"{op}: {name} has {t.shape[2]} heads but q has {h} (q {tuple(q.shape)}, "
                             f"{name} {tuple(t.shape)}); grouped heads are not supported")
        if t.shape[3] != d:
            raise ValueError(f"{op}: {name} has head dim {t.shape[3]} but q has {d} (q {tuple(q.shape)}, "
                             f"{name} {tuple(t.shape)})")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: k and v must have the same length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    tensors = [("q", q), ("k", k), ("v", v)]
    if context_k is not None:
        for name, t in (("context_k", context_k), ("context_v", context_v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{op}: {name} must be 4-D [B or 1, Nc, H, D], got shape {tuple(t.shape)}")
            if t.shape[0] not in (1, b):
                raise ValueError(f"{op}: {name} has batch {t.shape[0]}; it must be 1 (broadcast to every "
                                 f"query batch, no copy) or q's batch {b}")
            if t.shape[2] != h or t.shape[3] != d:
                raise ValueError(f"{op}: {name} must have H={h} heads and head dim D={d} like q, got "
                                 f"shape {tuple(t.shape)}")
        if context_k.shape[:2] != context_v.shape[:2]:
            raise ValueError(f"{op}: context_k and context_v must have the same batch and length, got "
                             f"{tuple(context_k.shape)} and {tuple(context_v.shape)}")
        tensors += [("context_k", context_k), ("context_v", context_v)]
    for name, t in tensors[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} dtype {t.dtype} does not match q's {q.dtype}; all inputs "
                             f"must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}; all inputs must "
                             f"be on one device")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{op}: inputs must be floating point (float16, bfloat16, float32, float64), "
                         f"got {q.dtype}")
    n_keys = k.shape[1] + (context_k.shape[1] if context_k is not None else 0)
    if n_keys == 0 and q.shape[1] > 0:
        raise ValueError(f"{op}: there are no keys (Nk=0 and no context); softmax over nothing is undefined")


def _scale_or_default(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"joint_attention: scale must be finite, got {scale}")
    return scale


# ----------------------------------------------------------------------------------------------
# reference and the exact merge
# ----------------------------------------------------------------------------------------------
def joint_attention_reference(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                              context_v: Optional[Tensor] = None, scale: Optional[float] = None):
    """Softmax attention of q over cat(context, target), materialised. ``(out, lse)``: out
    ``[B, Nq, H, D]`` in q's dtype, lse ``[B, H, Nq]`` (fp32, or fp64 for fp64 inputs)."""
    scale = _scale_or_default(scale, q.shape[-1])
    if context_k is not None:
        b = q.shape[0]
        k = torch.cat([context_k.expand(b, -1, -1, -1), k], dim=1)
        v = torch.cat([context_v.expand(b, -1, -1, -1), v], dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.to(acc))
    return out.to(q.dtype).contiguous(), lse


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions of the same queries over disjoint key sets.

    o1, o2: ``[B, Nq, H, D]``; lse1, lse2: ``[B, H, Nq]`` natural-log sums of exp of the scores.
    Returns ``(o, lse)`` = attention over the union: o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2),
    lse = logaddexp(lse1, lse2), computed stably as o1 + sigmoid(lse2 - lse1) (o2 - o1). A side with
    lse = -inf (no keys) contributes nothing. Differentiable in all four inputs.
    """
    if o1.shape != o2.shape or o1.dim() != 4:
        raise ValueError(f"merge_attention: o1 and o2 must both be [B, Nq, H, D], got {tuple(o1.shape)} "
                         f"and {tuple(o2.shape)}")
    want = (o1.shape[0], o1.shape[2], o1.shape[1])
    for name, t in (("lse1", lse1), ("lse2", lse2)):
        if tuple(t.shape) != want:
            raise ValueError(f"merge_attention: {name} must be [B, H, Nq] = {want}, got {tuple(t.shape)}")
    return _merge(o1, lse1, o2, lse2)


def _merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    acc = torch.promote_types(lse1.dtype, torch.float32)
    l1, l2 = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(l1, l2)
    # sigmoid(l2 - l1) is the weight of side 2; written from lse so that -inf sides give exact 0/1
    # (l2 - l1 is nan when both are -inf; then lse is -inf too and nan_to_num gives weight 0).
    w2 = torch.exp(l2 - lse).nan_to_num(0.0)
    w = w2.transpose(1, 2).unsqueeze(-1)  # [B, Nq, H, 1]
    if o1.dtype == acc:
        out = torch.lerp(o1, o2, w)
    else:
        out = torch.lerp(o1.to(acc), o2.to(acc), w).to(o1.dtype)
    return out, lse


# ----------------------------------------------------------------------------------------------
# optional libraries
# ----------------------------------------------------------------------------------------------
# Which optional packages are installed, looked up once by find_spec (which does not import them).
# torch.compile cannot trace an import, so while it traces, the backend choice answers from this
# table and from imports already tried; the backend's op imports the package when it runs.
_OPTIONAL_PACKAGES = ("flash_attn_interface", "flash_attn", "xformers")
_INSTALLED = {name: importlib.util.find_spec(name) is not None for name in _OPTIONAL_PACKAGES}
_imported: dict = {}          # module name -> module, for imports that succeeded
_import_failures: dict = {}   # module name -> why the import failed


def _import(name: str):
    """(module, None) or (None, reason); each module is imported at most once."""
    if name not in _imported and name not in _import_failures:
        top = name.split(".")[0]
        if not _INSTALLED.get(top, True):
            _import_failures[name] = f"{top} is not installed"
        else:
            try:
                _imported[name] = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - any failure means "not available"
                _import_failures[name] = f"{name} is not importable ({type(exc).__name__}: {exc})"
    return _imported.get(name), _import_failures.get(name)


def _why_not_importable(name: str) -> Optional[str]:
    """None if ``name`` imports (or, while torch.compile traces, is installed and has not failed)."""
    top = name.split(".")[0]
    if not _INSTALLED.get(top, True):
        return f"{top} is not installed"
    if torch.compiler.is_compiling():
        return _import_failures.get(name)
    return _import(name)[1]


def _flash_attn_module(device: torch.device):
    """(module name, None) or (None, reason): FA3 (flash_attn_interface) on sm_90, FA2 (flash_attn)
    on other archs (FA3 is Hopper-only: never on Ada sm_89)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        why3 = _why_not_importable("flash_attn_interface")
        if why3 is None:
            return "flash_attn_interface", None
    else:
        why3 = f"FA3 is Hopper-only (sm_90), this GPU is sm_{major}{minor}"
    why2 = _why_not_importable("flash_attn")
    if why2 is not None:
        return None, f"{why3}; FA2: {why2}"
    if major < 8:
        return None, f"flash-attn 2 needs sm_80 or newer, this GPU is sm_{major}{minor}"
    return "flash_attn", None


def _flash_attn_function(device: torch.device):
    """(flash_attn_func, None) or (None, reason)."""
    name, why = _flash_attn_module(device)
    if name is None:
        return None, why
    mod, why = _import(name)
    return (mod.flash_attn_func, None) if mod is not None else (None, why)


# ----------------------------------------------------------------------------------------------
# backends: why each cannot run given inputs
# ----------------------------------------------------------------------------------------------
def _dtype_reason(dtype: torch.dtype, allowed) -> Optional[str]:
    if dtype not in allowed:
        return f"dtype {dtype} not supported (supports {', '.join(str(d) for d in allowed)})"
    return None


def attention_backends(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                       context_v: Optional[Tensor] = None) -> dict[str, Optional[str]]:
    """For each backend: None if it can run these inputs, else the reason it cannot.

    Raises ValueError for inputs no backend accepts (shape, dtype or device mismatch).
    """
    _check_inputs(q, k, v, context_k, context_v)
    device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
    reasons: dict[str, Optional[str]] = {}

    why = _dispatch.triton_why_not(device)
    if why is None:
        why = _dtype_reason(dtype, _KERNEL_DTYPES)
    if why is None and not 1 <= head_dim <= MAX_TRITON_HEAD_DIM:
        why = f"head dim {head_dim} not supported (1..{MAX_TRITON_HEAD_DIM})"
    if why is None and dtype == torch.float32 and head_dim > MAX_TRITON_FP32_HEAD_DIM:
        why = (f"fp32 head dim {head_dim} not supported (fp32 up to {MAX_TRITON_FP32_HEAD_DIM}: larger "
               "fp32 tiles spill registers; fp16/bf16 go up to 256)")
    if why is None and device.type == "cpu" and dtype == torch.bfloat16:
        why = "bf16 tl.dot gives wrong results under the Triton interpreter (TRITON_INTERPRET=1)"
    reasons["triton"] = why

    if device.type != "cuda":
        reasons["flash_attn"] = f"flash-attn needs CUDA tensors, got {device.type}"
    else:
        _, why = _flash_attn_module(device)
        if why is None:
            why = _dtype_reason(dtype, (torch.float16, torch.bfloat16))
        if why is None and (head_dim > 256 or head_dim % 8 != 0):
            why = f"head dim {head_dim} not supported (a multiple of 8, at most 256)"
        reasons["flash_attn"] = why

    if device.type != "cuda":
        reasons["xformers"] = f"xformers needs CUDA tensors, got {device.type}"
    else:
        why = _why_not_importable("xformers.ops.fmha")
        # (while torch.compile traces, the version check waits for the op: it cannot import)
        if (why is None and not torch.compiler.is_compiling()
                and not hasattr(_import("xformers.ops.fmha")[0], "memory_efficient_attention_partial")):
            why = "this xformers has no memory_efficient_attention_partial (needs xformers >= 0.0.23)"
        if why is None:
            why = _dtype_reason(dtype, _KERNEL_DTYPES)
        reasons["xformers"] = why

    why = _CPP_WHY_NOT_ON_CPU if device.type == "cpu" else _dispatch.cpp_why_not("joint_attention", device)
    if why is None:
        why = _dtype_reason(dtype, _KERNEL_DTYPES)
    reasons["cpp"] = why

    if device.type == "cpu":
        why = _dtype_reason(dtype, _KERNEL_DTYPES + (torch.float64,))
    elif device.type == "cuda":
        why = _dtype_reason(dtype, _KERNEL_DTYPES)
        if why is None and head_dim > 256:
            why = f"head dim {head_dim} not supported by the fused SDPA kernels (at most 256)"
    else:
        why = f"the split SDPA path supports cpu and cuda, got {device.type}"
    reasons["sdpa"] = why

    reasons["torch"] = None
    return {name: reasons[name] for name in ATTENTION_BACKENDS}


# ----------------------------------------------------------------------------------------------
# kernels of the Python-level backends (each returns (out [B, Nq, H, D], lse [B, H, Nq] fp32))
# ----------------------------------------------------------------------------------------------
def _segments(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor], context_v: Optional[Tensor]):
    """Non-empty key/value segments, the context expanded (stride 0, no copy) to q's batch."""
    segs = []
    if context_k is not None and context_k.shape[1] > 0:
        b = q.shape[0]
        segs.append((context_k.expand(b, -1, -1, -1), context_v.expand(b, -1, -1, -1)))
    if k.shape[1] > 0:
        segs.append((k, v))
    return segs


def _merge_segments(parts):
    out, lse = parts[0]
    for o2, l2 in parts[1:]:
        out, lse = _merge(out, lse, o2, l2)
    return out.contiguous(), lse.contiguous()


def _empty_result(q: Tensor):
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=_lse_dtype(q.dtype)))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sdpa_segment(q: Tensor, k: Tensor, v: Tensor, scale: float):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views, [B, H, N, D]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False,
                                                                            scale=scale)
    else:
        out = _cudnn_segment(qt, kt, vt, scale)
        if out is not None:
            out, lse = out
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                         scale=scale)
            out, lse = res[0], res[1][..., : q.shape[1]]  # its lse is padded to a multiple of 32
    return out.transpose(1, 2), lse.to(_lse_dtype(q.dtype))


def _cudnn_segment(qt: Tensor, kt: Tensor, vt: Tensor, scale: float):
    """cuDNN's attention with its log-sum-exp for fp16/bf16 ``[B, H, N, D]``, or None where it does
    not apply. On an H100 at the paper's shape it made this backend 2.7x faster than the
    memory-efficient kernel (0.56 vs 1.52 ms;
    benchmarks/results/sweeps/cuda_sweep_NVIDIA_H100_80GB_HBM3_first.md)."""
    d = qt.shape[-1]
    if (qt.dtype not in (torch.float16, torch.bfloat16) or d % 8 or d > 128
            or not torch.backends.cuda.cudnn_sdp_enabled()):
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                                 scale=scale)
    except RuntimeError:  # a cuDNN build or shape it cannot take: the portable kernel instead
        return None
    return res[0], res[1].reshape(qt.shape[0], qt.shape[1], qt.shape[2])


def _unit_stride_d(t: Optional[Tensor]) -> Optional[Tensor]:
    # ATen's CPU flash kernel reads B, N, H by stride but assumes a unit stride along D.
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _joint_attention_sdpa_impl(q, k, v, context_k, context_v, scale):
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    if q.device.type == "cpu":  # before the context's batch expand, so it stays one copy
        q, k, v, context_k, context_v = map(_unit_stride_d, (q, k, v, context_k, context_v))
    return _merge_segments([_sdpa_segment(q, sk, sv, scale)
                            for sk, sv in _segments(q, k, v, context_k, context_v)])


def _joint_attention_flash_attn_impl(q, k, v, context_k, context_v, scale):
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    fa, why = _flash_attn_function(q.device)
    if fa is None:
        raise RuntimeError(f"joint_attention: flash_attn backend unavailable: {why}")
    parts = []
    for sk, sv in _segments(q, k, v, context_k, context_v):
        res = fa(q, sk, sv, softmax_scale=scale, causal=False, return_attn_probs=True)
        parts.append((res[0], res[1].float()))  # FA2: (out, lse, probs); FA3: (out, lse)
    return _merge_segments(parts)


def _joint_attention_xformers_impl(q, k, v, context_k, context_v, scale):
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    fmha, why = _import("xformers.ops.fmha")
    if fmha is None or not hasattr(fmha, "memory_efficient_attention_partial"):
        raise RuntimeError("joint_attention: xformers backend unavailable: " + (
            why or "this xformers has no memory_efficient_attention_partial (needs xformers >= 0.0.23)"))
    parts = []
    for sk, sv in _segments(q, k, v, context_k, context_v):
        out, lse = fmha.memory_efficient_attention_partial(q, sk, sv, scale=scale)
        parts.append((out.to(q.dtype), lse.float()[..., : q.shape[1]]))
    return _merge_segments(parts)


# ----------------------------------------------------------------------------------------------
# backward (shared by every registered op)
# ----------------------------------------------------------------------------------------------
def _backward_math(grad_out, grad_lse, q, k, v, context_k, context_v, out, lse, scale):
    """Per-segment backward from the saved (out, lse), materialising one segment's scores."""
    acc = _lse_dtype(q.dtype)
    qf, do = q.to(acc), grad_out.to(acc)
    lse = lse.to(acc)
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Nq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    b = q.shape[0]
    dq = torch.zeros_like(qf)
    grads = []
    for seg_k, seg_v in ((context_k, context_v), (k, v)):
        if seg_k is None:
            grads.append((None, None))
            continue
        kf = seg_k.to(acc).expand(b, -1, -1, -1)
        vf = seg_v.to(acc).expand(b, -1, -1, -1)
        p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale - lse.unsqueeze(-1))
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vf) - delta.unsqueeze(-1))
        dq += torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale
        if seg_k.shape[0] != b:  # broadcast context: sum over the query batches it served
            dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
        grads.append((dk.to(seg_k.dtype), dv.to(seg_v.dtype)))
    (dck, dcv), (dk, dv) = grads
    return dq.to(q.dtype), dk, dv, dck, dcv


def _triton_backward_ok(q: Tensor) -> bool:
    max_d = MAX_TRITON_FP32_HEAD_DIM if q.dtype == torch.float32 else MAX_TRITON_HEAD_DIM
    return (q.device.type == "cuda" and _dispatch.TRITON_AVAILABLE and q.dtype in _KERNEL_DTYPES
            and q.shape[-1] <= max_d)


def _setup_context(ctx, inputs, output):
    q, k, v, context_k, context_v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, context_k, context_v, out, lse)
    ctx.scale = scale


def _make_backward(always_triton: bool):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, context_k, context_v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if always_triton or _triton_backward_ok(q):
            # Through an op, so that torch.compile / AOT autograd can trace the backward.
            dq, dk, dv, dck, dcv = torch.ops.pfp.joint_attention_triton_backward(
                grad_out, grad_lse, q, k, v, context_k, context_v, out, lse, ctx.scale)
            if context_k is None:
                dck = dcv = None
        else:
            dq, dk, dv, dck, dcv = _backward_math(grad_out, grad_lse, q, k, v, context_k, context_v,
                                                  out, lse, ctx.scale)
        return dq, dk, dv, dck, dcv, None
    return backward


def _empty_context_grad(q: Tensor) -> Tensor:
    return q.new_empty(1, 0, q.shape[2], q.shape[3])


def _fake(q, k, v, context_k, context_v, scale):
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=_lse_dtype(q.dtype)))


def _register(name: str, always_triton: bool = False) -> None:
    torch.library.register_fake(name)(_fake)
    torch.library.register_autograd(name, _make_backward(always_triton), setup_context=_setup_context)


if _extension.LOADED:
    _register("pfp::joint_attention")


@torch.library.custom_op("pfp::joint_attention_sdpa", mutates_args=())
def _joint_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                          context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _joint_attention_sdpa_impl(q, k, v, context_k, context_v, scale)


@torch.library.custom_op("pfp::joint_attention_flash_attn", mutates_args=())
def _joint_attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _joint_attention_flash_attn_impl(q, k, v, context_k, context_v, scale)


@torch.library.custom_op("pfp::joint_attention_xformers", mutates_args=())
def _joint_attention_xformers(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                              context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _joint_attention_xformers_impl(q, k, v, context_k, context_v, scale)


for _name in ("sdpa", "flash_attn", "xformers"):
    _register(f"pfp::joint_attention_{_name}")


# Triton kernels are a Python custom op (torch.library.triton_op breaks opcheck under the
# interpreter); the launcher module imports triton, so it is imported lazily.
if _dispatch.TRITON_AVAILABLE:
    @torch.library.custom_op("pfp::joint_attention_triton", mutates_args=())
    def _joint_attention_triton(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
        from ._triton import attention as tk
        return tk.joint_attention_fwd(q, k, v, context_k, context_v, scale)

    @torch.library.custom_op("pfp::joint_attention_triton_backward", mutates_args=())
    def _joint_attention_triton_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor,
                                         k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                         context_v: Optional[Tensor], out: Tensor, lse: Tensor,
                                         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(dq, dk, dv, dcontext_k, dcontext_v); without context the last two are empty."""
        from ._triton import attention as tk
        dq, dk, dv, dck, dcv = tk.joint_attention_bwd(grad_out, grad_lse, q, k, v, context_k,
                                                      context_v, out, lse, scale)
        if dck is None:
            dck, dcv = _empty_context_grad(q), _empty_context_grad(q)
        return dq, dk, dv, dck, dcv

    @torch.library.register_fake("pfp::joint_attention_triton_backward")
    def _joint_attention_triton_backward_fake(grad_out, grad_lse, q, k, v, context_k, context_v, out,
                                              lse, scale):
        def like(t):
            return t.new_empty(t.shape) if t is not None else _empty_context_grad(q)
        return like(q), like(k), like(v), like(context_k), like(context_v)

    _register("pfp::joint_attention_triton", always_triton=True)


_OPS = {"cpp": "joint_attention", "triton": "joint_attention_triton", "sdpa": "joint_attention_sdpa",
        "flash_attn": "joint_attention_flash_attn", "xformers": "joint_attention_xformers"}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def joint_attention(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                    context_v: Optional[Tensor] = None, *, scale: Optional[float] = None,
                    impl: str = "auto", return_lse: bool = False):
    """Softmax attention of q over the keys/values ``[context ; target]``, never concatenated.

    Args:
        q: ``[B, Nq, H, D]`` target queries.
        k, v: ``[B, Nk, H, D]`` target keys and values.
        context_k, context_v: ``[B or 1, Nc, H, D]`` or None. Batch 1 serves all B query batches
            without a copy. Nc may be 0; Nc + Nk must be >= 1.
        scale: softmax scale, default ``1/sqrt(D)``.
        impl: ``"auto"`` or one of ``flash_attn, triton, xformers, cpp, sdpa, torch`` (see the
            module docstring and :func:`attention_backends`). A forced backend that cannot run
            these inputs raises RuntimeError with its reason.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out ``[B, Nq, H, D]`` (q's dtype, contiguous), and with ``return_lse`` also lse
        ``[B, H, Nq]`` (float32; float64 for float64 inputs; natural log), ready for
        :func:`merge_attention`. Differentiable in q, k, v, context_k, context_v.
    """
    reasons = attention_backends(q, k, v, context_k, context_v)
    chosen = _dispatch.resolve("joint_attention", impl, reasons,
                               _AUTO_ORDER.get(q.device.type, ("triton", "sdpa", "torch")))
    scale = _scale_or_default(scale, q.shape[-1])
    if chosen == "torch":
        out, lse = joint_attention_reference(q, k, v, context_k, context_v, scale)
    else:
        out, lse = getattr(torch.ops.pfp, _OPS[chosen])(q, k, v, context_k, context_v, scale)
    return (out, lse) if return_lse else out


__all__ = ["joint_attention", "merge_attention", "attention_backends", "joint_attention_reference",
           "ATTENTION_BACKENDS"]
