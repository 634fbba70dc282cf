"""Shapes and argument checks of the conv ops, shared by every implementation so that sizes are
computed by one formula and errors read the same everywhere. (The C++ kernels repeat the checks
for direct op calls, with the same wording: csrc/conv3d_act.cpp, ``conv_out_len``.)

Time convention of the causal form: output frame j of temporal kernel k and
stride s reads input frames s*j-(k-1) .. s*j; frames before 0 are zeros; T frames give ceil(T/s)
outputs.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IntOr3 = Union[int, Sequence[int]]
ACTIVATIONS = ("silu", None)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triple(value: IntOr3, name: str, n: int = 3, minimum: int = 0) -> list[int]:
    """``value`` as a list of ``n`` ints >= ``minimum`` (an int is repeated). Bools and floats are
    refused: True would mean 1, and 2.5 would silently become 2."""
    def whole(v) -> int:
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


def check_activation(activation: Optional[str]) -> str:
    """The op-level activation name ("silu" or "none") of a public one ("silu" or None)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation or "none"


def check_op_activation(activation: str, op: str) -> None:
    """The activation argument of a direct op call (``torch.ops.pfp.*``): "silu" or "none"."""
    if activation not in ("silu", "none"):
        raise ValueError(f"{op}: activation must be 'silu' or 'none', got {activation!r}")


def out_len(size: int, k: int, s: int, p: int) -> int:
    """Output length of a conv along one axis (<= 0 when the input is too short): the only place
    this formula is written in Python."""
    return (size + 2 * p - k) // s + 1


def checked_out_len(size: int, k: int, s: int, p: int, name: str) -> int:
    out = out_len(size, k, s, p)
    if out <= 0:
        raise ValueError(f"input {name}={size} is too small for kernel {k} with padding {p}")
    return out


def conv_out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int]) -> list[int]:
    """``[B, Cout, To, Ho, Wo]`` of conv3d_act (no size checks: the fake kernels use it too)."""
    return [x_shape[0], weight_shape[0]] + [
        out_len(x_shape[2 + axis], weight_shape[2 + axis], stride[axis], padding[axis]) for axis in range(3)]


def causal_out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                     padding_hw: Sequence[int], num_out: int) -> list[int]:
    """``[B, Cout, num_out, Ho, Wo]`` of causal_conv3d_act (no size checks)."""
    return [x_shape[0], weight_shape[0], num_out,
            out_len(x_shape[3], weight_shape[3], stride[1], padding_hw[0]),
            out_len(x_shape[4], weight_shape[4], stride[2], padding_hw[1])]


def check_kernel_dtype(x: Tensor, name: str, op: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise ValueError(f"{op}: {name} dtype must be one of {names}, got {x.dtype}")


def check_conv_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D [B, Cin, T, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"{op}: weight must be 5-D [Cout, Cin, kt, kh, kw], got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but weight expects Cin={weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    check_kernel_dtype(x, "x", op)
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{op}: weight must match x in dtype and device; x is {x.dtype} on {x.device}, "
                         f"weight is {weight.dtype} on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"{op}: bias must match x in dtype and device; got {bias.dtype} on {bias.device}")


def check_project_args(h: Tensor, weight: Tensor, bias: Optional[Tensor],
                       residual: Optional[Tensor]) -> Tensor:
    """Checks project_tokens' arguments; returns the weight as ``[Cout, C]``."""
    op = "project_tokens"
    if h.dim() != 5:
        raise ValueError(f"{op}: h must be 5-D [B, C, T, H, W], got shape {tuple(h.shape)}")
    check_kernel_dtype(h, "h", op)
    if weight.dim() == 5:
        if tuple(weight.shape[2:]) != (1, 1, 1):
            raise ValueError(f"{op}: a 5-D weight must be [Cout, C, 1, 1, 1], got {tuple(weight.shape)}")
        weight = weight.flatten(1)
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"{op}: weight must be [Cout, C={h.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != h.dtype or weight.device != h.device:
        raise ValueError(f"{op}: weight must match h in dtype and device; h is {h.dtype} on "
                         f"{h.device}, weight is {weight.dtype} on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != h.dtype or bias.device != h.device):
        raise ValueError(f"{op}: bias must be [{weight.shape[0]}] with h's dtype and device, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if residual is not None:
        want = (h.shape[0], h.shape[2] * h.shape[3] * h.shape[4], weight.shape[0])
        if tuple(residual.shape) != want:
            raise ValueError(f"{op}: residual must have shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != h.dtype or residual.device != h.device:
            raise ValueError(f"{op}: residual must match h in dtype and device, got "
                             f"{residual.dtype} on {residual.device}")
    return weight


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory on ``device`` (CPU: physical RAM), None where unknown."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, AttributeError, RuntimeError, AssertionError):
        pass
    return None


# Outputs up to this size are never checked against the device's memory (every device this runs on
# has more): the check asks the OS or the CUDA driver, which streaming calls on small chunks would
# pay on every call.
_ALWAYS_FITS = 2 ** 28


def check_output_fits(op: str, x: Tensor, shape: Sequence[int]) -> None:
    """Refuse an output larger than the device's whole memory with a message, before the
    allocator is asked for it (large paddings or inputs make such shapes easily). Traces on the
    meta device or under FakeTensorMode, which allocate nothing, are not limited, nor is code
    that torch.compile traces (the check would break its graph)."""
    if torch.compiler.is_compiling():
        return
    nbytes = math.prod(int(d) for d in shape) * x.element_size()
    if nbytes <= _ALWAYS_FITS or x.device.type == "meta":
        return
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(x):
        return
    memory = device_memory(x.device)
    if memory is not None and nbytes > memory:
        raise ValueError(f"{op}: the output {list(shape)} would take {nbytes / 2 ** 30:.1f} GiB, more than the "
                         f"{memory / 2 ** 30:.1f} GiB of {x.device}; check the input size, stride and padding")


def batch_item_span(t: Tensor) -> int:
    """Elements one batch item of ``t`` spans in memory (the Triton kernels index within a batch
    item in int32)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)


# ----------------------------------------------------------------------------------------------
# the streaming state's geometry
# ----------------------------------------------------------------------------------------------
STATE_FIELDS = ("weight shape", "stride", "padding_hw", "activation", "batch size",
                "channels", "H", "W", "dtype", "device")


def state_signature(x: Tensor, weight: Tensor, stride, padding_hw, act: str) -> tuple:
    """What a causal conv state must match to continue a stream (one value per STATE_FIELDS)."""
    return (tuple(weight.shape), tuple(stride), tuple(padding_hw), act, x.shape[0], x.shape[1], x.shape[3],
            x.shape[4], x.dtype, x.device)
