"""Fused conv3d + bias + activation, its streaming causal form, and the token projection.

One folder holds the whole op family:

- ``__init__.py``   the public API and the implementation registry entries (this file)
- ``shapes.py``     output sizes (one formula), argument checks, the streaming state's geometry
- ``reference.py``  plain-PyTorch references (``impl="torch"``; the tests compare with them)
- ``autograd.py``   torch.library fake kernels and autograd for the C++ and Triton ops
- ``triton.py``     the Triton kernels, launchers and config table (CUDA)
- C++ CPU kernels:  csrc/conv3d_act.cpp (oneDNN or a direct kernel, chosen by a cost model)

Layout: activations are ``[B, C, T, H, W]`` tensors; channels-last-3d is preferred and is what
the kernels write, so stacked stages never relayout. Time convention of the causal form:
output frame j of temporal kernel k and stride s reads input frames
s*j-(k-1) .. s*j; frames before 0 are zeros; T input frames give ceil(T/s) outputs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _registry, _tuning
from .._registry import Impl, Op, call_op, dtype_why_not, register
from .._tuning import TuneCall, pow2
from . import autograd as _autograd  # noqa: F401  (registers fakes and autograd)
from .reference import causal_conv3d_act_reference, conv3d_act_reference, project_tokens_reference
from .shapes import (ACTIVATIONS, KERNEL_DTYPES, STATE_FIELDS, IntOr3, batch_item_span, check_activation,
                     check_conv_args, check_output_fits, check_project_args, checked_out_len, state_signature,
                     triple)

CL3 = torch.channels_last_3d


class frozen_weights:
    """Context manager: while it is active (on this thread), the C++ CPU conv kernels take a weight
    whose storage, shape, dtype and version counter are unchanged to hold unchanged bytes.

    The kernels cache what they derive from a weight (packed panels, oneDNN's prepacked layout) by
    the weight's content, which costs one read of the weight per call (0.6 ms of a 3 ms streaming
    append for the compressor at 1/4 scale). Frozen, the content hash is computed once per weight.
    Optimizer steps, ``load_state_dict`` and in-place ops bump the version counter and are seen;
    writes through ``w.data`` are not, so make none inside. Generation (:func:`pfp.generate`) runs
    frozen. Nests; a no-op without the C++ kernels.
    """

    def __enter__(self):
        from .. import _extension
        self._previous = None
        if _extension.has_cpu_kernel("causal_conv3d_act"):
            self._previous = torch.ops.pfp._conv_cpu_frozen_weights(True)
            self._previous_active, _FROZEN.active = _FROZEN.active, True
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            torch.ops.pfp._conv_cpu_frozen_weights(self._previous)
            _FROZEN.active = self._previous_active
        return False


class _Frozen(threading.local):
    active = False  # mirrors the C++ kernels' thread-local setting, for auto's keys


_FROZEN = _Frozen()


def _frozen_key(x: Tensor) -> tuple:
    """``("frozen",)`` for a CPU call inside :class:`frozen_weights`, else ``()``: auto times the
    C++ convs apart there, since outside it they hash each weight's bytes on every call (0.4-1.2 ms
    of 3.3-12 ms on the 256 -> 512 compressor stage at 1/4 scale) and inside they do not, while the
    eager candidate costs the same either way."""
    return ("frozen",) if _FROZEN.active and x.device.type == "cpu" else ()


# ----------------------------------------------------------------------------------------------
# implementations: why each cannot run given inputs (x or h, and the weight)
# ----------------------------------------------------------------------------------------------
def _cpp(op: str):
    def why_not(x: Tensor, weight: Tensor) -> Optional[str]:
        return _registry.cpp_why_not(op, x.device) or dtype_why_not(x.dtype, KERNEL_DTYPES)
    return Impl("cpp", ("cpu",), why_not, "csrc/conv3d_act.cpp")


def _triton_why_not(x: Tensor, weight: Tensor) -> Optional[str]:
    why = _registry.triton_why_not(x.device, x.dtype) or dtype_why_not(x.dtype, KERNEL_DTYPES)
    if why is None and x.numel() and batch_item_span(x) >= 2 ** 31:
        why = (f"one batch item of the input spans {batch_item_span(x)} elements; the kernels index "
               "within a batch item in int32 (< 2**31)")
    return why


_TRITON = Impl("triton", ("cuda", "cpu"), _triton_why_not, "pfp_kernels/conv/triton.py")
_TORCH = Impl("torch", (), lambda x, weight: None, "pfp_kernels/conv/reference.py")
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch"), "default": ("triton", "torch")}
# What auto times against each other: ours and the stock eager one (cuDNN or oneDNN conv, then SiLU).
_TUNED = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def conv_bucket(weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                activation: Optional[str], outputs: int) -> tuple:
    """auto's shape key for a conv: the layer's geometry exactly, the number of output positions
    (batch included) rounded up to a power of two."""
    return (*weight_shape, *stride, *padding, activation or "none", pow2(outputs))


def conv3d_act_bucket(x: Tensor, weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                      activation: Optional[str]) -> tuple:
    """The key ``conv3d_act(x, weight, ..., impl="auto")`` looks its choice up under: the
    :func:`conv_bucket` of the call, keyed apart inside :class:`frozen_weights` on CPU."""
    out = [checked_out_len(x.shape[2 + axis], weight_shape[2 + axis], stride[axis], padding[axis], name)
           for axis, name in enumerate("THW")]
    return conv_bucket(weight_shape, stride, padding, activation, x.shape[0] * out[0] * out[1] * out[2]) + _frozen_key(x)


def _tune_call(bucket: tuple, run, *inputs: Optional[Tensor]) -> TuneCall:
    grad_inputs = tuple(t for t in inputs if t is not None and t.requires_grad)
    return TuneCall(bucket, run, grad_inputs)


def _probe(op: str):
    def probe(device: torch.device):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        x = torch.zeros(1, 16, 2, 4, 4, device=device, dtype=dtype)
        w = torch.zeros(8 if op == "project_tokens" else 32, 16, *((1, 1, 1) if op == "project_tokens" else (3, 3, 3)),
                        device=device, dtype=dtype)
        return f"{_tuning.dtype_name(dtype)}, 16 channels", (x, w)
    return probe


def _op(name: str) -> Op:
    return register(Op(name, (_cpp(name), _TRITON, _TORCH), _AUTO_ORDER, _probe(name), _TUNED))


CONV3D_ACT = _op("conv3d_act")
CAUSAL_CONV3D_ACT = _op("causal_conv3d_act")
PROJECT_TOKENS = _op("project_tokens")


def conv_impl_reasons(op: str, x: Tensor, weight: Tensor) -> dict[str, Optional[str]]:
    """For each implementation of pfp::<op> ("conv3d_act", "causal_conv3d_act" or
    "project_tokens"): None if it can run on these inputs, else why not."""
    return _registry.OPS[op].reasons(x, weight)


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
        impl: ``"auto"`` (the measured fastest of ours and the stock eager conv + SiLU for this
            device, dtype and shape; see ``pfp_kernels._tuning``), ``"cpp"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B, Cout, To, Ho, Wo]`` in channels-last-3d, dtype of x (accumulation in fp32).
    """
    check_conv_args(x, weight, bias, "conv3d_act")
    stride = triple(stride, "stride", minimum=1)
    padding = triple(padding, "padding")
    act = check_activation(activation)
    if x.shape[2] == 0:
        raise ValueError("conv3d_act: x has an empty time dimension (T=0); a non-causal conv needs T >= 1")
    out = [checked_out_len(x.shape[2 + axis], weight.shape[2 + axis], stride[axis], padding[axis], name)
           for axis, name in enumerate("THW")]
    check_output_fits("conv3d_act", x, [x.shape[0], weight.shape[0], *out])

    def run(name: str) -> Tensor:
        if name == "torch":
            return conv3d_act_reference(x, weight, bias, stride, padding, act)
        op = torch.ops.pfp.conv3d_act if name == "cpp" else torch.ops.pfp.conv3d_act_triton
        return call_op(op, x, weight, bias, stride, padding, act)

    tune = None
    if impl == "auto":
        tune = _tune_call(conv3d_act_bucket(x, weight.shape, stride, padding, act), run, x, weight, bias)
    return run(CONV3D_ACT.choose(impl, x, weight, tune=tune))


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

    def phase(self) -> int:
        """The smallest frame count that a call continuing this state treats as its own:
        ``frames_seen`` itself below ``kt - 1``, else the count >= ``kt - 1`` with the same remainder
        modulo the time stride. Which outputs a call makes, which frames they read and which frames
        it keeps depend on ``frames_seen`` only through that (and on the held frames' count), so
        two states with equal phases and frame shapes run the same work on the same new frames:
        :meth:`at_phase` gives the state a captured CUDA graph replays from."""
        kt, st = self.signature[0][2], self.signature[1][0]
        if self.frames_seen < kt - 1:
            return self.frames_seen
        return kt - 1 + (self.frames_seen - (kt - 1)) % st

    def at_phase(self) -> "CausalConvState":
        """This state with ``frames_seen`` set to :meth:`phase` (the same frames)."""
        return CausalConvState(self.frames, self.phase(), self.signature)


