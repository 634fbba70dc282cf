"""Joint context attention (placeholder API: the full op lands with the attention issue)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def joint_attention_reference(q, k, v, context_k=None, context_v=None, scale=None):
    """Softmax attention of q over cat(context, target). Layout [B, N, H, D]. Returns (out, lse)."""
    if context_k is not None:
        b = q.shape[0]
        k = torch.cat([context_k.expand(b, -1, -1, -1), k], dim=1)
        v = torch.cat([context_v.expand(b, -1, -1, -1), v], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float())
    return out.to(q.dtype), lse


def attention_backends(q, k, v, context_k=None, context_v=None) -> dict[str, Optional[str]]:
    return {"torch": None}


def joint_attention(q, k, v, context_k=None, context_v=None, *, scale=None, impl="auto", return_lse=False):
    out, lse = joint_attention_reference(q, k, v, context_k, context_v, scale)
    return (out, lse) if return_lse else out


def merge_attention(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor):
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).transpose(1, 2).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype), lse
