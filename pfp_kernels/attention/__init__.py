"""Joint context attention: softmax attention of target queries over ``[context ; target]``.

The DiT attends from the target tokens of the chunk being generated over the compressed history
(context) plus the target itself. This module is the whole op apart from its kernels: argument
checks, the plain-PyTorch reference, the exact merge of partial attentions, registration (fake
kernels and autograd) and the choice of backend.

Layout is flash-attn's: ``q [B, Nq, H, D]``, ``k, v [B, Nk, H, D]``, context ``[B or 1, Nc, H, D]``.
A batch-1 context serves all B query batches without a copy (stride-0 expand, never a repeat):
the CFG cond/uncond pair, or many samples, sharing one history. The result equals softmax
attention over ``cat(context, target)`` without that concatenation ever being built.

One folder holds the op: ``__init__.py`` (the API and the backend registry entries), ``checks.py``,
``reference.py`` (the reference and the merge), ``backends.py`` (SDPA, flash-attn, xformers),
``autograd.py`` (fakes and the shared backward), ``triton.py`` (the Triton kernels) and
csrc/joint_attention.cpp (the C++ CPU kernel); ``buffer.py`` holds :class:`JointKVBuffer`, the
inference form for a loop over one fixed context (a persistent ``[context ; target]`` buffer).

Backends (``attention_backends`` says which can run given inputs, and why not):

- ``flash_attn``  flash-attn when installed (CUDA): FA3 (``flash_attn_interface``) on sm_90,
  FA2 elsewhere (never FA3 on Ada); one call per segment with its LSE, then the exact merge.
- ``triton``      triton.py: one FlashAttention-style pass over both
  segments, forward and backward kernels (head dim <= 256 in fp16/bf16, <= 128 in fp32). It never
  builds the concatenation, so it takes the least memory.
- ``xformers``    xformers when installed (CUDA): partial attention per segment + exact merge.
- ``cpp``         csrc/joint_attention.cpp (CPU): one FlashAttention-2-style pass of our own whose key
  loop walks the context blocks then the target blocks (fp32 SGEMMs on per-thread fp32 blocks,
  online softmax in fp32); where torch exports no ``sgemm_``, ATen's CPU flash kernel once per
  segment with the merge fused into one pass; for bf16 with both segments on CPUs with AMX-BF16,
  ATen's kernel once over the concatenation (its bf16 tiles beat our fp32 SGEMMs there).
  ``torch.ops.pfp._attention_cpu_path`` forces any of "flash", "segments", "concat".
- ``sdpa``        PyTorch's fused SDPA kernels with LSE once per segment + the merge in PyTorch
  (CPU: ``_scaled_dot_product_flash_attention_for_cpu``; CUDA: cuDNN, else memory-efficient).
- ``sdpa_concat`` the stock way: ``F.scaled_dot_product_attention`` over ``cat(context, target)``,
  PyTorch's kernel choice and its own backward (the concatenation is a copy each call).
- ``torch``       the reference (fp32/fp64 math, materialises the scores).

``impl="auto"`` times the runnable candidates (CUDA: ``flash_attn, triton, xformers, sdpa,
sdpa_concat``; CPU: ``cpp, sdpa, sdpa_concat``) once per device, dtype, mode (forward, or forward +
backward when inputs require grad) and shape bucket, and keeps the fastest (``pfp_kernels._tuning``:
a shipped table for measured cards, the user's cache, timing on first use). Where nothing is
measured or measuring is off (``PFP_KERNELS_AUTOTUNE=0``, torch.compile tracing), the static order is
CUDA ``flash_attn, sdpa_concat, triton, xformers, sdpa, torch`` (sdpa_concat ahead of triton from
the H100 measurements: 0.79x forward, 0.41x forward + backward for triton) and CPU
``cpp, sdpa, sdpa_concat, torch``.

Backward: every backend saves (out, lse) and shares one backward (autograd.py): the Triton backward
kernels on CUDA (and for the Triton backend under the interpreter); on CPU ATen's flash-attention
backward once over the concatenation; elsewhere, and for a gradient through a returned lse, a
per-segment math backward. ``sdpa_concat`` without the lse keeps PyTorch's own backward. The
gradient through a returned lse is exact (it enters as ``delta = rowsum(dO*O) - dlse``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _registry, _tuning
from .._registry import Impl, Op, call_op, dtype_why_not, register
from .._tuning import TuneCall, pow2
from . import autograd as _autograd  # noqa: F401  (registers the ops, fakes and autograd)
from .autograd import KERNEL_DTYPES, MAX_TRITON_FP32_HEAD_DIM, MAX_TRITON_HEAD_DIM
from .backends import _flash_attn_module, _import, _why_not_importable, joint_attention_sdpa_concat
from .checks import check_inputs, scale_or_default
from .reference import joint_attention_reference, merge_attention

ATTENTION_BACKENDS = ("flash_attn", "triton", "xformers", "cpp", "sdpa", "sdpa_concat", "torch")
# Asked once: the dispatcher query inside cpp_why_not is not traceable by torch.compile.
_CPP_WHY_NOT_ON_CPU = _registry.cpp_why_not("joint_attention", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# backends: why each cannot run given inputs (q, k, v, context_k, context_v, already checked)
# ----------------------------------------------------------------------------------------------
_NO_MASK = "takes no context_mask (cpp, triton, sdpa_concat, sdpa on CPU, and torch do)"


def _triton_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    head_dim = q.shape[-1]
    why = _registry.triton_why_not(q.device, q.dtype) or dtype_why_not(q.dtype, KERNEL_DTYPES)
    if why is None and not 1 <= head_dim <= MAX_TRITON_HEAD_DIM:
        why = f"head dim {head_dim} not supported (1..{MAX_TRITON_HEAD_DIM})"
    if why is None and q.dtype == torch.float32 and head_dim > MAX_TRITON_FP32_HEAD_DIM:
        why = (f"fp32 head dim {head_dim} not supported (fp32 up to {MAX_TRITON_FP32_HEAD_DIM}: larger "
               "fp32 tiles spill registers; fp16/bf16 go up to 256)")
    return why


def _flash_attn_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    head_dim = q.shape[-1]
    _, why = _flash_attn_module(q.device)
    if why is None and context_mask is not None:
        why = "this backend " + _NO_MASK
    if why is None:
        why = dtype_why_not(q.dtype, (torch.float16, torch.bfloat16))
    if why is None and (head_dim > 256 or head_dim % 8 != 0):
        why = f"head dim {head_dim} not supported (a multiple of 8, at most 256)"
    return why


def _xformers_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    why = _why_not_importable("xformers.ops.fmha")
    if why is None and context_mask is not None:
        why = "this backend " + _NO_MASK
    # (while torch.compile traces, the version check waits for the op: it cannot import)
    if (why is None and not torch.compiler.is_compiling()
            and not hasattr(_import("xformers.ops.fmha")[0], "memory_efficient_attention_partial")):
        why = "this xformers has no memory_efficient_attention_partial (needs xformers >= 0.0.23)"
    return why or dtype_why_not(q.dtype, KERNEL_DTYPES)


def _cpp_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    why = _CPP_WHY_NOT_ON_CPU if q.device.type == "cpu" else _registry.cpp_why_not("joint_attention", q.device)
    return why or dtype_why_not(q.dtype, KERNEL_DTYPES)


def _sdpa_concat_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    if q.device.type == "cpu":
        return dtype_why_not(q.dtype, KERNEL_DTYPES + (torch.float64,))
    why = dtype_why_not(q.dtype, KERNEL_DTYPES)
    if why is None and q.shape[-1] > 256:
        why = f"head dim {q.shape[-1]} not supported by the fused SDPA kernels (at most 256)"
    return why


def _sdpa_why_not(q, k, v, context_k, context_v, context_mask=None) -> Optional[str]:
    why = _sdpa_concat_why_not(q, k, v, context_k, context_v)
    if why is None and context_mask is not None and q.device.type != "cpu":
        why = "takes a context_mask on CPU only (sdpa_concat takes one on CUDA)"
    return why


def _probe(device: torch.device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, 1, 1, 64, device=device, dtype=dtype)
    return f"{_tuning.dtype_name(dtype)}, head dim 64", (q, q, q, q, q)


JOINT_ATTENTION = register(Op(
    "joint_attention",
    (Impl("flash_attn", ("cuda",), _flash_attn_why_not, "flash_attn_interface / flash_attn"),
     Impl("triton", ("cuda", "cpu"), _triton_why_not, "pfp_kernels/attention/triton.py"),
     Impl("xformers", ("cuda",), _xformers_why_not, "xformers.ops.fmha"),
     Impl("cpp", ("cpu",), _cpp_why_not, "csrc/joint_attention.cpp"),
     Impl("sdpa", ("cpu", "cuda"), _sdpa_why_not, "pfp_kernels/attention/backends.py"),
     Impl("sdpa_concat", ("cpu", "cuda"), _sdpa_concat_why_not, "F.scaled_dot_product_attention over the concatenation"),
     Impl("torch", (), lambda *inputs: None, "pfp_kernels/attention/reference.py")),
    {"cuda": ("flash_attn", "sdpa_concat", "triton", "xformers", "sdpa", "torch"),
     "cpu": ("cpp", "sdpa", "sdpa_concat", "torch"), "default": ("triton", "sdpa", "torch")},
    _probe,
    tuned={"cuda": ("flash_attn", "sdpa_concat", "triton", "xformers", "sdpa"),   # in auto's order
           "cpu": ("cpp", "sdpa", "sdpa_concat")},
    # With gradients on CUDA, SDPA over the concatenation first: the others differentiate through
    # the Triton backward (triton 0.41x, sdpa_concat 1.00x forward + backward at the paper's shape on
    # the H100, 2026-11-26), which a fast forward does not make up for. Measured calls time forward +
    # backward and need no such rule.
    grad_order={"cuda": ("sdpa_concat", "flash_attn", "triton", "xformers", "sdpa", "torch")},
))


def attention_backends(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                       context_v: Optional[Tensor] = None,
                       context_mask: Optional[Tensor] = None) -> dict[str, Optional[str]]:
    """For each backend: None if it can run these inputs, else the reason it cannot.

    Raises ValueError for inputs no backend accepts (shape, dtype or device mismatch).
    """
    check_inputs(q, k, v, context_k, context_v, context_mask)
    return JOINT_ATTENTION.reasons(q, k, v, context_k, context_v, context_mask)


_OPS = {"cpp": "joint_attention", "triton": "joint_attention_triton", "sdpa": "joint_attention_sdpa",
        "sdpa_concat": "joint_attention_sdpa_concat", "flash_attn": "joint_attention_flash_attn",
        "xformers": "joint_attention_xformers"}


# The backends that return the log-sum-exp of a call with a context_mask on CUDA, fastest first
# (the reference always can).
MASKED_LSE_BACKENDS = ("triton", "torch")


def _run(name: str, q, k, v, context_k, context_v, scale: float, return_lse: bool, context_mask=None):
    """out, or (out, lse) with ``return_lse``, from implementation ``name``."""
    if name == "torch":
        out, lse = joint_attention_reference(q, k, v, context_k, context_v, scale, context_mask)
    elif name == "sdpa_concat" and not return_lse:
        return joint_attention_sdpa_concat(q, k, v, context_k, context_v, scale, context_mask)
    elif context_mask is not None:  # the flash_attn and xformers ops have no mask argument (nor take one)
        out, lse = call_op(getattr(torch.ops.pfp, _OPS[name]), q, k, v, context_k, context_v, scale, context_mask)
    else:
        out, lse = call_op(getattr(torch.ops.pfp, _OPS[name]), q, k, v, context_k, context_v, scale)
    return (out, lse) if return_lse else out


def _tune_call(q, k, v, context_k, context_v, scale: float, context_mask=None) -> TuneCall:
    """The measured choice's key and runner: B, H, D exact, the lengths rounded up to powers of
    two, whether one context serves several query batches, and (only when given) a key mask."""
    b, nq, h, d = q.shape
    nc = context_k.shape[1] if context_k is not None else 0
    shared = int(context_k is not None and context_k.shape[0] == 1 and b > 1)
    bucket = (b, h, d, pow2(nq), pow2(k.shape[1]), pow2(nc), shared) + (("masked",) if context_mask is not None else ())
    grad_inputs = tuple(t for t in (q, k, v, context_k, context_v) if t is not None and t.requires_grad)
    return TuneCall(bucket, lambda name: _run(name, q, k, v, context_k, context_v, scale, False, context_mask),
                    grad_inputs)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def joint_attention(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor] = None,
                    context_v: Optional[Tensor] = None, *, context_mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, impl: str = "auto", return_lse: bool = False):
    """Softmax attention of q over the keys/values ``[context ; target]``, never concatenated.

    Args:
        q: ``[B, Nq, H, D]`` target queries.
        k, v: ``[B, Nk, H, D]`` target keys and values.
        context_k, context_v: ``[B or 1, Nc, H, D]`` or None. Batch 1 serves all B query batches
            without a copy. Nc may be 0; Nc + Nk must be >= 1.
        context_mask: ``[B or 1, Nc]`` bool or None: context key j takes part for sample b only
            where ``context_mask[b, j]`` (padding in a batch of histories of different lengths;
            target keys always take part). A masked key is absent, not down-weighted; a query left
            with no key gets out 0 and lse -inf. No host synchronisation. Taken by ``cpp``,
            ``triton``, ``sdpa_concat``, ``sdpa`` (CPU) and ``torch``; flash_attn and xformers say
            they take none in their reasons.
        scale: softmax scale, default ``1/sqrt(D)``.
        impl: ``"auto"`` (the measured fastest; see the module docstring) or one of
            ``flash_attn, triton, xformers, cpp, sdpa, sdpa_concat, torch`` (see
            :func:`attention_backends`). A forced backend that cannot run these inputs raises
            RuntimeError with its reason.
        return_lse: also return the log-sum-exp of the scaled scores. Off the CPU, a call with
            a context_mask then runs a backend that has it (:data:`MASKED_LSE_BACKENDS`).

    Returns:
        out ``[B, Nq, H, D]`` (q's dtype, contiguous), and with ``return_lse`` also lse
        ``[B, H, Nq]`` (float32; float64 for float64 inputs; natural log), ready for
        :func:`merge_attention`. Differentiable in q, k, v, context_k, context_v.
    """
    check_inputs(q, k, v, context_k, context_v, context_mask)
    scale = scale_or_default(scale, q.shape[-1])
    inputs = (q, k, v, context_k, context_v, context_mask)
    if return_lse and context_mask is not None and q.device.type != "cpu":
        # off the CPU only these give the lse of a masked call (SDPA's masked kernels return none)
        if impl == "auto":
            reasons = JOINT_ATTENTION.reasons(*inputs)
            chosen = next(name for name in MASKED_LSE_BACKENDS if reasons[name] is None)
        elif impl in MASKED_LSE_BACKENDS:
            chosen = JOINT_ATTENTION.choose(impl, *inputs)
        else:
            raise ValueError(f"joint_attention: impl={impl!r} returns no lse with a context_mask on "
                             f"{q.device.type}; choose one of: auto, {', '.join(MASKED_LSE_BACKENDS)}")
    else:
        tune = _tune_call(q, k, v, context_k, context_v, scale, context_mask) if impl == "auto" else None
        chosen = JOINT_ATTENTION.choose(impl, *inputs, tune=tune)
    return _run(chosen, q, k, v, context_k, context_v, scale, return_lse, context_mask)


from .buffer import JointKVBuffer  # noqa: E402  (it builds on the op above)

__all__ = ["joint_attention", "merge_attention", "attention_backends", "joint_attention_reference",
           "ATTENTION_BACKENDS", "JOINT_ATTENTION", "JointKVBuffer"]
