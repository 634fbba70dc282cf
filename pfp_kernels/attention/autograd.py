"""Registration of the joint_attention ops with torch.library: fake kernels and autograd for the C++
op ``pfp::joint_attention`` and the Python backends ``pfp::joint_attention_{sdpa,sdpa_concat,
flash_attn,xformers,triton}`` (``sdpa_concat`` is an op only for callers that want the lse; without
it the API calls SDPA over the concatenation directly and keeps PyTorch's own backward).

Every backend saves (out, lse) and shares one backward: the Triton backward kernels on CUDA (and
for the Triton backend under the interpreter); on CUDA with a key mask, PyTorch's SDPA backward over
the concatenation, its forward recomputed; on CPU ATen's flash-attention backward once over the
concatenation; elsewhere, and for a gradient through the returned lse, a per-segment math backward.
The gradient through a returned lse is exact (it enters as ``delta = rowsum(dO*O) - dlse``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._registry import TRITON_AVAILABLE
from .backends import (_concatenated, _joint_attention_flash_attn_impl, _joint_attention_sdpa_concat_impl,
                       _joint_attention_sdpa_impl, _joint_attention_xformers_impl, _unit_stride_d, additive_mask)
from .reference import key_mask, lse_dtype

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_FP32_HEAD_DIM = 128


def _backward_math(grad_out, grad_lse, q, k, v, context_k, context_v, out, lse, scale, context_mask=None):
    """Per-segment backward from the saved (out, lse), materialising one segment's scores. Masked
    context keys get probability 0; a query with no key (lse -inf) passes no gradient."""
    acc = lse_dtype(q.dtype)
    qf, do = q.to(acc), grad_out.to(acc)
    lse = lse.to(acc)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # exp(s - inf) = 0: no key, no gradient
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Nq]
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    b = q.shape[0]
    dq = torch.zeros_like(qf)
    grads = []
    for seg_k, seg_v in ((context_k, context_v), (k, v)):
        if seg_k is None:
            grads.append((None, None))
            continue
        kf = seg_k.to(acc).expand(b, -1, -1, -1)
        vf = seg_v.to(acc).expand(b, -1, -1, -1)
        p = torch.exp(torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale - lse.unsqueeze(-1))
        if seg_k is context_k and context_mask is not None:
            p = p.masked_fill(~context_mask.expand(b, -1)[:, None, None, :], 0.0)
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vf) - delta.unsqueeze(-1))
        dq += torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, qf) * scale
        if seg_k.shape[0] != b:  # broadcast context: sum over the query batches it served
            dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
        grads.append((dk.to(seg_k.dtype), dv.to(seg_v.dtype)))
    (dck, dcv), (dk, dv) = grads
    return dq.to(q.dtype), dk, dv, dck, dcv


def _lse_grad_is_zero(grad_lse: Optional[Tensor]) -> bool:
    """True when no gradient flows through the returned lse (autograd hands zeros when the lse was
    not used). Only asked of plain tensors: a traced (fake or functional) one answers False."""
    if grad_lse is None:
        return True
    if type(grad_lse) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    return not bool(grad_lse.any())


def _backward_aten_cpu(grad_out, q, k, v, context_k, context_v, out, lse, scale, context_mask=None):
    """ATen's CPU flash-attention backward once over ``[context ; target]``: the saved (out, lse)
    are those of softmax attention over the concatenation, whichever backend made them. On the
    AVX-512 + AMX Xeon it was 1.2-3.0x faster forward + backward than the math backward
    (benchmarks/results/tuning/cpu_tuning_avx512_amx.md, where sdpa_concat ran it). Not for a
    gradient through the lse, which it has no input for."""
    b, nc = q.shape[0], context_k.shape[1] if context_k is not None else 0
    keys, values = _concatenated(q, k, v, context_k, context_v)
    unit = _unit_stride_d  # ATen's CPU kernels assume a unit stride along D
    keep = key_mask(q, k, context_mask)
    mask = None if keep is None else additive_mask(keep, q.dtype)
    # A query with no key: our lse is -inf, ATen's forward would have said 0 (its P is then 0).
    lse = lse.float().masked_fill(torch.isneginf(lse), 0.0).contiguous()
    dq, dkk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        unit(grad_out).transpose(1, 2), unit(q).transpose(1, 2), unit(keys).transpose(1, 2),
        unit(values).transpose(1, 2), unit(out).transpose(1, 2), lse, 0.0, False, attn_mask=mask, scale=scale)
    dq, dkk, dvv = dq.transpose(1, 2), dkk.transpose(1, 2), dvv.transpose(1, 2)
    dk, dv = dkk[:, nc:], dvv[:, nc:]
    dck = dcv = None
    if context_k is not None:
        dck, dcv = dkk[:, :nc], dvv[:, :nc]
        if context_k.shape[0] != b:  # broadcast context: sum over the query batches it served
            dck, dcv = dck.sum(0, keepdim=True), dcv.sum(0, keepdim=True)
    return dq, dk, dv, dck, dcv


def _backward_sdpa_recompute(grad_out, q, k, v, context_k, context_v, scale, context_mask):
    """Gradients through PyTorch's own SDPA over ``[context ; target]`` with the key mask as its
    ``attn_mask``, its forward recomputed: on CUDA that is the memory-efficient kernel's backward,
    O(N) memory, where the math backward holds ``[B, H, Nq, Nc + Nk]`` scores (25 GiB at
    HunyuanVideo's 9540 tokens). For masked calls on CUDA through an op with this backward (e.g.
    ``sdpa_concat`` asked for the lse; without it the API calls SDPA itself); needs a target key
    (``k`` not empty), so that no query is left without a key (SDPA would give it NaN), and no
    gradient through the lse."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in (q, k, v, context_k, context_v)]
        qq, kk, vv, ck, cv = leaves
        keys, values = _concatenated(qq, kk, vv, ck, cv)
        keep = key_mask(qq, kk, context_mask)
        out = torch.nn.functional.scaled_dot_product_attention(
            qq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=None if keep is None else keep[:, None, None, :], scale=scale)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.transpose(1, 2).to(out.dtype)))
    # (a broadcast context's gradient comes back summed over the query batches: the expand's backward)
    dq, dk, dv, dck, dcv = (None if t is None else next(grads) for t in leaves)
    return dq, dk, dv, dck, dcv


