"""Plain-PyTorch references of the conv ops; the tests compare every implementation with these in
fp64, and ``impl="torch"`` runs them."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import causal_out_shape

CL3 = torch.channels_last_3d


def act(z: Tensor, activation: str) -> Tensor:
    return F.silu(z) if activation == "silu" else z


def conv3d_act_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                         padding: list[int], activation: str) -> Tensor:
    y = act(F.conv3d(x, weight, bias, stride, padding), activation)
    return y.contiguous(memory_format=CL3)


def causal_window(x: Tensor, prev: Optional[Tensor], kt: int, st: int, time_offset: int,
                  num_out: int) -> Tensor:
    """The frames of V = [zeros ; prev ; x] that num_out outputs read (copies; the kernels don't)."""
    v = x if prev is None else torch.cat([prev, x], dim=2)
    if time_offset < 0:
        zeros = v.new_zeros(v.shape[0], v.shape[1], -time_offset, v.shape[3], v.shape[4])
        v = torch.cat([zeros, v], dim=2)
        time_offset = 0
    return v[:, :, time_offset: time_offset + st * (num_out - 1) + kt]


def causal_conv3d_act_reference(x: Tensor, prev: Optional[Tensor], weight: Tensor,
                                bias: Optional[Tensor], stride: list[int], padding_hw: list[int],
                                activation: str, time_offset: int, num_out: int) -> Tensor:
    if num_out == 0:
        shape = causal_out_shape(x.shape, weight.shape, stride, padding_hw, 0)
        return x.new_empty(shape).contiguous(memory_format=CL3)
    window = causal_window(x, prev, weight.shape[2], stride[0], time_offset, num_out)
    y = act(F.conv3d(window, weight, bias, stride, [0] + list(padding_hw)), activation)
    return y.contiguous(memory_format=CL3)


def project_tokens_reference(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                             residual: Optional[Tensor]) -> Tensor:
    b, c = h.shape[:2]
    tokens = h.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
    y = F.linear(tokens, weight, bias)
    return y + residual if residual is not None else y
