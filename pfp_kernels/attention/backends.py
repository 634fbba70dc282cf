"""The Python-level backends of joint_attention: SDPA (ATen's fused kernels, cuDNN on CUDA),
flash-attn (FA3 or FA2) and xformers, each run once per key segment with its log-sum-exp and
merged exactly. Each returns ``(out [B, Nq, H, D], lse [B, H, Nq])``. Also the table of optional
packages and their imports, asked without importing anything while torch.compile traces.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .reference import _merge, key_mask, lse_dtype

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


def _segments(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor], context_v: Optional[Tensor],
              context_mask: Optional[Tensor] = None):
    """Non-empty (keys, values, key mask or None) segments, the context expanded (stride 0, no
    copy) to q's batch."""
    segs = []
    if context_k is not None and context_k.shape[1] > 0:
        b = q.shape[0]
        keep = None if context_mask is None else context_mask.expand(b, -1)
        segs.append((context_k.expand(b, -1, -1, -1), context_v.expand(b, -1, -1, -1), keep))
    if k.shape[1] > 0:
        segs.append((k, v, None))
    return segs


def _merge_segments(parts):
    out, lse = parts[0]
    for o2, l2 in parts[1:]:
        out, lse = _merge(out, lse, o2, l2)
    return out.contiguous(), lse.contiguous()


def _empty_result(q: Tensor):
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=lse_dtype(q.dtype)))


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, N]`` bool (True = attend) -> ``[B, 1, 1, N]`` 0 / -inf in ``dtype`` (ATen's CPU flash
    kernel takes a mask only in the query's dtype)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[:, None, None]


def _sdpa_segment(q: Tensor, k: Tensor, v: Tensor, scale: float, keep: Optional[Tensor] = None):
    """(out, lse) of q over one key segment; ``keep [B, N]`` bool masks keys (CPU only). A query
    whose keys are all masked gets out 0 and lse -inf, so the merge leaves it to the other segment."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views, [B, H, N, D]
    if q.device.type == "cpu":
        mask = None if keep is None else additive_mask(keep, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False,
                                                                            attn_mask=mask, scale=scale)
        if keep is not None:  # ATen gives lse 0 to a query with no key: -inf says "nothing here"
            lse = lse.masked_fill(~keep.any(-1)[:, None, None], float("-inf"))
    elif keep is not None:
        raise RuntimeError("joint_attention: the sdpa backend takes a key mask on CPU only")
    else:
        out = _cudnn_segment(qt, kt, vt, scale)
        if out is not None:
            out, lse = out
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                         scale=scale)
            out, lse = res[0], res[1][..., : q.shape[1]]  # its lse is padded to a multiple of 32
    return out.transpose(1, 2), lse.to(lse_dtype(q.dtype))


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


def _joint_attention_sdpa_impl(q, k, v, context_k, context_v, scale, context_mask=None):
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    if q.device.type == "cpu":  # before the context's batch expand, so it stays one copy
        q, k, v, context_k, context_v = map(_unit_stride_d, (q, k, v, context_k, context_v))
    return _merge_segments([_sdpa_segment(q, sk, sv, scale, keep)
                            for sk, sv, keep in _segments(q, k, v, context_k, context_v, context_mask)])


def _concatenated(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor], context_v: Optional[Tensor]):
    """``[context ; target]`` keys and values, the context expanded to q's batch (a copy)."""
    if context_k is None:
        return k, v
    b = q.shape[0]
    return (torch.cat([context_k.expand(b, -1, -1, -1), k], dim=1),
            torch.cat([context_v.expand(b, -1, -1, -1), v], dim=1))


def joint_attention_sdpa_concat(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                context_v: Optional[Tensor], scale: float,
                                context_mask: Optional[Tensor] = None) -> Tensor:
    """The stock way: ``F.scaled_dot_product_attention`` over the concatenation, PyTorch's kernel
    choice (cuDNN or FlashAttention-2 on CUDA) and its own backward, with the key mask as its
    ``attn_mask``. Differentiable as it stands."""
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return q.new_empty(q.shape)
    keys, values = _concatenated(q, k, v, context_k, context_v)
    keep = key_mask(q, k, context_mask)
    # with no target keys, a sample whose context is all masked has no key left
    return sdpa_over_keys(q, keys, values, keep, scale, may_lack_keys=keep is not None and k.shape[1] == 0)


def sdpa_over_keys(q: Tensor, keys: Tensor, values: Tensor, keep: Optional[Tensor], scale: float,
                   may_lack_keys: bool) -> Tensor:
    """``F.scaled_dot_product_attention`` of q ``[B, Nq, H, D]`` over keys/values ``[B, Nk, H, D]``
    where ``keep`` ``[B, Nk]`` (or None) says which keys take part; contiguous ``[B, Nq, H, D]``.
    ``may_lack_keys``: a sample may be left with no key. Its out is 0, as in every backend; SDPA
    would give NaN there on CUDA, forward and backward (exp(-inf + inf)), so such a sample attends
    to every key and its out is then zeroed (gradient 0, not NaN)."""
    empty = None
    if keep is not None and may_lack_keys:
        empty = ~keep.any(-1)
        keep = keep | empty[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), scale=scale,
        attn_mask=None if keep is None else keep[:, None, None, :])
    out = out.transpose(1, 2)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0)
    return out.contiguous()


def _joint_attention_sdpa_concat_impl(q, k, v, context_k, context_v, scale, context_mask=None):
    """(out, lse) over the concatenation, for callers that want the log-sum-exp (an op with the
    shared backward; without the lse, :func:`joint_attention_sdpa_concat` keeps PyTorch's)."""
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    if q.device.type == "cpu":
        q, k, v, context_k, context_v = map(_unit_stride_d, (q, k, v, context_k, context_v))
    keys, values = _concatenated(q, k, v, context_k, context_v)
    out, lse = _sdpa_segment(q, keys, values, scale, key_mask(q, k, context_mask))
    return out.contiguous(), lse.contiguous()


def _joint_attention_flash_attn_impl(q, k, v, context_k, context_v, scale):
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return _empty_result(q)
    fa, why = _flash_attn_function(q.device)
    if fa is None:
        raise RuntimeError(f"joint_attention: flash_attn backend unavailable: {why}")
    parts = []
    for sk, sv, _ in _segments(q, k, v, context_k, context_v):
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
    for sk, sv, _ in _segments(q, k, v, context_k, context_v):
        out, lse = fmha.memory_efficient_attention_partial(q, sk, sv, scale=scale)
        parts.append((out.to(q.dtype), lse.float()[..., : q.shape[1]]))
    return _merge_segments(parts)