def _sdpa_recompute_backward_ok(q: Tensor, k: Tensor, grad_lse: Optional[Tensor], mask: Optional[Tensor]) -> bool:
    return (mask is not None and q.device.type == "cuda" and q.numel() > 0 and k.shape[1] > 0
            and _lse_grad_is_zero(grad_lse))


def _aten_cpu_backward_ok(q: Tensor, k: Tensor, grad_lse: Optional[Tensor]) -> bool:
    return (q.device.type == "cpu" and q.dtype in KERNEL_DTYPES and q.numel() > 0
            and _lse_grad_is_zero(grad_lse))


def _triton_backward_ok(q: Tensor) -> bool:
    max_d = MAX_TRITON_FP32_HEAD_DIM if q.dtype == torch.float32 else MAX_TRITON_HEAD_DIM
    return (q.device.type == "cuda" and TRITON_AVAILABLE and q.dtype in KERNEL_DTYPES
            and q.shape[-1] <= max_d)


def _setup_context(ctx, inputs, output):
    q, k, v, context_k, context_v, scale, *mask = inputs  # the Python ops take a context_mask last
    out, lse = output
    # An output nothing used gets None, not zeros: the backward then knows from the graph alone
    # that no gradient comes through the lse, also when tracing (fake tensors have no values to
    # look at), so a memory trace follows the O(N) flash backward a real run takes.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, context_k, context_v, out, lse, *mask)
    ctx.scale = scale
    ctx.takes_mask = bool(mask)


