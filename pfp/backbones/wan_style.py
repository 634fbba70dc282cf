"""The forward pass shared by every Wan-style backbone (TinyDiT and the diffusers Wan adapter).

A Wan-style backbone owns modules with Wan's names, so one forward serves both:

- ``patch_embedding``: ``Conv3d(C_latent, inner, kernel=stride=patch_size)``, shared with the
  compressor's low-res branch;
- ``blocks[i]``, :class:`WanStyleBlock` modules, with ``norm1``, ``attn1`` (``to_q``, ``to_k``, ``to_v``, ``norm_q``, ``norm_k``,
  ``to_out[0]``), ``norm2``, ``attn2`` (text cross-attention, same names), ``norm3``, ``ffn`` and a
  ``scale_shift_table`` ``[1, 6, inner]`` added to the timestep modulation (adaLN);
- ``norm_out``, ``proj_out`` and a head ``scale_shift_table`` ``[1, 2, inner]``;
- :meth:`embed_time` and :meth:`embed_text`.

Token streams. The compressed context (``Context.tokens`` ``[Bc, Nc, inner]``, already in the inner
width) and the patchified target latents run as two streams through the same blocks:

- context tokens are clean, so their modulation is the timestep-0 one;
- they never read the text (the history is not the current prompt), so their K/V are the same for
  both classifier-free-guidance branches;
- ``context_mode="joint"`` (the paper): both streams go through every block, and the self-attention
  of each stream is over ``[context ; target]``, recomputed at every denoising step;
- ``context_mode="cached"``: the context stream attends only to itself (block-causal), so its
  per-layer K/V (:class:`ContextKV`, from :meth:`WanStyleBackbone.cache_context`) are computed once
  per chunk and reused by every step and both CFG branches; a batch-1 context serves any batch via
  ``pfp_kernels.joint_attention``'s broadcast, without a copy. A step then costs the target
  tokens' linears plus their attention over ``Nc + Nt`` keys.

Self-attention goes through :func:`pfp_kernels.joint_attention`, which attends over
``cat(context, target)`` keys without materialising the concatenation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import pfp_kernels
from pfp.compressor import order_keys

from .rope import apply_rope, grid_positions, rope_cos_sin

CONTEXT_MODES = ("joint", "cached")


FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [B, N, H, D]`` -> (float8 values, fp32 scales ``[B, N, H, 1]``): one scale per token and
    head, so appending tokens never rescales the ones already stored."""
    scale = x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / _FP8_MAX
    return (x.float() / scale).to(FP8_KV_DTYPE), scale


