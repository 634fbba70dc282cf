"""Argument checks of joint_attention, shared by every backend."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def check_inputs(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                 context_v: Optional[Tensor], context_mask: Optional[Tensor] = None) -> None:
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
    if context_mask is not None:
        if context_k is None:
            raise ValueError(f"{op}: context_mask was given without a context (context_k is None)")
        if not isinstance(context_mask, Tensor) or context_mask.dtype != torch.bool:
            raise ValueError(f"{op}: context_mask must be a bool tensor [B or 1, Nc] (True = attend), got "
                             f"{getattr(context_mask, 'dtype', type(context_mask).__name__)}")
        if context_mask.dim() != 2 or context_mask.shape[0] not in (1, b) or context_mask.shape[1] != context_k.shape[1]:
            raise ValueError(f"{op}: context_mask must be [1 or {b}, Nc={context_k.shape[1]}], got "
                             f"{tuple(context_mask.shape)}")
        if context_mask.device != q.device:
            raise ValueError(f"{op}: context_mask is on {context_mask.device} but q is on {q.device}")
    n_keys = k.shape[1] + (context_k.shape[1] if context_k is not None else 0)
    if n_keys == 0 and q.shape[1] > 0:
        raise ValueError(f"{op}: there are no keys (Nk=0 and no context); softmax over nothing is undefined")


def scale_or_default(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"joint_attention: scale must be finite, got {scale}")
    return scale
