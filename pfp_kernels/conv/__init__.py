"""Fused conv3d + bias + activation, its streaming causal form, and the token projection.

Everything about these ops that is not a kernel lives here: argument checks, the plain-PyTorch
references, the streaming state, registration (fake kernels and autograd) and the choice of
implementation. Kernels:

- ``cpp``    csrc/conv3d_act.cpp (pfp::conv3d_act, pfp::causal_conv3d_act, pfp::project_tokens)
- ``triton`` pfp_kernels/_triton/conv3d.py, wrapped here as the custom ops pfp::*_triton
- ``torch``  the ``*_reference`` functions below

Layout: activations are ``[B, C, T, H, W]`` tensors; channels-last-3d is preferred and is what
the kernels write, so stacked stages never relayout. Time convention for the causal form (see
shared/design.md): output frame j of temporal kernel k and stride s reads input frames
s*j-(k-1) .. s*j; frames before 0 are zeros; T input frames give ceil(T/s) outputs.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, _extension

IntOr3 = Union[int, Sequence[int]]
ACTIVATIONS = ("silu", None)
CONV_IMPLS = ("cpp", "triton", "torch")
CL3 = torch.channels_last_3d


# ----------------------------------------------------------------------------------------------
# argument checks (shared by every implementation so that errors read the same everywhere)
# ----------------------------------------------------------------------------------------------
def _triple(value: IntOr3, name: str, n: int = 3, minimum: int = 0) -> list[int]:
    def whole(v) -> int:
        # no bools (True would mean 1) and no floats (2.5 would silently become 2)
        if isinstance(v, bool):
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
        try:
            return operator.index(v)
        except TypeError:
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}") from None

    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        out = [whole(value)] * n
    else:
        out = [whole(v) for v in value]
        if len(out) != n:
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {tuple(out)}")
    return out


def _check_activation(activation: Optional[str]) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def _check_conv_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D [B, Cin, T, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"{op}: weight must be 5-D [Cout, Cin, kt, kh, kw], got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but weight expects Cin={weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{op}: x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{op}: weight must match x in dtype and device; x is {x.dtype} on {x.device}, "
                         f"weight is {weight.dtype} on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"{op}: bias must match x in dtype and device; got {bias.dtype} on {bias.device}")


def _device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory on ``device`` (CPU: physical RAM), None where unknown."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError, AssertionError):
        pass
    return None


def _check_output_fits(op: str, x: Tensor, shape: Sequence[int]) -> None:
    """Refuse an output larger than the device's whole memory with a message, before the
    allocator is asked for it (large paddings or inputs make such shapes easily). Traces on the
    meta device or under FakeTensorMode, which allocate nothing, are not limited, nor is code
    that torch.compile traces (the check would break its graph)."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(x):
        return
    nbytes = math.prod(int(d) for d in shape) * x.element_size()
    memory = _device_memory(x.device)
    if memory is not None and nbytes > memory:
        raise ValueError(f"{op}: the output {list(shape)} would take {nbytes / 2 ** 30:.1f} GiB, more than the "
                         f"{memory / 2 ** 30:.1f} GiB of {x.device}; check the input size, stride and padding")


def _out_hw(size: int, k: int, s: int, p: int, name: str) -> int:
    out = (size + 2 * p - k) // s + 1
    if out <= 0:
        raise ValueError(f"input {name}={size} is too small for kernel {k} with padding {p}")
    return out


# ----------------------------------------------------------------------------------------------
# references (plain PyTorch; the tests compare every implementation with these in fp64)
# ----------------------------------------------------------------------------------------------
def _act(z: Tensor, activation: str) -> Tensor:
    return F.silu(z) if activation == "silu" else z


def conv3d_act_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                         padding: list[int], activation: str) -> Tensor:
    y = _act(F.conv3d(x, weight, bias, stride, padding), activation)
    return y.contiguous(memory_format=CL3)


def _causal_window(x: Tensor, prev: Optional[Tensor], kt: int, st: int, time_offset: int,
                   num_out: int) -> Tensor:
    """The frames of V = [zeros ; prev ; x] that num_out outputs read (reference only: copies)."""
    v = x if prev is None else torch.cat([prev, x], dim=2)
    if time_offset < 0:
        zeros = v.new_zeros(v.shape[0], v.shape[1], -time_offset, v.shape[3], v.shape[4])
        v = torch.cat([zeros, v], dim=2)
        time_offset = 0
    return v[:, :, time_offset: time_offset + st * (num_out - 1) + kt]