@dataclass
class ContextKV:
    """Per-layer keys/values of a context for ``context_mode="cached"``.

    keys[i], values[i]: ``[Bc, Nc, heads, head_dim]`` for block i (keys already rotated by RoPE).
    ``Bc`` is 1 (one history shared by the whole batch) or the batch size.
    mask: ``[Bc, Nc]`` bool, True where a context token is real (from ``Context.mask``), or None
    when all are.
    key_scales, value_scales: with keys/values stored in float8 (:meth:`to_fp8`, half the bytes of
    bf16), fp32 ``[Bc, Nc, heads, 1]`` per layer, one per token and head; None when stored plain.
    Read a layer through :meth:`layer`, which upcasts one layer at a time.
    order: ``[Nc]`` the tokens' :attr:`pfp.Context.order` keys (None: ``positions[:, 0]``); tokens
    added by a later :meth:`WanStyleBackbone.cache_context` must not come before the cached ones.
    """

    keys: list
    values: list
    positions: Tensor
    mask: Optional[Tensor] = None
    key_scales: Optional[list] = None
    value_scales: Optional[list] = None
    order: Optional[Tensor] = None
    memory_keys: Optional[list] = None
    memory_values: Optional[list] = None
    memory_mask: Optional[Tensor] = None
    # joint_buffers()'s per-layer buffers and their (batch, capacity, dtype)
    _joint: Optional[list] = field(default=None, init=False, repr=False, compare=False)
    _joint_key: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def order_keys(self) -> Tensor:
        return order_keys(self)

    def memory(self, i: int):
        """(K, V, mask) of block i's cross-attention over the compressor's features
        (:class:`MemoryAttention`), or None when the cache holds none."""
        if self.memory_keys is None:
            return None
        return self.memory_keys[i], self.memory_values[i], self.memory_mask

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def is_fp8(self) -> bool:
        return self.key_scales is not None

    def layer(self, i: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(K, V) of block i in ``dtype`` (upcast from float8 when stored so)."""
        if not self.is_fp8:
            return self.keys[i], self.values[i]
        return ((self.keys[i].float() * self.key_scales[i]).to(dtype),
                (self.values[i].float() * self.value_scales[i]).to(dtype))

    def to_fp8(self) -> "ContextKV":
        """The same cache with K/V stored in float8 e4m3 and per-token, per-head fp32 scales."""
        if self.is_fp8:
            return self
        kq = [_quantize_fp8(k) for k in self.keys]
        vq = [_quantize_fp8(v) for v in self.values]
        return ContextKV([k for k, _ in kq], [v for v, _ in vq], self.positions, self.mask,
                         [s for _, s in kq], [s for _, s in vq], self.order, self.memory_keys, self.memory_values,
                         self.memory_mask)

    def viewed_in(self, longer: "ContextKV") -> "ContextKV":
        """This cache with its K/V (and scales) as views of the first :attr:`num_tokens` of
        ``longer``, a cache that extends it (``cache_context(more, self)`` copies these K/V into its
        head): the same values, one copy held between the two (a sliding window's cache beside the
        history's in :func:`pfp.generate.generate`)."""
        n = self.num_tokens

        def head(tensors):
            return None if tensors is None else [t[:, :n] for t in tensors]
        if longer.num_tokens < n or longer.is_fp8 != self.is_fp8:
            raise ValueError(f"viewed_in: a cache of {longer.num_tokens} tokens ({'fp8' if longer.is_fp8 else 'native'}) "
                             f"cannot hold this one's {n} ({'fp8' if self.is_fp8 else 'native'})")
        return ContextKV(head(longer.keys), head(longer.values), self.positions, self.mask, head(longer.key_scales),
                         head(longer.value_scales), self.order, self.memory_keys, self.memory_values, self.memory_mask)

    def joint_buffers(self, batch: int, capacity: int, dtype: torch.dtype) -> list:
        """Per layer, a :class:`pfp_kernels.JointKVBuffer` of this context (in ``dtype``, with the
        mask) for ``batch`` queries of up to ``capacity`` target tokens. Made on first use and kept
        with the cache, so every denoising step of a chunk reuses them; another batch, capacity or
        dtype replaces them. They hold ``batch x (Nc + capacity)`` K/V per layer beside the cache."""
        key = (batch, capacity, dtype)
        if self._joint_key != key:
            self.release_buffers()   # the old set is freed before the new is made
            self._joint = [pfp_kernels.JointKVBuffer(*self.layer(i, dtype), batch, capacity, self.mask)
                           for i in range(len(self.keys))]
            self._joint_key = key
        return self._joint

    @property
    def holds_joint_buffers(self) -> bool:
        """Whether :meth:`joint_buffers` made a set that this cache still holds."""
        return self._joint is not None

    def release_buffers(self) -> None:
        """Free the buffers of :meth:`joint_buffers` (made again on their next use)."""
        self._joint, self._joint_key = None, None

    def nbytes(self) -> int:
        """Bytes held by the K/V (and scales) of every layer."""
        parts = (self.keys + self.values + (self.key_scales or []) + (self.value_scales or [])
                 + (self.memory_keys or []) + (self.memory_values or []))
        return sum(t.numel() * t.element_size() for t in parts)


def check_context_mode(mode: str) -> str:
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {mode!r}")
    return mode


def context_parts(context) -> Optional[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """(tokens ``[Bc, Nc, C]``, positions ``[Nc, 3]``, mask ``[Bc, Nc]`` bool or None) of a Context, or
    None when it holds no token. The mask is None when every token is real."""
    if context is None:
        return None
    tokens, positions = context.tokens, context.positions
    if tokens.shape[1] == 0:
        return None
    if positions.shape != (tokens.shape[1], 3):
        raise ValueError(f"Context.positions must be [{tokens.shape[1]}, 3], got {tuple(positions.shape)}")
    mask = getattr(context, "mask", None)
    if mask is not None:
        if tuple(mask.shape) != tuple(tokens.shape[:2]) or mask.dtype != torch.bool:
            raise ValueError(f"Context.mask must be a bool [B, N]={tuple(tokens.shape[:2])} tensor, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(tokens.device)
        if bool(mask.all()):
            mask = None
    return tokens, positions, mask


def masked_joint_attention(q: Tensor, k: Tensor, v: Tensor, context_k: Optional[Tensor],
                           context_v: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
    """``pfp_kernels.joint_attention(q, k, v, context_k, context_v)`` where context key j of sample b
    takes part only if ``context_mask[b, j]`` (target keys always do).

    q, k, v: ``[B, Nq, H, D]``, ``[B, Nk, H, D]``; context_k/v: ``[Bc, Nc, H, D]`` with Bc 1 or B;
    context_mask: ``[Bc, Nc]`` bool or None. One call with the op's key mask: a masked key is
    absent, not down-weighted, and a sample with no valid key attends to the targets alone. No
    host synchronisation; without a mask the op may pick any backend, with one those that take it.
    """
    if context_k is None or context_mask is None:
        return pfp_kernels.joint_attention(q, k, v, context_k=context_k, context_v=context_v)
    return pfp_kernels.joint_attention(q, k, v, context_k=context_k, context_v=context_v,
                                       context_mask=context_mask)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``[..., dim]`` cos/sin embedding of t (flip_sin_to_cos, no shift: Wan's convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulation(scale_shift_table: Tensor, mod: Tensor):
    # mod: [B, N or 1, 6, C] -> six [B, N or 1, C] tensors, fp32 (Wan keeps modulation in fp32)
    e = scale_shift_table.float().unsqueeze(0) + mod.float()
    return e.unbind(2)


def take_joint_buffer(prev_kv, hc: Optional[Tensor], sp) -> tuple:
    """(the :class:`pfp_kernels.JointKVBuffer` a block was given as ``prev_kv``, or None; ``prev_kv``
    without it). A buffer serves a denoising step only: no new context tokens ``hc``, no sequence
    parallelism ``sp``."""
    if not isinstance(prev_kv, pfp_kernels.JointKVBuffer):
        return None, prev_kv
    if hc is not None or sp is not None:
        raise ValueError("a JointKVBuffer serves a denoising step's target tokens only (no new context tokens, "
                         "no sequence parallelism)")
    return prev_kv, None


def _rank_heads_of_cache(sp, num_heads: int, kv):
    """A block's cached context (K, V) ``[Bc, Nc, H, D]`` as this rank attends with it under sequence
    parallelism (``sp``): a cache made before, with every head, keeps this rank's heads; one made
    under ``sp`` already holds only those. Unchanged without ``sp`` or without a cache."""
    if sp is None or kv is None or kv[0].shape[2] != num_heads or sp.world == 1:
        return kv
    heads = sp.heads(num_heads)
    return kv[0][:, :, heads], kv[1][:, :, heads]


def _causal_context_attention(qc: Tensor, k_all: Tensor, v_all: Tensor, offset: int, frames,
                              mask: Optional[Tensor] = None) -> Tensor:
    """Context self-attention, causal over context token frames (runs of equal
    :attr:`pfp.Context.order`): a token of frame j sees every context token of frames <= j. qc
    holds the new tokens, which start at ``offset`` in k_all.

    New tokens after a cache (generation) go frame by frame through joint_attention (cached K/V
    as its context segment); a whole context at once uses one SDPA call with a block-causal mask.
    With a token mask ``[Bc, offset + Nnew]`` (False = padding), one SDPA call whose mask also
    drops the padded keys; a padded query still sees itself, so its (unused) output stays finite
    while no real token ever reads it.
    """
    if mask is not None:
        n_new = qc.shape[1]
        frame_of = torch.zeros(n_new, dtype=torch.long, device=qc.device)
        for i, (s, e) in enumerate(frames):
            frame_of[s:e] = i
        allowed = torch.ones(n_new, offset + n_new, dtype=torch.bool, device=qc.device)
        allowed[:, offset:] = frame_of[None, :] <= frame_of[:, None]         # cached keys: all earlier
        allowed = allowed[None] & mask[:, None, :]                             # [Bc, Nq, Nk]
        self_key = torch.arange(n_new, device=qc.device) + offset
        allowed[:, torch.arange(n_new, device=qc.device), self_key] = True
        return F.scaled_dot_product_attention(qc.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                              attn_mask=allowed[:, None]).transpose(1, 2)
    if offset == 0 and len(frames) > 1:
        # the whole context at once (training, first chunk): one masked SDPA call
        frame_of = torch.zeros(qc.shape[1], dtype=torch.long, device=qc.device)
        for i, (s, e) in enumerate(frames):
            frame_of[s:e] = i
        mask = frame_of[None, :] <= frame_of[:, None]  # [query, key]
        return F.scaled_dot_product_attention(qc.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    outs = []
    for s, e in frames:
        gs, ge = offset + s, offset + e
        ck = k_all[:, :gs] if gs else None
        cv = v_all[:, :gs] if gs else None
        outs.append(pfp_kernels.joint_attention(qc[:, s:e], k_all[:, gs:ge], v_all[:, gs:ge],
                                                context_k=ck, context_v=cv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class MemoryAttention(nn.Module):
    """Cross-attention of a block's target tokens over the compressor's penultimate features
    (PFP 3.4, "cross-attention enhancement", IP-Adapter style: decoupled from the text).

    The query is the block's own text cross-attention query (``attn2``); keys and values are new
    projections of the features ``[B, Nf, F]`` (one per history token, :attr:`pfp.Context.features`,
    no positions: a set). The output projection starts at zero, so a model with it added predicts
    exactly what it did before, and training moves it from there.
    """

    def __init__(self, feature_dim: int, inner_dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.to_k = nn.Linear(feature_dim, inner_dim, **factory)
        self.to_v = nn.Linear(feature_dim, inner_dim, **factory)
        self.norm_k = nn.RMSNorm(inner_dim, eps=eps, **factory)
        self.to_out = nn.Linear(inner_dim, inner_dim, **factory)
        with torch.no_grad():
            self.to_out.weight.zero_()
            self.to_out.bias.zero_()

    def kv(self, features: Tensor, heads: int) -> tuple[Tensor, Tensor]:
        """Features ``[B, Nf, F]`` -> (K, V) ``[B, Nf, heads, inner/heads]``."""
        k = self.norm_k(self.to_k(features)).unflatten(-1, (heads, -1))
        return k, self.to_v(features).unflatten(-1, (heads, -1))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sp=None, sp_tokens: int = 0) -> Tensor:
        """q ``[B, Nq, H, D]``; k, v ``[B or 1, Nf, H, D]``; mask ``[B or 1, Nf]`` bool or None ->
        ``[B, Nq, inner]``. A sample with no real feature gets zero.

        Under sequence parallelism (``sp``; q holds this rank's slice of ``sp_tokens`` target tokens,
        every head): an all-to-all gives every token with this rank's heads, which attend over this
        rank's heads of k, v (all heads given are sliced), and a second one trades back before the
        output projection, so each rank keeps only its heads' K/V of the features."""
        if sp is not None and sp.world > 1:
            k, v = _rank_heads_of_cache(sp, q.shape[2], (k, v))
            o = sp.heads_to_seq(self.attend(sp.seq_to_heads(q.contiguous(), sp_tokens), k, v, mask))
            return self.to_out(o.flatten(2))
        return self.to_out(self.attend(q, k, v, mask).flatten(2))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The attention alone: q ``[B, Nq, H, D]`` over k, v ``[B or 1, Nf, H, D]`` -> ``[B, Nq, H, D]``."""
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        if mask is None:
            o = pfp_kernels.joint_attention(q, k, v.to(q.dtype) if v.dtype != q.dtype else v)
        else:
            m = mask.to(q.device).expand(q.shape[0], -1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=m[:, None, None, :]).transpose(1, 2)
            o = torch.where(m.any(1)[:, None, None, None], o, torch.zeros_like(o))   # all padded: no memory
        return o


def set_parts(block: nn.Module, names: tuple, parts: dict) -> None:
    """Register ``parts`` on ``block`` in the order given (which fixes ``parameters()``' order, and
    so an optimizer's state), after checking they are exactly ``names``."""
    if set(parts) != set(names):
        raise ValueError(f"{type(block).__name__} needs exactly {names}, got {tuple(parts)}")
    for name, part in parts.items():
        setattr(block, name, part)


class WanStyleBlock(nn.Module):
    """One Wan-style transformer block over two token streams: context and target.

    It owns Wan's submodules under Wan's names (``norm1``, ``attn1``, ``attn2``, ``norm2``, ``ffn``,
    ``norm3``, ``scale_shift_table``), so its state dict reads like a diffusers
    ``WanTransformerBlock``'s, and its :meth:`forward` is what the backbone runs: hooks on the block
    (FSDP's ``fully_shard``, diffusers' group offload, layerwise casting) wrap every call, from
    :meth:`WanStyleBackbone.forward` and :meth:`WanStyleBackbone.cache_context` alike.
    :meth:`adopt` builds one around a diffusers block's own modules (no copy).
    """

    PARTS = ("norm1", "attn1", "attn2", "norm2", "ffn", "norm3", "scale_shift_table")

    def __init__(self, num_heads: int, **parts):
        """parts: the modules named in :data:`PARTS`, and ``scale_shift_table`` ``[1, 6, inner]`` (a
        Parameter added to the timestep modulation). They are registered in the order given, which
        fixes the order of ``parameters()`` (and so of an optimizer's state)."""
        super().__init__()
        self.num_heads = num_heads
        set_parts(self, self.PARTS, parts)
        # cross-attention over the compressor's features: none until add_memory_attention()
        self.register_module("memory_attn", None)

    @classmethod
    def adopt(cls, block: nn.Module, num_heads: int) -> "WanStyleBlock":
        """A block over the modules and parameters of a diffusers ``WanTransformerBlock`` (shared, in
        the same order, so the parameter order and the state dict's names stay diffusers')."""
        return cls(num_heads, **dict(block.named_children()), scale_shift_table=block.scale_shift_table)

    def _qkv(self, attn, x: Tensor, cos: Tensor, sin: Tensor):
        q = attn.norm_q(attn.to_q(x)).unflatten(-1, (self.num_heads, -1))
        k = attn.norm_k(attn.to_k(x)).unflatten(-1, (self.num_heads, -1))
        v = attn.to_v(x).unflatten(-1, (self.num_heads, -1))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def add_memory_attention(self, feature_dim: int) -> None:
        """Give this block a :class:`MemoryAttention` over compressor features of ``feature_dim``
        channels (zero output: the block's outputs do not change)."""
        ref = self.attn2.to_q.weight
        inner = ref.shape[0]
        self.memory_attn = MemoryAttention(feature_dim, inner, device=ref.device, dtype=ref.dtype)

    def _cross_attention(self, x: Tensor, text: Tensor, text_mask: Optional[Tensor], memory=None,
                         image: Optional[Tensor] = None, sp_tokens: int = 0) -> Tensor:
        attn = self.attn2
        q = attn.norm_q(attn.to_q(x)).unflatten(-1, (self.num_heads, -1))
        extra = (self.memory_attn(q, *memory, sp=self.sp, sp_tokens=sp_tokens)
                 if memory is not None and self.memory_attn is not None else None)
        k = attn.norm_k(attn.to_k(text)).unflatten(-1, (self.num_heads, -1))
        v = attn.to_v(text).unflatten(-1, (self.num_heads, -1))
        if q.shape[0] != k.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        if text_mask is None:
            o = pfp_kernels.joint_attention(q, k, v)
        else:
            mask = text_mask.bool()[:, None, None, :]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask).transpose(1, 2)
        o = o.flatten(2)
        if image is not None:  # Wan I2V: the image tokens through their own K/V, summed before to_out
            o = o + self._image_attention(q, image).flatten(2).type_as(o)
        out = attn.to_out[0](o)
        return out if extra is None else out + extra.to(out.dtype)

    def _image_attention(self, q: Tensor, image: Tensor) -> Tensor:
        """Wan 2.1 I2V's image cross-attention: q ``[B, Nq, H, D]`` over the embedded image tokens
        ``[B or 1, Ni, inner]`` through ``attn2``'s ``add_k_proj``, ``norm_added_k``, ``add_v_proj``."""
        attn = self.attn2
        k = attn.norm_added_k(attn.add_k_proj(image)).unflatten(-1, (self.num_heads, -1))
        v = attn.add_v_proj(image).unflatten(-1, (self.num_heads, -1))
        if q.shape[0] != k.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        return pfp_kernels.joint_attention(q, k, v)

    sp = None  # a pfp.parallel.SequenceParallel while the backbone runs sequence-parallel

    def forward(self, hc: Optional[Tensor], ht: Optional[Tensor], mod_c, mod_t, text, text_mask,
                rope_c, rope_t, prev_kv, joint: bool, need_context_out: bool, frames,
                ctx_mask: Optional[Tensor] = None, sp_tokens: int = 0, memory=None, image=None):
        """One block over the new context tokens hc ``[Bc, Nc, inner]`` and the target tokens ht
        ``[B, Nt, inner]`` (either may be None).

        mod_c, mod_t: timestep modulations ``[B, 1 or N, 6, inner]``; text ``[B or 1, L, inner]`` and
            text_mask: the target's cross-attention (context tokens never read the text).
        rope_c, rope_t: (cos, sin) of the two streams' positions.
        prev_kv: (K, V) of this block for context tokens cached earlier (cached mode), or None; or
            a :class:`pfp_kernels.JointKVBuffer` holding them (a denoising step under no_grad: ht
            only), through which the target attends.
        joint: targets and context attend to each other (all tokens); otherwise the context attends
            to itself only, causally over token frames (``frames``: (start, end) of each frame in hc).
        need_context_out: compute hc' (the last block's context output is never read).
        ctx_mask: ``[Bc, N]`` bool over every context token of this block (cached, then new), False
            for padding: no query reads a padded key. None: all real.
        sp_tokens: sequence-parallel (``self.sp``): ht is this rank's slice of ``sp_tokens`` target
            tokens; context tokens are whole, and their K/V (prev_kv and the returned ones) hold only
            this rank's heads.
        memory: (K, V, mask) of this block's :class:`MemoryAttention` over the compressor's
            features, read by the target tokens beside the text; None: none.
        image: ``[B or 1, Ni, inner]`` embedded image tokens (Wan 2.1 I2V), read by the target tokens
            through ``attn2``'s added K/V beside the text; None: none.
        Returns (hc', ht', (K, V) of every context token of this block).
        """
        sp = self.sp
        heads = sp.heads(self.num_heads) if sp is not None else slice(None)
        buffer, prev_kv = take_joint_buffer(prev_kv, hc, sp)
        prev_kv = _rank_heads_of_cache(sp, self.num_heads, prev_kv)
        k_all = v_all = None
        if hc is not None:
            sh, sc, g, c_sh, c_sc, c_g = _modulation(self.scale_shift_table, mod_c)
            xc = (self.norm1(hc.float()) * (1 + sc) + sh).type_as(hc)
            qc, kc, vc = self._qkv(self.attn1, xc, *rope_c)
            if sp is not None:  # the context attends with this rank's heads only
                qc, kc, vc = qc[:, :, heads], kc[:, :, heads], vc[:, :, heads]
            if prev_kv is not None:
                k_all, v_all = torch.cat([prev_kv[0], kc], dim=1), torch.cat([prev_kv[1], vc], dim=1)
            else:
                k_all, v_all = kc, vc
        elif prev_kv is not None:
            k_all, v_all = prev_kv
        if ht is not None:
            t_sh, t_sc, t_g, t_c_sh, t_c_sc, t_c_g = _modulation(self.scale_shift_table, mod_t)
            xt = (self.norm1(ht.float()) * (1 + t_sc) + t_sh).type_as(ht)
            qt, kt, vt = self._qkv(self.attn1, xt, *rope_t)
            if sp is not None:  # this rank's tokens, every head -> every token, this rank's heads
                qt, kt, vt = (sp.seq_to_heads(z, sp_tokens) for z in (qt, kt, vt))
            ck, cv = k_all, v_all
            if ck is not None and ck.dtype != qt.dtype:
                ck, cv = ck.to(qt.dtype), cv.to(qt.dtype)
            if buffer is not None:   # the cached context is in the buffer's head already
                ot = buffer.attend(qt, kt, vt)
            else:
                ot = masked_joint_attention(qt, kt, vt, ck, cv, ctx_mask)
            if sp is not None:
                ot = sp.heads_to_seq(ot)
            ht = (ht.float() + self.attn1.to_out[0](ot.flatten(2)).float() * t_g).type_as(ht)
            xt = self.norm2(ht.float()).type_as(ht)
            ht = ht + self._cross_attention(xt, text, text_mask, memory, image, sp_tokens)
            xt = (self.norm3(ht.float()) * (1 + t_c_sc) + t_c_sh).type_as(ht)
            ht = (ht.float() + self.ffn(xt).float() * t_c_g).type_as(ht)
        if hc is not None and need_context_out:
            if joint:
                oc = masked_joint_attention(qc, kt, vt, kc, vc, ctx_mask)
            else:
                offset = 0 if prev_kv is None else prev_kv[0].shape[1]
                oc = _causal_context_attention(qc, k_all, v_all, offset, frames, ctx_mask)
            if sp is not None:
                oc = sp.gather_heads(oc)
            hc = (hc.float() + self.attn1.to_out[0](oc.flatten(2)).float() * g).type_as(hc)
            xc = (self.norm3(hc.float()) * (1 + c_sc) + c_sh).type_as(hc)
            hc = (hc.float() + self.ffn(xc).float() * c_g).type_as(hc)
        return hc, ht, (k_all, v_all)


class WanStyleBackbone(nn.Module):
    """Base class: a forward over noisy target latents, per-token timesteps, text and a Context.

    Subclasses set ``patch_embedding``, ``blocks`` (:class:`WanStyleBlock` modules), ``norm_out``,
    ``proj_out``, ``scale_shift_table``,
    and the attributes ``num_heads``, ``patch_size``, ``latent_channels``, ``inner_dim``,
    ``rope_theta``, ``context_mode``; and implement :meth:`embed_time` and :meth:`embed_text`.
    """

    gradient_checkpointing: bool = False
    # The last dim of forward's text (checked there); None: not checked (HunyuanVideo packs its
    # text with the pooled vector and checks the states' width after unpacking them)
    text_width: Optional[int] = None
    # Whether the target's text cross-attention skips padded text positions (text_mask). The tiny
    # DiT trains that way; Wan was trained attending to its zero-padded 512 positions, so its
    # adapter ignores the mask unless asked (WanBackbone(mask_text_padding=True)).
    mask_text_padding: bool = True

    # ---- what subclasses provide -------------------------------------------------------------
    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t in [0, 1], any shape S -> (temb ``[*S, inner]``, modulation ``[*S, 6, inner]``)."""
        raise NotImplementedError

    def embed_text(self, text: Tensor) -> Tensor:
        """``[B, L, text_dim]`` -> ``[B, L, inner]``."""
        raise NotImplementedError

    # ---- the interface the compressor and the sampler use ------------------------------------
    @property
    def patch_embed(self) -> nn.Module:
        """The patch embedding, shared with the compressor's low-res branch (for a model with
        condition channels, a :class:`LatentPatchEmbed` over it: the latent with a zero condition)."""
        if not self.condition_channels:
            return self.patch_embedding
        wrapper = self.__dict__.get("_latent_patch_embed")
        if wrapper is None or wrapper.conv is not self.patch_embedding:
            # kept out of the module tree, so the state dict names the conv once
            wrapper = LatentPatchEmbed(self.patch_embedding, self.latent_channels)
            self.__dict__["_latent_patch_embed"] = wrapper
        return wrapper

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks run in: that of the weights (fp32, bf16 or fp16). Inputs of any
        float dtype (fp32 latents from the sampler, fp32 context tokens from the compressor, the
        text encoder's states) are cast to it on the way in."""
        return self.patch_embedding.weight.dtype

    def token_grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid of a latent ``[*, *, t, h, w]``; raises if it does not divide the patch."""
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size (t={t}, h={h}, w={w}) must be a multiple of the patch size {self.patch_size}")
        return t // pt, h // ph, w // pw

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    rope_axis_dims = None  # channels of the head dim per axis (t, h, w); None: Wan's split

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) of tokens at ``positions`` ``[N, 3]`` or ``[B, N, 3]``, for :func:`apply_rope`."""
        return rope_cos_sin(positions, self.head_dim, self.rope_theta, self.rope_axis_dims)

    sequence_parallel = None  # a pfp.parallel.SequenceParallel, or None
    # Cached mode's denoising steps attend through per-layer [context ; target] buffers
    # (ContextKV.joint_buffers) instead of a concatenation per step: see use_context_kv_buffers.
    context_kv_buffers = False
    supports_context_kv_buffers = True

    def set_sequence_parallel(self, sp) -> None:
        """Split every forward's target tokens over ``sp``'s ranks (:mod:`pfp.parallel`), or stop
        (None). Context K/V cached while it is set hold only this rank's heads. Inference only."""
        if sp is not None:
            sp.heads(self.num_heads)  # checks that the heads divide among the ranks
        self.sequence_parallel = sp
        for blk in self.blocks:
            blk.sp = sp

    def add_memory_attention(self, feature_dim: int) -> None:
        """Cross-attention enhancement (PFP 3.4): every block's target tokens also attend to the
        compressor's penultimate features (:class:`MemoryAttention`, zero-initialised, so the
        backbone's predictions are unchanged until it trains)."""
        for blk in self.blocks:
            blk.add_memory_attention(feature_dim)

    @property
    def has_memory_attention(self) -> bool:
        return len(self.blocks) > 0 and self.blocks[0].memory_attn is not None

    def _memory_kv(self, features: Tensor) -> list:
        """Per block, (K, V) of the features for its MemoryAttention: under sequence parallelism
        this rank's heads only (:meth:`MemoryAttention.forward` attends with those)."""
        dtype = self.compute_dtype
        sp = self.sequence_parallel
        # copies, not views: a view of every head would keep them all alive
        return [tuple(t.contiguous() for t in _rank_heads_of_cache(sp, self.num_heads, blk.memory_attn.kv(
            features.to(dtype), self.num_heads))) for blk in self.blocks]

    # ---- pieces ------------------------------------------------------------------------------
    def use_context_kv_buffers(self, enabled: bool = True) -> None:
        """In cached mode, under ``torch.no_grad()``, let each forward over a :class:`ContextKV`
        attend through per-layer persistent ``[context ; target]`` buffers
        (:meth:`ContextKV.joint_buffers`, :class:`pfp_kernels.JointKVBuffer`): the context is copied
        into them once per chunk instead of into a concatenation at every step. They cost ``B x (Nc +
        Nt)`` K/V per layer for as long as the cache lives (the memory planner's ``kv="buffer"``).
        Training, joint mode and sequence parallelism run as before."""
        if enabled and not self.supports_context_kv_buffers:
            raise ValueError(f"use_context_kv_buffers: {type(self).__name__}'s blocks cannot attend through "
                             "[context ; target] buffers")
        self.context_kv_buffers = bool(enabled)

    def _joint_buffers(self, cached: Optional["ContextKV"], hc: Optional[Tensor], batch: int, tail: int,
                       dtype: torch.dtype) -> Optional[list]:
        """The cache's per-layer buffers for a tail of ``tail`` keys when this forward attends through
        them (:meth:`use_context_kv_buffers` on, a cache, no new context tokens, no sequence
        parallelism, no autograd); else None."""
        if (self.context_kv_buffers and cached is not None and cached.num_tokens and hc is None
                and self.sequence_parallel is None and not torch.is_grad_enabled()):
            return cached.joint_buffers(batch, tail, dtype)
        return None

    def buffer_tail_tokens(self, target_tokens: int, text_tokens: int) -> int:
        """Keys a denoising step writes into each buffer's tail (:meth:`use_context_kv_buffers`),
        for ``target_tokens`` target tokens and text states ``text_tokens`` long as :meth:`forward`
        takes them: the target's (the text is read by cross-attention)."""
        return target_tokens

    def _call_block(self, blk: "WanStyleBlock", *args):
        # through the block's __call__, so hooks on it (FSDP, offload, casting) see every call
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def _context_modulation(self, like: Tensor) -> Tensor:
        t0 = torch.zeros(1, 1, device=like.device)
        return self.embed_time(t0)[1]  # [1, 1, 6, C]

    def _check_forward_args(self, x: Tensor, text: Tensor, text_mask: Optional[Tensor]) -> None:
        """forward()'s x, text and text_mask: shapes and batches, each error naming the argument."""
        if x.dim() != 5 or x.shape[1] != self.latent_channels:
            raise ValueError(f"x must be [B, {self.latent_channels}, T, H, W] latents, got {tuple(x.shape)}")
        b = x.shape[0]
        if text.dim() != 3 or text.shape[0] not in (1, b):
            raise ValueError(f"text must be [B={b} or 1, L, text_dim] states, got {tuple(text.shape)}")
        if self.text_width is not None and text.shape[2] != self.text_width:
            raise ValueError(f"text must be [B, L, {self.text_width}] states (this backbone's text width), got "
                             f"{tuple(text.shape)}")
        if text_mask is not None and (text_mask.dim() != 2 or text_mask.shape[0] not in (1, b)
                                      or text_mask.shape[1] != text.shape[1]):
            raise ValueError(f"text_mask must be [B={b} or 1, L={text.shape[1]}], got {tuple(text_mask.shape)}")

    def _target_inputs(self, x: Tensor, timesteps, positions: Optional[Tensor], t_start: float):
        """(token grid, RoPE of the target tokens, timesteps ``[B, 1 | Nt]``) of latents x: positions
        ``[Nt, 3]`` or ``[B, Nt, 3]``, default the grid from token time ``t_start``; checked."""
        grid = self.token_grid(*x.shape[2:])
        nt = grid[0] * grid[1] * grid[2]
        if positions is None:
            positions = grid_positions(*grid, t_start=t_start, device=x.device)
        elif positions.shape[-2:] != (nt, 3) or positions.ndim not in (2, 3) or (
                positions.ndim == 3 and positions.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"positions must be [{nt}, 3] or [B={x.shape[0]}, {nt}, 3], got {tuple(positions.shape)}")
        return grid, self.rope(positions.to(x.device)), self._target_timesteps(timesteps, x.shape[0], grid).to(x.device)

    def _target_timesteps(self, timesteps: Tensor, batch: int, grid: tuple[int, int, int]) -> Tensor:
        """[B], [B, T'] (per token frame) or [B, Nt] -> [B, 1] or [B, Nt]."""
        nt = grid[0] * grid[1] * grid[2]
        ts = torch.as_tensor(timesteps, dtype=torch.float32)
        if ts.ndim == 0:
            ts = ts.expand(batch)
        if ts.ndim == 1:
            if ts.shape[0] not in (1, batch):
                raise ValueError(f"timesteps [B] must have B={batch} entries, got {ts.shape[0]}")
            return ts.expand(batch)[:, None]
        if ts.ndim == 2 and ts.shape[0] not in (1, batch):
            raise ValueError(f"timesteps [B, ...] must have B={batch} rows, got {tuple(ts.shape)}")
        if ts.ndim == 2 and ts.shape[1] == grid[0]:
            return ts.expand(batch, -1).repeat_interleave(grid[1] * grid[2], dim=1)
        if ts.ndim == 2 and ts.shape[1] == nt:
            return ts.expand(batch, -1)
        raise ValueError(f"timesteps must be [B], [B, T'={grid[0]}] or [B, Nt={nt}], got {tuple(ts.shape)}")

    def _resolve_context(self, context, b: int, x: Tensor) -> tuple:
        """What a forward reads of its ``context`` (a Context, a ContextKV or None) for a batch of
        ``b``: (new context tokens ``[Bc or b, Nc, inner]`` in the compute dtype, their RoPE, their
        modulation, the cache, the token frames, the key mask, per-block memory K/V); each None
        when absent. Joint mode expands the tokens to the batch."""
        hc = rope_c = mod_c = cached = frames = ctx_mask = None
        dtype = self.compute_dtype
        memory = None    # per block (K, V, mask) of the MemoryAttention over the compressor's features
        joint = self.context_mode == "joint"
        if isinstance(context, ContextKV):
            if context.memory_keys is not None and self.has_memory_attention:
                memory = [context.memory(i) for i in range(len(self.blocks))]
            if joint:
                raise ValueError("a ContextKV is only valid with context_mode='cached'")
            cached = context if context.num_tokens else None
            if cached is not None and cached.batch_size not in (1, b):
                raise ValueError(f"cached context batch must be 1 or {b}, got {cached.batch_size}")
            ctx_mask = cached.mask if cached is not None else None
        else:
            parts = context_parts(context)
            if parts is not None:
                hc, pos_c, ctx_mask = parts
                hc = hc.to(dtype)
                if hc.shape[0] not in (1, b):
                    raise ValueError(f"context batch must be 1 or {b}, got {hc.shape[0]}")
                if joint:
                    hc = hc.expand(b, -1, -1)
                    ctx_mask = ctx_mask.expand(b, -1) if ctx_mask is not None else None
                rope_c = self.rope(pos_c.to(x.device))
                mod_c = self._context_modulation(x)
                # joint mode: every context token attends to all, so the order never matters there
                frames = None if joint else _frame_runs(order_keys(context, hc.shape[1]))
            features = getattr(context, "features", None)
            if self.has_memory_attention and features is not None and features.shape[1]:
                if features.shape[0] not in (1, b):
                    raise ValueError(f"context features batch must be 1 or {b}, got {features.shape[0]}")
                fmask = getattr(context, "feature_mask", None)
                memory = [(k, v, fmask) for k, v in self._memory_kv(features)]

        return hc, rope_c, mod_c, cached, frames, ctx_mask, memory

    # ---- public forward ----------------------------------------------------------------------
    @torch.no_grad()
    def cache_context(self, context, cache: Optional[ContextKV] = None, kv_storage: str = "native"
                      ) -> Optional[ContextKV]:
        """Per-layer K/V of a clean context for ``context_mode="cached"``.

        Context tokens run at timestep 0 without text and attend only to context tokens of the same
        or earlier token frames, so K/V of earlier tokens never change: pass the previous ``cache``
        and only the new tokens of ``context`` (e.g. what ``CompressorStream.append`` returned) are
        computed, attending to the cached ones. Returns the extended cache (None while empty).
        Computed once per chunk, then reused by every denoising step and both CFG branches.

        kv_storage: ``"native"`` (the compute dtype) or ``"fp8"`` (float8 e4m3 with per-token,
        per-head scales: half of bf16's bytes, upcast one layer at a time when read). A cache already
        in fp8 stays so.
        """
        if kv_storage not in ("native", "fp8"):
            raise ValueError(f"kv_storage must be 'native' or 'fp8', got {kv_storage!r}")
        if cache is not None:   # its [context ; target] buffers describe the old context: free them
            cache.release_buffers()   # before the new cache's K/V are made (made again if it is read again)
        parts = context_parts(context)
        if parts is None:
            return cache.to_fp8() if cache is not None and kv_storage == "fp8" else cache
        hc, pos_c, new_mask = parts
        memory = self._cache_memory(context, cache)
        hc = hc.to(self.compute_dtype)
        if cache is not None and cache.batch_size != hc.shape[0]:
            raise ValueError(f"new context batch {hc.shape[0]} differs from the cache's {cache.batch_size}")
        mask = None
        old_mask = cache.mask if cache is not None else None
        if new_mask is not None or old_mask is not None:
            n_old = cache.num_tokens if cache is not None else 0
            ones = lambda n: torch.ones(hc.shape[0], n, dtype=torch.bool, device=hc.device)  # noqa: E731
            mask = torch.cat([old_mask if old_mask is not None else ones(n_old),
                              new_mask if new_mask is not None else ones(hc.shape[1])], dim=1)
        rope_c = self.rope(pos_c)
        mod_c = self._context_modulation(hc)
        order = order_keys(context, hc.shape[1])
        frames = _frame_runs(order)
        if cache is not None and cache.num_tokens:
            _check_after(cache.order_keys(), order)
        fp8 = kv_storage == "fp8" or (cache is not None and cache.is_fp8)
        n_old = cache.num_tokens if cache is not None else 0
        keys, values, k_scales, v_scales = [], [], [], []
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            prev = cache.layer(i, hc.dtype) if cache is not None else None
            hc, _, (k, v) = blk(hc, None, mod_c, None, None, None, rope_c, None, prev, False, i < n - 1, frames,
                                mask)
            if fp8:  # store only the new tokens' K/V quantized; the old ones stay as they were stored
                (kq, ks), (vq, vs) = _quantize_fp8(k[:, n_old:]), _quantize_fp8(v[:, n_old:])
                if cache is not None and cache.is_fp8:
                    kq, ks = torch.cat([cache.keys[i], kq], 1), torch.cat([cache.key_scales[i], ks], 1)
                    vq, vs = torch.cat([cache.values[i], vq], 1), torch.cat([cache.value_scales[i], vs], 1)
                elif cache is not None:
                    (kq0, ks0), (vq0, vs0) = _quantize_fp8(cache.keys[i]), _quantize_fp8(cache.values[i])
                    kq, ks = torch.cat([kq0, kq], 1), torch.cat([ks0, ks], 1)
                    vq, vs = torch.cat([vq0, vq], 1), torch.cat([vs0, vs], 1)
                k, v = kq, vq
                k_scales.append(ks)
                v_scales.append(vs)
            keys.append(k)
            values.append(v)
        pos_all = pos_c if cache is None else torch.cat([cache.positions, pos_c.to(cache.positions)])
        order_all = order if cache is None else _host(lambda o: torch.cat([o, order.to(o.device)]), cache.order_keys())
        return ContextKV(keys, values, pos_all, mask, k_scales if fp8 else None, v_scales if fp8 else None,
                         order_all, *memory)

    def _cache_memory(self, context, cache: Optional[ContextKV]) -> tuple:
        """(keys, values, mask) of the MemoryAttention cache after adding ``context``'s features:
        the cache's own, extended by the new features' K/V (projections per feature, so growing it
        chunk by chunk equals one call); (None, None, None) without memory attention."""
        old = (cache.memory_keys, cache.memory_values, cache.memory_mask) if cache is not None else (None,) * 3
        features = getattr(context, "features", None)
        if not self.has_memory_attention or features is None or features.shape[1] == 0:
            return old
        kv = self._memory_kv(features)
        new_mask = getattr(context, "feature_mask", None)
        if old[0] is None:
            return [k for k, _ in kv], [v for _, v in kv], new_mask
        if old[0][0].shape[0] != features.shape[0]:
            raise ValueError(f"new context batch {features.shape[0]} differs from the cache's {old[0][0].shape[0]}")
        mask = None
        if new_mask is not None or old[2] is not None:
            ones = lambda n: torch.ones(features.shape[0], n, dtype=torch.bool, device=features.device)  # noqa: E731
            mask = torch.cat([old[2] if old[2] is not None else ones(old[0][0].shape[1]),
                              new_mask if new_mask is not None else ones(features.shape[1])], dim=1)
        return ([torch.cat([a, k], 1) for a, (k, _) in zip(old[0], kv)],
                [torch.cat([a, v], 1) for a, (_, v) in zip(old[1], kv)], mask)

    condition_channels = 0  # input channels after the latent's (Wan 2.1 I2V: 4 mask + 16 image latent)
    image_dim = None        # width of the image-encoder states the blocks cross-attend to (Wan 2.1 I2V), or None

    @property
    def takes_image(self) -> bool:
        """The blocks have an image cross-attention (Wan 2.1 I2V)."""
        return self.image_dim is not None

    def embed_image(self, image: Tensor) -> Tensor:
        raise ValueError(f"{type(self).__name__} takes no image tokens (no image cross-attention)")

    def forward(self, x: Tensor, timesteps: Tensor, text: Tensor, context=None, *,
                positions: Optional[Tensor] = None, t_start: float = 0.0,
                text_mask: Optional[Tensor] = None, condition: Optional[Tensor] = None,
                image: Optional[Tensor] = None) -> Tensor:
        """Velocity for noisy target latents.

        x: ``[B, C, T, H, W]`` noisy latents (flow matching: ``x_t = (1 - t) x_0 + t * noise``).
        timesteps: t in [0, 1]: ``[B]``, ``[B, T']`` per token frame, or ``[B, Nt]`` per token.
        text: ``[B or 1, L, text_dim]`` text-encoder states; text_mask ``[B or 1, L]`` (True = keep).
        context: a ``pfp.Context`` (tokens ``[B or 1, Nc, inner]``, positions ``[Nc, 3]``), or in cached
            mode the :class:`ContextKV` from :meth:`cache_context`, or None.
            In cached mode a Context is run through the blocks here (with gradients when training).
            ``Context.mask`` / ``ContextKV.mask`` ``[B or 1, Nc]`` (histories of different lengths in
            one batch, padded): a padded token influences no output, so each sample's velocity is the
            one it gets alone with only its real tokens (a sample with none: as with no context).
        positions: target token positions ``[Nt, 3]`` or ``[B, Nt, 3]`` (per sample); default the
            grid starting at token time ``t_start``.
        condition: ``[B or 1, condition_channels, T, H, W]``, joined to x's channels before the
            patch embedding (Wan 2.1 I2V: the first-frame mask and the image's latent); required
            when the model has condition channels, refused otherwise.
        image: ``[B or 1, Ni, image_dim]`` image-encoder states (Wan 2.1 I2V: CLIP's penultimate
            layer, 257 tokens), read by every block's image cross-attention; required when the
            model has one, refused otherwise. Context tokens read neither.
        Returns the predicted velocity ``noise - x_0``, shape of x.
        """
        self._check_forward_args(x, text, text_mask)
        b, _, t, h, w = x.shape
        grid, rope_t, ts = self._target_inputs(x, timesteps, positions, t_start)
        nt = grid[0] * grid[1] * grid[2]
        dtype = self.compute_dtype
        text = text.to(dtype)
        pooled = self.pooled_text(text, text_mask) if hasattr(self, "pooled_text") else None
        if pooled is None:
            temb, mod_t = self.embed_time(ts)  # [B, 1|Nt, C], [B, 1|Nt, 6, C]
        else:
            temb, mod_t = self.embed_time(ts, extra=pooled.expand(b, -1)[:, None, :])
        ht = self.patch_embedding(self._with_condition(x, condition).to(dtype)).flatten(2).transpose(1, 2)
        txt = self.embed_text(text)
        img = self._embedded_image(image, b)

        hc, rope_c, mod_c, cached, frames, ctx_mask, memory = self._resolve_context(context, b, x)
        joint = self.context_mode == "joint"

        cross_mask = text_mask if self.mask_text_padding else None
        sp = self.sequence_parallel
        if sp is not None:  # this rank's slice of the target tokens, with their angles and modulation
            ht = sp.local(ht, 1)
            rope_t = tuple(sp.local(z, -2) for z in rope_t)
            if mod_t.shape[1] == nt:
                mod_t, temb = sp.local(mod_t, 1), sp.local(temb, 1)
        n = len(self.blocks)
        buffers = self._joint_buffers(cached, hc, b, nt, dtype)
        for i, blk in enumerate(self.blocks):
            prev = buffers[i] if buffers is not None else cached.layer(i, dtype) if cached is not None else None
            hc, ht, _ = self._call_block(blk, hc, ht, mod_c, mod_t, txt, cross_mask, rope_c, rope_t, prev,
                                         joint, i < n - 1, frames, ctx_mask, nt if sp is not None else 0,
                                         memory[i] if memory is not None else None, img)

        shift, scale = (self.scale_shift_table.float().unsqueeze(0) + temb.float().unsqueeze(2)).unbind(2)
        out = self.proj_out((self.norm_out(ht.float()) * (1 + scale) + shift).type_as(ht))
        if sp is not None:
            out = sp.gather_seq(out, nt)
        pt, ph, pw = self.patch_size
        out = out.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, -1, t, h, w)
        if getattr(self, "prediction", "velocity") == "x0":
            # x0-prediction -> velocity: v = (x_t - x0) / t, t clamped away from 0
            tt = ts.clamp(min=self.min_t)
            tt = tt.view(b, 1, 1, 1, 1) if tt.shape[1] == 1 else (
                tt.view(b, 1, *grid).repeat_interleave(pt, 2).repeat_interleave(ph, 3).repeat_interleave(pw, 4))
            out = ((x.float() - out.float()) / tt).to(out.dtype)
        return out


    def _with_condition(self, x: Tensor, condition: Optional[Tensor]) -> Tensor:
        """x with the condition channels joined (models that take them), checked."""
        c = self.condition_channels
        if not c:
            if condition is not None:
                raise ValueError(f"{type(self).__name__} takes no condition channels, got condition "
                                 f"{tuple(condition.shape)}")
            return x
        if condition is None:
            raise ValueError(f"this model takes {c} condition channels after the latent's (Wan I2V: the "
                             f"first-frame mask and the image latent): pass condition=[B, {c}, T, H, W]")
        want = (c, *x.shape[2:])
        if condition.dim() != 5 or tuple(condition.shape[1:]) != want or condition.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"condition must be [1 or {x.shape[0]}, {c}, {', '.join(map(str, x.shape[2:]))}], got "
                             f"{tuple(condition.shape)}")
        return torch.cat([x, condition.to(x).expand(x.shape[0], -1, -1, -1, -1)], dim=1)

    def _embedded_image(self, image: Optional[Tensor], batch: int) -> Optional[Tensor]:
        if not self.takes_image:
            if image is not None:
                raise ValueError(f"{type(self).__name__} has no image cross-attention, got image {tuple(image.shape)}")
            return None
        if image is None:
            raise ValueError("this model has an image cross-attention (Wan 2.1 I2V): pass image=[B, Ni, "
                             "image_dim] image-encoder states")
        if image.dim() != 3 or image.shape[0] not in (1, batch):
            raise ValueError(f"image must be [1 or {batch}, Ni, image_dim], got {tuple(image.shape)}")
        return self.embed_image(image.to(self.compute_dtype))


class LatentPatchEmbed(nn.Module):
    """A patch embedding whose input is ``[latent ; condition]`` channels (Wan 2.1 I2V: 16 latent, 4
    mask and 16 image-latent channels), applied to a latent alone: the condition channels' weights
    are left out, which is the embedding of that latent with an all-zero condition. It shares the
    conv's parameters. The compressor's low-res branch patchifies through it."""

    def __init__(self, conv: nn.Conv3d, channels: int):
        super().__init__()
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding):
            raise ValueError("LatentPatchEmbed: the conv must be a patchify Conv3d (kernel == stride, no padding)")
        self.conv = conv
        self.channels = int(channels)
        self.patch_size = tuple(int(k) for k in conv.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.conv.weight[:, : self.channels], self.conv.bias, self.conv.stride)


def _host(fn, t: Tensor):
    """``fn(t)`` on a real tensor even while a FakeTensorMode traces the rest: orders and positions
    are host-side structure (pfp.memory traces full-size models that way)."""
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
    if not is_fake(t):
        with unset_fake_temporarily():
            return fn(t)
    return fn(t)


def _frame_runs(order: Tensor) -> list:
    """(start, end) of each run of context tokens sharing an order key (:attr:`pfp.Context.order`)."""
    return _host(_runs_of, order)


def _check_after(cached: Tensor, new: Tensor) -> None:
    """New context tokens may not come before cached ones: their K/V would be missing from the
    cached tokens' attention."""
    def check(c):
        if c.numel() and new.numel() and float(new.min()) < float(c.max()):
            raise ValueError(f"new context tokens (order from {float(new.min()):g}) come before cached ones (order up to "
                             f"{float(c.max()):g}); a cache grows only with tokens that arrive later: mix such "
                             f"contexts before caching them (pfp.mix_contexts)")
    _host(check, cached)


def _runs_of(t: Tensor) -> list:
    if t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
        raise ValueError("context tokens must be ordered (Context.order, else Context.positions[:, 0], "
                         "non-decreasing); pfp.mix_contexts orders joined contexts")
    change = torch.nonzero(t[1:] != t[:-1]).flatten().tolist()
    bounds = [0] + [c + 1 for c in change] + [t.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


__all__ = ["ContextKV", "FP8_KV_DTYPE", "LatentPatchEmbed", "MemoryAttention", "WanStyleBackbone", "WanStyleBlock", "CONTEXT_MODES", "check_context_mode", "context_parts",
           "masked_joint_attention",
           "sinusoidal_embedding"]
