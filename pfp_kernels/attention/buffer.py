"""joint_attention for a loop whose context stays fixed: a persistent ``[context ; target]`` buffer.

A denoising loop attends from new target tokens over the same cached context at every step. The
stock way (``sdpa_concat``) copies the whole context into a fresh concatenation at every call.
:class:`JointKVBuffer` writes the context's keys and values once into the head of a buffer sized
for ``[context ; target]``. Each :meth:`JointKVBuffer.attend` writes only the target's keys and
values into the tail (with their own key mask, if any: HunyuanVideo's tail also holds its padded
text), then runs one stock kernel over the whole buffer:

- ``flash_attn``: flash-attn's own kernel where it is installed (FA3 on sm_90, FA2 elsewhere;
  fp16/bf16, no key mask);
- ``sdpa``: ``F.scaled_dot_product_attention`` (cuDNN or FlashAttention-2 on CUDA, ATen's flash
  kernel on CPU), with the key mask as ``attn_mask``;
- ``cpp`` (CPU): ``joint_attention``'s C++ two-segment kernel with the buffer's head as the context
  and its tail as the target, both read in place (no tail key mask). Where ATen's CPU kernel has
  no fast path (no AMX) it is the faster one (benchmarks/results/attention/).

``impl="auto"`` takes the measured fastest of those that can run (``pfp_kernels._tuning``, op
``joint_attention_buffer``).

The buffer costs memory: ``batch x (Nc + capacity)`` keys and values for as long as it lives,
where ``sdpa_concat`` holds the same only during a call. Inference only: nothing is written into
the buffer under autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _tuning
from . import _cpp_why_not, _flash_attn_why_not, joint_attention   # (imported at the end of the package's __init__)
from .backends import _flash_attn_function, sdpa_over_keys
from .checks import check_inputs, scale_or_default

BUFFER_IMPLS = ("flash_attn", "sdpa", "cpp")


class JointKVBuffer:
    """Keys and values of ``[context ; target]`` in one persistent buffer (module docstring).

    Args:
        context_k, context_v: ``[Bc, Nc, H, D]`` with Bc 1 or ``batch``; copied into the buffer's
            head now (a batch-1 context is repeated to ``batch`` there, once).
        batch: the query batch of every :meth:`attend` (2 for a CFG pair sharing one history).
        capacity: the most target keys one :meth:`attend` brings (the chunk's target tokens).
        context_mask: ``[Bc, Nc]`` bool or None: context key j takes part for sample b only where
            ``context_mask[b, j]`` (as in :func:`pfp_kernels.joint_attention`).

    Attributes: ``keys``, ``values`` ``[batch, Nc + capacity, H, D]``; ``num_context`` (Nc).
    """

    def __init__(self, context_k: Tensor, context_v: Tensor, batch: int, capacity: int,
                 context_mask: Optional[Tensor] = None):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"JointKVBuffer: batch must be an int >= 1, got {batch!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"JointKVBuffer: capacity must be an int >= 0, got {capacity!r}")
        if not isinstance(context_k, Tensor) or context_k.dim() != 4:
            raise ValueError("JointKVBuffer: context_k must be a 4-D [B or 1, Nc, H, D] tensor, got "
                             f"{tuple(context_k.shape) if isinstance(context_k, Tensor) else type(context_k).__name__}")
        bc, nc, h, d = context_k.shape
        probe = context_k.new_empty(batch, 0, h, d)  # the inputs' checks, with the shapes attend takes
        check_inputs(probe, probe, probe, context_k, context_v, context_mask)
        self.num_context = nc
        self.capacity = capacity
        shape = (batch, nc + capacity, h, d)
        with torch.no_grad():
            self.keys = context_k.new_empty(shape)
            self.values = context_v.new_empty(shape)
            self.keys[:, :nc].copy_(context_k.expand(batch, -1, -1, -1))
            self.values[:, :nc].copy_(context_v.expand(batch, -1, -1, -1))
        self._keep = None  # [batch, Nc + capacity] bool: the context's mask, then the tail's (True if none)
        # A call is masked by the context's mask, or by its own tail mask for that call only: an
        # unmasked call on an unmasked context runs maskless (flash-attn, no attn_mask for SDPA)
        # even after a masked one made _keep.
        self._context_masked = context_mask is not None
        if context_mask is not None:
            self._keep = torch.ones(batch, nc + capacity, dtype=torch.bool, device=context_k.device)
            self._keep[:, :nc].copy_(context_mask.expand(batch, -1))

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds (keys, values and the key mask)."""
        n = self.keys.numel() * self.keys.element_size() * 2
        return n + (self._keep.numel() if self._keep is not None else 0)

    def backends(self, q: Tensor, tail_masked: bool = False) -> dict[str, Optional[str]]:
        """For each of ``flash_attn``, ``sdpa`` and ``cpp``: None if it can run with queries like
        ``q`` (and a tail key mask, if ``tail_masked``), else why not."""
        return {"flash_attn": self._flash_attn_why_not(q, self._context_masked or tail_masked),
                "sdpa": self._sdpa_why_not(q), "cpp": self._cpp_why_not(q, tail_masked)}

    def _cpp_why_not(self, q: Tensor, tail_masked: bool) -> Optional[str]:
        why = _cpp_why_not(q, q, q, None, None)   # joint_attention's: CPU, the library loaded, the dtype
        if why is None and tail_masked:
            why = "the C++ kernel takes a context mask but no tail key mask (sdpa does)"
        return why

    def _flash_attn_why_not(self, q: Tensor, masked: bool) -> Optional[str]:
        if q.device.type != "cuda":
            return f"flash-attn runs on CUDA, not {q.device.type}"
        if masked:
            return "flash-attn takes no key mask here (sdpa does)"
        return _flash_attn_why_not(q, q, q, None, None)   # joint_attention's: the package, dtype, head dim

    def _sdpa_why_not(self, q: Tensor) -> Optional[str]:
        if q.device.type == "cuda" and q.shape[-1] > 256:
            return f"head dim {q.shape[-1]} not supported by the fused SDPA kernels (at most 256)"
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_mask: Optional[Tensor] = None,
               scale: Optional[float] = None, impl: str = "auto") -> Tensor:
        """Softmax attention of q over ``[context ; k]``, ``[context ; v]``: k and v are written into
        the buffer's tail (after the context), replacing what the last call wrote there.

        Args:
            q: ``[batch, Nq, H, D]``; k, v: ``[batch, Nk, H, D]`` with Nk <= capacity; the
                context's dtype and device.
            key_mask: ``[batch, Nk]`` bool or None: tail key j takes part for sample b only where
                ``key_mask[b, j]`` (e.g. padded text tokens after the target's). A sample left with
                no key at all gets 0.
            scale: softmax scale, default ``1/sqrt(D)``.
            impl: ``"auto"``, ``"flash_attn"``, ``"sdpa"`` or ``"cpp"``.

        Returns ``[batch, Nq, H, D]`` in q's dtype, contiguous. Equal to ``joint_attention`` over
        the context (with its mask) and k, v (with ``key_mask``).
        """
        # also that q, k, v have the buffer's dtype and device (the context's slices carry them)
        check_inputs(q, k, v, self.keys[:1, : self.num_context], self.values[:1, : self.num_context])
        b, nk = q.shape[0], k.shape[1]
        if b != self.keys.shape[0]:
            raise ValueError(f"JointKVBuffer.attend: q has batch {b}; this buffer was made for batch "
                             f"{self.keys.shape[0]}")
        if nk > self.capacity:
            raise ValueError(f"JointKVBuffer.attend: {nk} target keys do not fit this buffer's capacity "
                             f"{self.capacity}")
        if key_mask is not None and (not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool
                                     or tuple(key_mask.shape) != (b, nk) or key_mask.device != q.device):
            what = (f"{key_mask.dtype} {tuple(key_mask.shape)} on {key_mask.device}" if isinstance(key_mask, Tensor)
                    else type(key_mask).__name__)
            raise ValueError(f"JointKVBuffer.attend: key_mask must be a bool [{b}, {nk}] tensor on {q.device} "
                             f"(one flag per tail key), got {what}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("JointKVBuffer.attend is for inference (torch.no_grad()): its buffer is "
                               "rewritten in place every call; for training use pfp_kernels.joint_attention")
        if impl not in ("auto",) + BUFFER_IMPLS:
            raise ValueError(f"JointKVBuffer.attend: impl {impl!r} is not valid; choose one of: auto, "
                             f"{', '.join(BUFFER_IMPLS)}")
        scale = scale_or_default(scale, q.shape[-1])
        if q.shape[1] == 0 or b * q.shape[2] == 0:
            return q.new_empty(q.shape)
        end = self.num_context + nk
        self.keys[:, self.num_context:end].copy_(k)
        self.values[:, self.num_context:end].copy_(v)
        if key_mask is not None and self._keep is None:   # made on the first masked call, kept after
            self._keep = torch.ones(b, self.num_context + self.capacity, dtype=torch.bool, device=q.device)
        masked = key_mask is not None
        if self._context_masked or masked:   # a tail mask from the last call must not outlive it
            if key_mask is None:
                self._keep[:, self.num_context:end].fill_(True)
            else:
                self._keep[:, self.num_context:end].copy_(key_mask)
        reasons = self.backends(q, masked)
        if impl == "auto":
            runnable = [name for name in BUFFER_IMPLS if reasons[name] is None]
            impl = runnable[0]
            if len(runnable) > 1:
                call = _tuning.TuneCall(self._bucket(q, nk, masked), lambda name: self._run(name, q, end, scale, masked))
                impl = _tuning.lookup_or_measure("joint_attention_buffer", runnable, (q,), call) or impl
        elif reasons[impl] is not None:
            raise RuntimeError(f"JointKVBuffer.attend: impl {impl!r} cannot run here: {reasons[impl]}")
        return self._run(impl, q, end, scale, masked)

    def _bucket(self, q: Tensor, nk: int, tail_masked: bool) -> tuple:
        b, nq, h, d = q.shape
        return (b, h, d, _tuning.pow2(nq), _tuning.pow2(nk), _tuning.pow2(self.num_context),
                int(self._context_masked or tail_masked))

    def _run(self, impl: str, q: Tensor, end: int, scale: float, tail_masked: bool) -> Tensor:
        nc = self.num_context
        if impl == "cpp":   # head and tail read in place as the two segments
            return joint_attention(q, self.keys[:, nc:end], self.values[:, nc:end], context_k=self.keys[:, :nc],
                                   context_v=self.values[:, :nc], scale=scale, impl="cpp",
                                   context_mask=self._keep[:, :nc] if self._context_masked else None)
        keys, values = self.keys[:, :end], self.values[:, :end]
        if impl == "flash_attn":
            fa, why = _flash_attn_function(q.device)
            if fa is None:
                raise RuntimeError(f"JointKVBuffer.attend: flash_attn unavailable: {why}")
            out = fa(q, keys, values, softmax_scale=scale, causal=False)
            return (out[0] if isinstance(out, tuple) else out).contiguous()
        keep = self._keep[:, :end] if self._context_masked or tail_masked else None
        # a sample may be left with no key: a masked context and no tail, or a masked tail too
        return sdpa_over_keys(q, keys, values, keep, scale, may_lack_keys=end == self.num_context or tail_masked)

