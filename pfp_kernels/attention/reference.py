"""The plain-PyTorch reference of joint_attention (``impl="torch"``; the tests compare every backend
with it in fp64) and the exact merge of two partial attentions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import scale_or_default


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp dtype every backend returns: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_mask(q: Tensor, k: Tensor, context_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``[B, Nc + Nk]`` bool over ``[context ; target]`` keys (targets always True), or None."""
    if context_mask is None:
        return None
    b = q.shape[0]
    return torch.cat([context_mask.expand(b, -1), context_mask.new_ones(b, k.shape[1])], dim=1)


def joint_attention_reference(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                              context_v: Optional[Tensor] = None, scale: Optional[float] = None,
                              context_mask: Optional[Tensor] = None):
    """Softmax attention of q over cat(context, target), materialised. ``(out, lse)``: out
    ``[B, Nq, H, D]`` in q's dtype, lse ``[B, H, Nq]`` (fp32, or fp64 for fp64 inputs).
    ``context_mask [B or 1, Nc]`` (True = attend) leaves masked context keys out; a query left
    with no key at all gets out 0 and lse -inf."""
    scale = scale_or_default(scale, q.shape[-1])
    keep = key_mask(q, k, context_mask)
    if context_k is not None:
        b = q.shape[0]
        k = torch.cat([context_k.expand(b, -1, -1, -1), k], dim=1)
        v = torch.cat([context_v.expand(b, -1, -1, -1), v], dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # a row with no key: -inf - -inf
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc))
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
