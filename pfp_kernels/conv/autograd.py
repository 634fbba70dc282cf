"""Registration of the conv ops with torch.library: fake kernels (shapes and the channels-last-3d
layout every implementation writes) and autograd, for the C++ ops ``pfp::conv3d_act``,
``pfp::causal_conv3d_act``, ``pfp::project_tokens`` and their Triton twins ``pfp::*_triton``.

The Triton kernels are Python custom ops (``torch.library.triton_op`` breaks opcheck under the
interpreter); their launchers live in ``triton.py``, imported when first run. Backward is plain
PyTorch for every implementation: ATen's conv backward through the recomputed pre-activation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._registry import TRITON_AVAILABLE
from .reference import causal_window
from .shapes import causal_out_shape, conv_out_shape

CL3 = torch.channels_last_3d


def _conv3d_act_fake(x, weight, bias, stride, padding, activation):
    return x.new_empty(conv_out_shape(x.shape, weight.shape, stride, padding)).contiguous(memory_format=CL3)


def _causal_conv3d_act_fake(x, prev, weight, bias, stride, padding_hw, activation, time_offset, num_out):
    shape = causal_out_shape(x.shape, weight.shape, stride, padding_hw, num_out)
    return x.new_empty(shape).contiguous(memory_format=CL3)


def _project_tokens_fake(h, weight, bias, residual):
    return h.new_empty(h.shape[0], h.shape[2] * h.shape[3] * h.shape[4], weight.shape[0])


def _act_backward(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    if activation != "silu":
        return grad
    sig = torch.sigmoid(z.float())
    return (grad.float() * sig * (1 + z.float() * (1 - sig))).to(grad.dtype)


def _setup_conv(ctx, inputs, output):
    x, weight, bias, stride, padding, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.stride, ctx.padding, ctx.activation = list(stride), list(padding), activation
    ctx.has_bias = bias is not None


def _grads_through_conv(grad, x_in, weight, bias, stride, padding, activation, mask):
    z = torch.ops.aten.convolution(x_in, weight, bias, stride, padding, [1, 1, 1], False,
                                   [0, 0, 0], 1)
    grad_z = _act_backward(grad.to(z.dtype), z, activation)
    bias_sizes = [weight.shape[0]] if bias is not None else None
    return torch.ops.aten.convolution_backward(
        grad_z, x_in, weight, bias_sizes, stride, padding, [1, 1, 1], False, [0, 0, 0], 1, mask)


def _backward_conv(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = _grads_through_conv(grad, x, weight, bias, ctx.stride, ctx.padding, ctx.activation, mask)
    return gx, gw, (gb if mask[2] else None), None, None, None


def _setup_causal(ctx, inputs, output):
    x, prev, weight, bias, stride, padding_hw, activation, time_offset, num_out = inputs
    ctx.save_for_backward(x, prev, weight, bias)
    ctx.stride, ctx.padding_hw, ctx.activation = list(stride), list(padding_hw), activation
    ctx.time_offset, ctx.num_out = time_offset, num_out
    ctx.has_prev, ctx.has_bias = prev is not None, bias is not None


def _backward_causal(ctx, grad):
    x, prev, weight, bias = ctx.saved_tensors
    nones = (None,) * 5
    if ctx.num_out == 0:
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gp = torch.zeros_like(prev) if ctx.has_prev and ctx.needs_input_grad[1] else None
        gw = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
        gb = torch.zeros_like(bias) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (gx, gp, gw, gb) + nones
    kt = weight.shape[2]
    st = ctx.stride[0]
    # Reference math: build V = [zeros ; prev ; x] explicitly, differentiate, then split.
    p = prev.shape[2] if prev is not None else 0
    lead = max(0, -ctx.time_offset)
    start = max(0, ctx.time_offset)
    window = causal_window(x, prev, kt, st, ctx.time_offset, ctx.num_out)
    mask = [True, ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
    g_win, gw, gb = _grads_through_conv(grad, window, weight, bias, ctx.stride,
                                        [0] + ctx.padding_hw, ctx.activation, mask)
    # g_win covers V indices [start, start + window_len) of the zero-extended V; map back.
    total = lead + p + x.shape[2]
    g_full = g_win.new_zeros(g_win.shape[0], g_win.shape[1], total, g_win.shape[3], g_win.shape[4])
    g_full[:, :, start: start + g_win.shape[2]] = g_win
    g_full = g_full[:, :, lead:]
    gp = g_full[:, :, :p] if ctx.has_prev and ctx.needs_input_grad[1] else None
    gx = g_full[:, :, p:] if ctx.needs_input_grad[0] else None
    return (gx, gp, gw if mask[1] else None, gb if mask[2] else None) + nones


def _setup_project(ctx, inputs, output):
    h, weight, bias, residual = inputs
    ctx.save_for_backward(h, weight)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None


def _backward_project(ctx, grad):
    h, weight = ctx.saved_tensors
    b, c, t, hh, ww = h.shape
    gh = gw = gb = gr = None
    if ctx.needs_input_grad[0]:
        gh = (grad @ weight).reshape(b, t, hh, ww, c).permute(0, 4, 1, 2, 3)
    if ctx.needs_input_grad[1]:
        tokens = h.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
        gw = (grad.reshape(-1, grad.shape[-1]).t() @ tokens.reshape(-1, c))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    if ctx.has_residual and ctx.needs_input_grad[3]:
        gr = grad
    return gh, gw, gb, gr


def _register_fake_and_autograd(prefix: str) -> None:
    """Register fake kernels and autograd for pfp::conv3d_act{prefix} etc."""
    torch.library.register_fake(f"pfp::conv3d_act{prefix}")(_conv3d_act_fake)
    torch.library.register_autograd(f"pfp::conv3d_act{prefix}", _backward_conv, setup_context=_setup_conv)
    torch.library.register_fake(f"pfp::causal_conv3d_act{prefix}")(_causal_conv3d_act_fake)
    torch.library.register_autograd(f"pfp::causal_conv3d_act{prefix}", _backward_causal,
                                    setup_context=_setup_causal)
    torch.library.register_fake(f"pfp::project_tokens{prefix}")(_project_tokens_fake)
    torch.library.register_autograd(f"pfp::project_tokens{prefix}", _backward_project,
                                    setup_context=_setup_project)


if _extension.LOADED:
    _register_fake_and_autograd("")


# Triton kernels are Python custom ops (torch.library.triton_op breaks opcheck under the
# interpreter). Their launchers live in triton.py, imported on first use (it imports triton).
if TRITON_AVAILABLE:
    @torch.library.custom_op("pfp::conv3d_act_triton", mutates_args=())
    def _conv3d_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                           padding: list[int], activation: str) -> Tensor:
        from . import triton as tk
        return tk.conv3d_act(x, weight, bias, stride, padding, activation)

    @torch.library.custom_op("pfp::causal_conv3d_act_triton", mutates_args=())
    def _causal_conv3d_act_triton(x: Tensor, prev: Optional[Tensor], weight: Tensor,
                                  bias: Optional[Tensor], stride: list[int], padding_hw: list[int],
                                  activation: str, time_offset: int, num_out: int) -> Tensor:
        from . import triton as tk
        return tk.causal_conv3d_act(x, prev, weight, bias, stride, padding_hw, activation,
                                    time_offset, num_out)

    @torch.library.custom_op("pfp::project_tokens_triton", mutates_args=())
    def _project_tokens_triton(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                               residual: Optional[Tensor]) -> Tensor:
        from . import triton as tk
        return tk.project_tokens(h, weight, bias, residual)

    _register_fake_and_autograd("_triton")