def causal_conv3d_act_reference(x: Tensor, prev: Optional[Tensor], weight: Tensor,
                                bias: Optional[Tensor], stride: list[int], padding_hw: list[int],
                                activation: str, time_offset: int, num_out: int) -> Tensor:
    kt, kh, kw = weight.shape[2:]
    if num_out == 0:
        ho = _out_hw(x.shape[3], kh, stride[1], padding_hw[0], "H")
        wo = _out_hw(x.shape[4], kw, stride[2], padding_hw[1], "W")
        return x.new_empty(x.shape[0], weight.shape[0], 0, ho, wo).contiguous(memory_format=CL3)
    window = _causal_window(x, prev, kt, stride[0], time_offset, num_out)
    y = _act(F.conv3d(window, weight, bias, stride, [0] + list(padding_hw)), activation)
    return y.contiguous(memory_format=CL3)


def project_tokens_reference(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                             residual: Optional[Tensor]) -> Tensor:
    b, c = h.shape[:2]
    tokens = h.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
    y = F.linear(tokens, weight, bias)
    return y + residual if residual is not None else y


# ----------------------------------------------------------------------------------------------
# registration: fake kernels + autograd for the C++ ops and the Triton custom ops
# ----------------------------------------------------------------------------------------------
def _conv_out_shape(x: Tensor, weight: Tensor, stride, padding) -> list[int]:
    kt, kh, kw = weight.shape[2:]
    return [x.shape[0], weight.shape[0],
            (x.shape[2] + 2 * padding[0] - kt) // stride[0] + 1,
            (x.shape[3] + 2 * padding[1] - kh) // stride[1] + 1,
            (x.shape[4] + 2 * padding[2] - kw) // stride[2] + 1]


def _conv3d_act_fake(x, weight, bias, stride, padding, activation):
    return x.new_empty(_conv_out_shape(x, weight, stride, padding)).contiguous(memory_format=CL3)


def _causal_conv3d_act_fake(x, prev, weight, bias, stride, padding_hw, activation, time_offset, num_out):
    kt, kh, kw = weight.shape[2:]
    shape = [x.shape[0], weight.shape[0], num_out,
             (x.shape[3] + 2 * padding_hw[0] - kh) // stride[1] + 1,
             (x.shape[4] + 2 * padding_hw[1] - kw) // stride[2] + 1]
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
    window = _causal_window(x, prev, kt, st, ctx.time_offset, ctx.num_out)
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
# interpreter). Their launchers live in pfp_kernels/_triton/conv3d.py and import triton lazily.
if _dispatch.TRITON_AVAILABLE:
    @torch.library.custom_op("pfp::conv3d_act_triton", mutates_args=())
    def _conv3d_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                           padding: list[int], activation: str) -> Tensor:
        from ._triton import conv3d as tk
        return tk.conv3d_act(x, weight, bias, stride, padding, activation)

    @torch.library.custom_op("pfp::causal_conv3d_act_triton", mutates_args=())
    def _causal_conv3d_act_triton(x: Tensor, prev: Optional[Tensor], weight: Tensor,
                                  bias: Optional[Tensor], stride: list[int], padding_hw: list[int],
                                  activation: str, time_offset: int, num_out: int) -> Tensor:
        from ._triton import conv3d as tk
        return tk.causal_conv3d_act(x, prev, weight, bias, stride, padding_hw, activation,
                                    time_offset, num_out)

    @torch.library.custom_op("pfp::project_tokens_triton", mutates_args=())
    def _project_tokens_triton(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                               residual: Optional[Tensor]) -> Tensor:
        from ._triton import conv3d as tk
        return tk.project_tokens(h, weight, bias, residual)

    _register_fake_and_autograd("_triton")


# ----------------------------------------------------------------------------------------------
# implementation choice
# ----------------------------------------------------------------------------------------------
def conv_impl_reasons(op: str, device: torch.device) -> dict[str, Optional[str]]:
    """For each implementation of pfp::<op>: None if it can run on `device`, else why not."""
    return {"cpp": _dispatch.cpp_why_not(op, device),
            "triton": _dispatch.triton_why_not(device),
            "torch": None}


_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _choose(op: str, impl: str, device: torch.device) -> str:
    order = _AUTO_ORDER.get(device.type, ("triton", "torch"))
    return _dispatch.resolve(op, impl, conv_impl_reasons(op, device), order)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def conv3d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOr3 = 1,
               padding: IntOr3 = 0, activation: Optional[str] = "silu", impl: str = "auto") -> Tensor:
    """``activation(conv3d(x, weight) + bias)`` in one kernel.

    Args:
        x: ``[B, Cin, T, H, W]``, any memory format (channels-last-3d avoids relayout copies).
        weight: ``[Cout, Cin, kt, kh, kw]``.
        bias: ``[Cout]`` or None.
        stride, padding: int or (t, h, w); stride >= 1, padding >= 0 (zeros, symmetric).
        activation: ``"silu"`` or None.
        impl: ``"auto"`` (fastest available for the device), ``"cpp"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, Cout, To, Ho, Wo]`` in channels-last-3d, dtype of x (accumulation in fp32).
    """
    _check_conv_args(x, weight, bias, "conv3d_act")
    stride = _triple(stride, "stride", minimum=1)
    padding = _triple(padding, "padding")
    act = _check_activation(activation)
    if x.shape[2] == 0:
        raise ValueError("conv3d_act: x has an empty time dimension (T=0); a non-causal conv needs T >= 1")
    out = [_out_hw(x.shape[2 + axis], weight.shape[2 + axis], stride[axis], padding[axis], name)
           for axis, name in enumerate("THW")]
    _check_output_fits("conv3d_act", x, [x.shape[0], weight.shape[0], *out])
    chosen = _choose("conv3d_act", impl, x.device)
    if chosen == "torch":
        return conv3d_act_reference(x, weight, bias, stride, padding, act)
    op = torch.ops.pfp.conv3d_act if chosen == "cpp" else torch.ops.pfp.conv3d_act_triton
    return op(x, weight, bias, stride, padding, act)