def _make_backward(always_triton: bool):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, context_k, context_v, out, lse, *mask = ctx.saved_tensors
        mask = mask[0] if mask else None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if not always_triton and _aten_cpu_backward_ok(q, k, grad_lse):
            dq, dk, dv, dck, dcv = _backward_aten_cpu(grad_out, q, k, v, context_k, context_v, out, lse,
                                                      ctx.scale, mask)
        elif not always_triton and _sdpa_recompute_backward_ok(q, k, grad_lse, mask):
            dq, dk, dv, dck, dcv = _backward_sdpa_recompute(grad_out, q, k, v, context_k, context_v, ctx.scale,
                                                            mask)
        elif always_triton or (mask is None and _triton_backward_ok(q)):
            # Through an op, so that torch.compile / AOT autograd can trace the backward.
            dq, dk, dv, dck, dcv = torch.ops.pfp.joint_attention_triton_backward(
                grad_out, grad_lse, q, k, v, context_k, context_v, out, lse, ctx.scale, mask)
            if context_k is None:
                dck = dcv = None
        else:
            dq, dk, dv, dck, dcv = _backward_math(grad_out, grad_lse, q, k, v, context_k, context_v,
                                                  out, lse, ctx.scale, mask)
        return (dq, dk, dv, dck, dcv, None) + ((None,) if ctx.takes_mask else ())
    return backward


def _empty_context_grad(q: Tensor) -> Tensor:
    return q.new_empty(1, 0, q.shape[2], q.shape[3])


def _fake(q, k, v, context_k, context_v, scale, context_mask=None):
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=lse_dtype(q.dtype)))


def _register(name: str, always_triton: bool = False) -> None:
    torch.library.register_fake(name)(_fake)
    torch.library.register_autograd(name, _make_backward(always_triton), setup_context=_setup_context)


if _extension.LOADED:
    _register("pfp::joint_attention")


@torch.library.custom_op("pfp::joint_attention_sdpa", mutates_args=())
def _joint_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                          context_v: Optional[Tensor], scale: float,
                          context_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _joint_attention_sdpa_impl(q, k, v, context_k, context_v, scale, context_mask)


@torch.library.custom_op("pfp::joint_attention_sdpa_concat", mutates_args=())
def _joint_attention_sdpa_concat(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                 context_v: Optional[Tensor], scale: float,
                                 context_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _joint_attention_sdpa_concat_impl(q, k, v, context_k, context_v, scale, context_mask)


@torch.library.custom_op("pfp::joint_attention_flash_attn", mutates_args=())
def _joint_attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _joint_attention_flash_attn_impl(q, k, v, context_k, context_v, scale)


@torch.library.custom_op("pfp::joint_attention_xformers", mutates_args=())
def _joint_attention_xformers(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                              context_v: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    return _joint_attention_xformers_impl(q, k, v, context_k, context_v, scale)


for _name in ("sdpa", "sdpa_concat", "flash_attn", "xformers"):
    _register(f"pfp::joint_attention_{_name}")


# Triton kernels are a Python custom op (torch.library.triton_op breaks opcheck under the
# interpreter); the launcher module imports triton, so it is imported lazily.
if TRITON_AVAILABLE:
    @torch.library.custom_op("pfp::joint_attention_triton", mutates_args=())
    def _joint_attention_triton(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                context_v: Optional[Tensor], scale: float,
                                context_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        from . import triton as tk
        return tk.joint_attention_fwd(q, k, v, context_k, context_v, scale, context_mask)

    @torch.library.custom_op("pfp::joint_attention_triton_backward", mutates_args=())
    def _joint_attention_triton_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor,
                                         k: Tensor, v: Tensor, context_k: Optional[Tensor],
                                         context_v: Optional[Tensor], out: Tensor, lse: Tensor,
                                         scale: float, context_mask: Optional[Tensor] = None
                                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(dq, dk, dv, dcontext_k, dcontext_v); without context the last two are empty."""
        from . import triton as tk
        dq, dk, dv, dck, dcv = tk.joint_attention_bwd(grad_out, grad_lse, q, k, v, context_k,
                                                      context_v, out, lse, scale, context_mask)
        if dck is None:
            dck, dcv = _empty_context_grad(q), _empty_context_grad(q)
        return dq, dk, dv, dck, dcv

    @torch.library.register_fake("pfp::joint_attention_triton_backward")
    def _joint_attention_triton_backward_fake(grad_out, grad_lse, q, k, v, context_k, context_v, out,
                                              lse, scale, context_mask=None):
        def like(t):
            return t.new_empty(t.shape) if t is not None else _empty_context_grad(q)
        return like(q), like(k), like(v), like(context_k), like(context_v)

    _register("pfp::joint_attention_triton", always_triton=True)
