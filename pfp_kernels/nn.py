"""Thin nn.Module wrappers over pfp_kernels ops."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import conv as _conv
from .conv import shapes as _shapes

IntOr3 = Union[int, Sequence[int]]


def _init_conv_params(weight: Tensor, bias: Optional[Tensor]) -> None:
    # Same scheme as nn.Conv3d, so swapping one for the other keeps training behaviour.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3] * weight.shape[4]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class Conv3dAct(nn.Module):
    """``activation(conv3d(x) + bias)``; see :func:`pfp_kernels.conv3d_act`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3 = 3, stride: IntOr3 = 1,
                 padding: IntOr3 = 0, bias: bool = True, activation: Optional[str] = "silu",
                 impl: str = "auto", device=None, dtype=None):
        super().__init__()
        k = _shapes.triple(kernel_size, "kernel_size", minimum=1)
        self.stride = _shapes.triple(stride, "stride", minimum=1)
        self.padding = _shapes.triple(padding, "padding")
        _shapes.check_activation(activation)
        self.activation, self.impl = activation, impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *k, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        _init_conv_params(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return _conv.conv3d_act(x, self.weight, self.bias, self.stride, self.padding, self.activation, self.impl)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, activation={self.activation}")


class CausalConv3dAct(nn.Module):
    """Streaming causal ``activation(conv3d(x) + bias)``; see :func:`pfp_kernels.causal_conv3d_act`.

    ``forward(x, state=None) -> (y, state)``: the stream state is a value the caller keeps and
    passes back (None starts a stream), so the module holds no per-stream data and one module can
    serve any number of streams. Fed chunk by chunk, the outputs concatenated over time equal one
    call on the whole sequence.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3 = 3, stride: IntOr3 = 1,
                 padding_hw: Union[int, Sequence[int]] = 0, bias: bool = True,
                 activation: Optional[str] = "silu", impl: str = "auto", device=None, dtype=None):
        super().__init__()
        k = _shapes.triple(kernel_size, "kernel_size", minimum=1)
        self.stride = _shapes.triple(stride, "stride", minimum=1)
        self.padding_hw = _shapes.triple(padding_hw, "padding_hw", n=2)
        _shapes.check_activation(activation)
        self.activation, self.impl = activation, impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *k, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        _init_conv_params(self.weight, self.bias)

    def forward(self, x: Tensor, state: Optional[_conv.CausalConvState] = None
                ) -> tuple[Tensor, _conv.CausalConvState]:
        """x ``[B, Cin, N, H, W]`` new frames (N may be 0) -> (new output frames, the state to pass next)."""
        return _conv.causal_conv3d_act(x, self.weight, self.bias, self.stride, self.padding_hw,
                                       self.activation, state=state, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, padding_hw={tuple(self.padding_hw)}, activation={self.activation}")


class TokenProjection(nn.Module):
    """1x1x1 projection of ``[B, C, T, H, W]`` into ``[B, T*H*W, Cout]`` tokens (+ residual)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    def forward(self, h: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _conv.project_tokens(h, self.weight, self.bias, residual, impl=self.impl)


__all__ = ["Conv3dAct", "CausalConv3dAct", "TokenProjection"]