@dataclass(eq=False)
class CausalConvState:
    """What a streaming causal conv keeps between calls.

    frames: the last input frames still needed by future outputs, ``[B, Cin, P, H, W]`` with
        P <= kt - 1, or None when none are (start of stream, or stride > kernel).
    frames_seen: input frames consumed since the stream began.
    signature: the geometry the state belongs to; a state is only valid for a layer of the same
        weight shape, stride, padding and activation, and inputs of the same batch, channels, H, W,
        dtype and device. It is a value: it holds input frames, nothing of the weights, so any
        layer of that geometry may continue it (e.g. two heads over one input stream).
    """

    frames: Optional[Tensor]
    frames_seen: int
    signature: tuple


def _state_signature(x: Tensor, weight: Tensor, stride, padding_hw, act: str) -> tuple:
    return (tuple(weight.shape), tuple(stride), tuple(padding_hw), act, x.shape[0], x.shape[1], x.shape[3],
            x.shape[4], x.dtype, x.device)


_SIG_FIELDS = ("weight shape", "stride", "padding_hw", "activation", "batch size",
               "channels", "H", "W", "dtype", "device")


def _check_state(state: CausalConvState, signature: tuple) -> None:
    if not isinstance(state, CausalConvState):
        raise ValueError(f"state must be a CausalConvState returned by causal_conv3d_act, got {type(state).__name__}")
    for field, have, want in zip(_SIG_FIELDS, state.signature, signature):
        if have != want:
            raise ValueError(f"state does not match this call: its {field} is {have!r}, the inputs' is "
                             f"{want!r}; pass state=None to start a new stream")