def _check_state(state: CausalConvState, signature: tuple) -> None:
    if not isinstance(state, CausalConvState):
        raise ValueError(f"state must be a CausalConvState returned by causal_conv3d_act, got {type(state).__name__}")
    for field, have, want in zip(STATE_FIELDS, state.signature, signature):
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
    check_conv_args(x, weight, bias, "causal_conv3d_act")
    stride = triple(stride, "stride", minimum=1)
    padding_hw = triple(padding_hw, "padding_hw", n=2)
    act = check_activation(activation)
    kt, kh, kw = weight.shape[2:]
    ho = checked_out_len(x.shape[3], kh, stride[1], padding_hw[0], "H")
    wo = checked_out_len(x.shape[4], kw, stride[2], padding_hw[1], "W")
    signature = state_signature(x, weight, stride, padding_hw, act)
    if state is not None:
        _check_state(state, signature)
    st = stride[0]
    n0 = state.frames_seen if state is not None else 0
    prev = state.frames if state is not None else None
    p = prev.shape[2] if prev is not None else 0
    n = n0 + x.shape[2]
    j0, j1 = -(-n0 // st), -(-n // st)
    num_out = j1 - j0
    check_output_fits("causal_conv3d_act", x, [x.shape[0], weight.shape[0], num_out, ho, wo])
    # V index of stream frame g is g - (n0 - p).
    time_offset = st * j0 - (kt - 1) - (n0 - p)

    def run(name: str) -> Tensor:
        if name == "torch":
            return causal_conv3d_act_reference(x, prev, weight, bias, stride, padding_hw, act, time_offset, num_out)
        op = torch.ops.pfp.causal_conv3d_act if name == "cpp" else torch.ops.pfp.causal_conv3d_act_triton
        return call_op(op, x, prev, weight, bias, stride, padding_hw, act, time_offset, num_out)

    tune = None
    if impl == "auto" and num_out > 0:  # the key also says whether a state is read
        bucket = (*conv_bucket(weight.shape, stride, padding_hw, act, x.shape[0] * num_out * ho * wo), int(p > 0),
                  *_frozen_key(x))
        tune = _tune_call(bucket, run, x, prev, weight, bias)
    y = run(CAUSAL_CONV3D_ACT.choose(impl, x, weight, tune=tune))

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
    weight = check_project_args(h, weight, bias, residual)

    def run(name: str) -> Tensor:
        if name == "torch":
            return project_tokens_reference(h, weight, bias, residual)
        op = torch.ops.pfp.project_tokens if name == "cpp" else torch.ops.pfp.project_tokens_triton
        return call_op(op, h, weight, bias, residual)

    tune = None
    if impl == "auto":
        tokens = h.shape[0] * h.shape[2] * h.shape[3] * h.shape[4]
        tune = _tune_call((weight.shape[0], weight.shape[1], pow2(tokens), int(residual is not None)),
                          run, h, weight, bias, residual)
    return run(PROJECT_TOKENS.choose(impl, h, weight, tune=tune))


__all__ = ["conv3d_act", "causal_conv3d_act", "project_tokens", "CausalConvState", "frozen_weights",
           "conv3d_act_reference", "causal_conv3d_act_reference", "project_tokens_reference",
           "conv_impl_reasons", "ACTIVATIONS", "CONV3D_ACT", "CAUSAL_CONV3D_ACT", "PROJECT_TOKENS"]