def causal_conv3d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOr3 = 1,
                      padding_hw: Union[int, Sequence[int]] = 0, activation: Optional[str] = "silu",
                      state: Optional[CausalConvState] = None, impl: str = "auto"
                      ) -> tuple[Tensor, CausalConvState]:
    """Causal-in-time ``activation(conv3d(x) + bias)`` that streams.

    Output frame j reads input frames ``s*j-(kt-1) .. s*j`` (frames before the stream start are
    zeros); H and W are zero-padded by ``padding_hw``. Feed a sequence in chunks of any length,
    passing back the returned state: the outputs, concatenated over time, equal one call on the
    whole sequence. Each output frame is produced once, as soon as its last input frame arrives,
    so a chunk of N frames after n0 gives ``ceil((n0+N)/s) - ceil(n0/s)`` frames (possibly 0).

    Args:
        x: ``[B, Cin, N, H, W]`` new frames (N may be 0).
        weight: ``[Cout, Cin, kt, kh, kw]``; bias: ``[Cout]`` or None.
        stride: int or (t, h, w), >= 1. padding_hw: int or (h, w), >= 0.
        state: None to start a stream, else the state returned by this layer's previous call.

    Returns:
        ``(y, state)``: y is ``[B, Cout, M, Ho, Wo]`` channels-last-3d; state holds at most
        kt-1 input frames, so the cost of a call does not grow with history.
    """
    _check_conv_args(x, weight, bias, "causal_conv3d_act")
    stride = _triple(stride, "stride", minimum=1)
    padding_hw = _triple(padding_hw, "padding_hw", n=2)
    act = _check_activation(activation)
    kt, kh, kw = weight.shape[2:]
    ho = _out_hw(x.shape[3], kh, stride[1], padding_hw[0], "H")
    wo = _out_hw(x.shape[4], kw, stride[2], padding_hw[1], "W")
    signature = _state_signature(x, weight, stride, padding_hw, act)
    if state is not None:
        _check_state(state, signature)
    st = stride[0]
    n0 = state.frames_seen if state is not None else 0
    prev = state.frames if state is not None else None
    p = prev.shape[2] if prev is not None else 0
    n = n0 + x.shape[2]
    j0, j1 = -(-n0 // st), -(-n // st)
    num_out = j1 - j0
    _check_output_fits("causal_conv3d_act", x, [x.shape[0], weight.shape[0], num_out, ho, wo])
    # V index of stream frame g is g - (n0 - p).
    time_offset = st * j0 - (kt - 1) - (n0 - p)

    chosen = _choose("causal_conv3d_act", impl, x.device)
    if chosen == "torch":
        y = causal_conv3d_act_reference(x, prev, weight, bias, stride, padding_hw, act, time_offset, num_out)
    else:
        op = torch.ops.pfp.causal_conv3d_act if chosen == "cpp" else torch.ops.pfp.causal_conv3d_act_triton
        y = op(x, prev, weight, bias, stride, padding_hw, act, time_offset, num_out)

    # Keep stream frames [first frame of the next output, n); bounded by kt - 1 frames.
    keep_from = min(max(st * j1 - (kt - 1), 0), n)
    if keep_from == n:
        frames = None
    elif keep_from >= n0:
        frames = x[:, :, keep_from - n0:].clone(memory_format=torch.preserve_format)
    else:
        frames = torch.cat([prev[:, :, keep_from - (n0 - p):], x], dim=2)
    return y, CausalConvState(frames, n, signature)


def project_tokens(h: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   residual: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """1x1x1 projection of features into tokens, with an optional residual added in the epilogue.

    Args:
        h: ``[B, C, T, H, W]`` (channels-last-3d makes the token view free).
        weight: ``[Cout, C]`` or ``[Cout, C, 1, 1, 1]``; bias: ``[Cout]`` or None.
        residual: ``[B, T*H*W, Cout]`` or None (e.g. the low-res branch's tokens).

    Returns:
        ``[B, T*H*W, Cout]`` tokens ordered (t, h, w), dtype of h.
    """
    if h.dim() != 5:
        raise ValueError(f"project_tokens: h must be 5-D [B, C, T, H, W], got shape {tuple(h.shape)}")
    if weight.dim() == 5:
        if tuple(weight.shape[2:]) != (1, 1, 1):
            raise ValueError(f"project_tokens: a 5-D weight must be [Cout, C, 1, 1, 1], got {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"project_tokens: weight must be [Cout, C={h.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != h.dtype or weight.device != h.device:
        raise ValueError(f"project_tokens: weight must match h in dtype and device; h is {h.dtype} on "
                         f"{h.device}, weight is {weight.dtype} on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != h.dtype or bias.device != h.device):
        raise ValueError(f"project_tokens: bias must be [{weight.shape[0]}] with h's dtype and device, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    n_tok = h.shape[2] * h.shape[3] * h.shape[4]
    if residual is not None:
        want = (h.shape[0], n_tok, weight.shape[0])
        if tuple(residual.shape) != want:
            raise ValueError(f"project_tokens: residual must have shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != h.dtype or residual.device != h.device:
            raise ValueError(f"project_tokens: residual must match h in dtype and device, got "
                             f"{residual.dtype} on {residual.device}")
    chosen = _choose("project_tokens", impl, h.device)
    if chosen == "torch":
        return project_tokens_reference(h, weight, bias, residual)
    op = torch.ops.pfp.project_tokens if chosen == "cpp" else torch.ops.pfp.project_tokens_triton
    return op(h, weight, bias, residual)


__all__ = ["conv3d_act", "causal_conv3d_act", "project_tokens", "CausalConvState",
           "conv3d_act_reference", "causal_conv3d_act_reference", "project_tokens_reference",
           "conv_impl_reasons", "ACTIVATIONS", "CONV_IMPLS"]
