"""HunyuanVideo through diffusers' ``HunyuanVideoTransformer3DModel`` (needs ``pip install diffusers``).

:class:`HunyuanVideoBackbone` wraps a model you built or loaded yourself (nothing is downloaded)
and runs its own modules: the patch embedding (``x_embedder``), the text token refiner
(``context_embedder``), the timestep + guidance + pooled-text embedding (``time_text_embed``),
20 dual-stream blocks, 40 single-stream blocks and the output head. With no context it computes
what diffusers' forward computes (the tests check it in fp32 and bf16).

**Three token streams.** HunyuanVideo's blocks attend over ``[video ; text]`` jointly; PFP's
compressed history joins as a third stream, through the video stream's weights:

- dual-stream blocks: context and target tokens through ``norm1``, ``attn.to_q/k/v``, ``ff``; text
  tokens through ``norm1_context``, ``attn.add_q/k/v_proj``, ``ff_context``;
- single-stream blocks: one set of weights for all three;
- RoPE (``rope_axes_dim`` channels per (t, h, w) axis, theta 256) on the video streams only, from
  explicit positions, so context tokens sit where their history was;
- context tokens are clean: their modulation is timestep 0 with the call's guidance and an empty
  pooled text (the projection of a zero vector). They never read the prompt, so their K/V are the
  same for every prompt and both CFG branches, and a cache survives a storyboard's prompt change;
- ``context_mode="joint"`` (the paper): every query of every stream attends to
  ``[context ; target ; text]``, recomputed at every step;
- ``context_mode="cached"``: context tokens attend to context tokens of the same or earlier frames
  only, so their per-layer K/V (60 layers) are computed once per chunk
  (:meth:`~pfp.backbones.wan_style.WanStyleBackbone.cache_context`); target and text queries attend
  to ``[context ; target ; text]``.

**Text.** HunyuanVideo reads two text encoders: Llama's states ``[B, L, 4096]`` with their padding
mask, refined by ``context_embedder``, and CLIP's pooled vector ``[B, 768]`` added to the timestep
embedding. The pipeline's text tensors carry both: :func:`pack_text` puts the pooled vector in
token 0 (zero-padded to the states' width, mask True), the states after it. So the sampler's CFG
batching, padding and broadcasting move them as one tensor. As upstream, padded text positions
are masked (the pipeline pads Llama's tokens to 256); they are dropped before the blocks when the
batch's real tokens come first, which changes nothing any real token reads.

Per-token timesteps (``[B, T']`` or ``[B, Nt]``) modulate each target token by its own; the text
stream and the refiner take the sample's mean timestep.

Sequence parallel (:mod:`pfp.parallel`): each rank runs a slice of the target tokens and the whole
text and context; attention trades target tokens for heads (Ulysses), takes the text's and the
context's Q/K/V of its own heads, and gathers the text's and context's outputs over heads, so
every rank's text stream stays whole and equal.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import pfp_kernels

from .rope import apply_rope
from .wan_style import (WanStyleBackbone, _causal_context_attention, _host, check_context_mode, set_parts,
                         masked_joint_attention, _rank_heads_of_cache, take_joint_buffer)

DEFAULT_GUIDANCE = 6.0   # HunyuanVideoPipeline's guidance_scale: the embedded (distilled) guidance


def pack_text(states: Tensor, mask: Optional[Tensor], pooled: Tensor) -> tuple[Tensor, Tensor]:
    """HunyuanVideo's text conditioning as one token tensor: ``pooled`` ``[B, P]`` (CLIP's pooled
    output) zero-padded to the states' width D as token 0, then ``states`` ``[B, L, D]`` (Llama's).
    Returns (tokens ``[B, 1 + L, D]``, mask ``[B, 1 + L]`` bool, token 0 True)."""
    b, _, d = states.shape
    if pooled.dim() != 2 or pooled.shape[0] != b or pooled.shape[1] > d:
        raise ValueError(f"pooled must be [{b}, P] with P <= {d}, got {tuple(pooled.shape)}")
    first = torch.zeros(b, 1, d, dtype=states.dtype, device=states.device)
    first[:, 0, :pooled.shape[1]] = pooled.to(states.dtype)
    if mask is None:
        mask = torch.ones(b, states.shape[1], dtype=torch.bool, device=states.device)
    ones = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
    return torch.cat([first, states], 1), torch.cat([ones, mask.bool()], 1)


def unpack_text(text: Tensor, mask: Optional[Tensor], pooled_dim: int) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Inverse of :func:`pack_text`: (states ``[B, L, D]``, their mask or None, pooled ``[B, P]``)."""
    if text.dim() != 3 or text.shape[1] < 2:
        raise ValueError(f"HunyuanVideo text must be [B, 1 + L, D] (pfp.backbones.hunyuan_video.pack_text: "
                         f"the pooled vector as token 0, then the states), got {tuple(text.shape)}")
    return text[:, 1:], (None if mask is None else mask[:, 1:].bool()), text[:, 0, :pooled_dim]


def _chunks(norm: nn.Module, temb: Tensor, n: int):
    """An adaLN's n modulation tensors ``[B, 1 or N, C]`` from temb ``[B, 1 or N, C]``."""
    return norm.linear(norm.silu(temb)).chunk(n, dim=-1)


def _qkv(attn, x: Tensor, heads: int, rope, added: bool = False):
    """Q, K, V ``[B, N, H, D]`` of x through ``attn``'s video projections (``added``: the text
    stream's add_*_proj), normalised per head, rotated when ``rope`` is given."""
    if added:
        q, k, v = attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
        nq, nk = attn.norm_added_q, attn.norm_added_k
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        nq, nk = attn.norm_q, attn.norm_k
    q, k, v = (z.unflatten(-1, (heads, -1)) for z in (q, k, v))
    q, k = nq(q), nk(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k, v


def _attend(q: Tensor, k: Tensor, v: Tensor, ctx_k: Optional[Tensor], ctx_v: Optional[Tensor],
            ctx_mask: Optional[Tensor], text_k: Tensor, text_v: Tensor, text_mask: Optional[Tensor]) -> Tensor:
    """q ``[B, Nq, H, D]`` over the keys ``[context ; target ; text]``: target k, v ``[B, Nt, H, D]``;
    context ``[Bc, Nc, H, D]`` (Bc 1 or B) with its mask ``[Bc, Nc]``; text ``[B, Nx, H, D]`` with
    its mask ``[B, Nx]``. One ``joint_attention`` call; the context is copied per sample only when
    the text has padding left (its keys then join the masked segment)."""
    if ctx_k is not None and ctx_k.dtype != q.dtype:
        ctx_k, ctx_v = ctx_k.to(q.dtype), ctx_v.to(q.dtype)
    if text_mask is None:
        return masked_joint_attention(q, torch.cat([k, text_k], 1), torch.cat([v, text_v], 1), ctx_k, ctx_v, ctx_mask)
    b = q.shape[0]
    if ctx_k is None:
        seg_k, seg_v, seg_m = text_k, text_v, text_mask
    else:
        m = (ctx_mask if ctx_mask is not None else
             torch.ones(ctx_k.shape[:2], dtype=torch.bool, device=ctx_k.device)).expand(b, -1)
        seg_k = torch.cat([ctx_k.expand(b, -1, -1, -1), text_k], 1)
        seg_v = torch.cat([ctx_v.expand(b, -1, -1, -1), text_v], 1)
        seg_m = torch.cat([m, text_mask], 1)
    return pfp_kernels.joint_attention(q, k, v, context_k=seg_k, context_v=seg_v, context_mask=seg_m)


class _ThreeStreamBlock(nn.Module):
    """What both HunyuanVideo block kinds share: the call signature of
    :class:`~pfp.backbones.wan_style.WanStyleBlock` (so the shared ``cache_context`` drives them),
    with the text stream and its modulation passed as ``text=(tokens, temb)``."""

    PARTS: tuple = ()
    memory_attn = None   # HunyuanVideo has no cross-attention to enhance
    sp = None

    def __init__(self, num_heads: int, **parts):
        super().__init__()
        self.num_heads = num_heads
        set_parts(self, self.PARTS, parts)

    @classmethod
    def adopt(cls, block: nn.Module, num_heads: int):
        """A block over a diffusers block's own modules (shared, same names and order)."""
        return cls(num_heads, **dict(block.named_children()))

    def _heads(self):
        return self.sp.heads(self.num_heads) if self.sp is not None else slice(None)

    def _own_heads(self, qkv_c, prev_kv):
        """Under sequence parallelism the context attends with this rank's heads only: its new Q/K/V
        and a cache made before (with every head) keep this rank's."""
        if self.sp is None:
            return qkv_c, prev_kv
        if qkv_c is not None:
            qkv_c = tuple(z[:, :, self._heads()] for z in qkv_c)
        return qkv_c, _rank_heads_of_cache(self.sp, self.num_heads, prev_kv)

    def _to_heads(self, qkv_t, qkv_x, sp_tokens: int):
        """Target Q/K/V: this rank's tokens, every head -> every token, this rank's heads; text
        Q/K/V (every rank holds all of it): this rank's heads. Unchanged without parallelism."""
        if self.sp is None:
            return qkv_t, qkv_x
        heads = self._heads()
        return (tuple(self.sp.seq_to_heads(z, sp_tokens) for z in qkv_t), tuple(z[:, :, heads] for z in qkv_x))

    def _from_heads(self, ot, ox, oc):
        """The attention outputs back: target to this rank's tokens with every head, text and context
        to every head."""
        sp = self.sp
        if sp is None:
            return ot, ox, oc
        return sp.heads_to_seq(ot), sp.gather_heads(ox), (None if oc is None else sp.gather_heads(oc))

    def _context_keys(self, qkv_c, prev_kv):
        """(this rank's context Q/K/V, the cache's K/V, K and V of every context token): the new
        tokens' after the cached ones."""
        qkv_c, prev_kv = self._own_heads(qkv_c, prev_kv)
        if qkv_c is None:
            return qkv_c, prev_kv, (prev_kv if prev_kv is not None else (None, None))
        _, kc, vc = qkv_c
        if prev_kv is None:
            return qkv_c, prev_kv, (kc, vc)
        return qkv_c, prev_kv, (torch.cat([prev_kv[0], kc], 1), torch.cat([prev_kv[1], vc], 1))

    def _attend_streams(self, qkv_c, qkv_t, qkv_x, k_all, v_all, ctx_mask, text_mask, joint: bool,
                        buffer=None):
        """The target's and text's attention over ``[context ; target ; text]`` (in joint mode the
        context's new queries join the same call), back from heads: (target, text, context or None).
        ``buffer``: a JointKVBuffer holding the context (and its mask); the target's and text's K/V
        go into its tail, the text's padding as the tail's key mask."""
        (qt, kt, vt), (qx, kx, vx) = qkv_t, qkv_x
        nt, oc = qt.shape[1], None
        if buffer is not None:
            keep = None
            if text_mask is not None:
                keep = torch.cat([text_mask.new_ones(qt.shape[0], nt), text_mask.expand(qt.shape[0], -1)], 1)
            o = buffer.attend(torch.cat([qt, qx], 1), torch.cat([kt, kx], 1), torch.cat([vt, vx], 1), key_mask=keep)
        elif joint and qkv_c is not None:   # the context's queries join: one call for all three
            nc = qkv_c[0].shape[1]
            o = _attend(torch.cat([qkv_c[0], qt, qx], 1), kt, vt, k_all, v_all, ctx_mask, kx, vx, text_mask)
            oc, o = o[:, :nc], o[:, nc:]
        else:
            o = _attend(torch.cat([qt, qx], 1), kt, vt, k_all, v_all, ctx_mask, kx, vx, text_mask)
        return self._from_heads(o[:, :nt], o[:, nt:], oc)

    def _context_out(self, oc, qc, k_all, v_all, prev_kv, frames, ctx_mask):
        """The context's attention output with every head: joint mode's ``oc``, or (cached mode, or
        no target) its own attention over the context frames up to its own."""
        if oc is not None:
            return oc
        offset = 0 if prev_kv is None else prev_kv[0].shape[1]
        oc = _causal_context_attention(qc, k_all, v_all, offset, frames, ctx_mask)
        return oc if self.sp is None else self.sp.gather_heads(oc)


class HunyuanDualBlock(_ThreeStreamBlock):
    """A dual-stream block (``HunyuanVideoTransformerBlock``'s modules) over context, target and text."""

    PARTS = ("norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context")

    def forward(self, hc: Optional[Tensor], ht: Optional[Tensor], temb_c, temb_t, text, text_mask,
                rope_c, rope_t, prev_kv, joint: bool, need_context_out: bool, frames,
                ctx_mask: Optional[Tensor] = None, sp_tokens: int = 0):
        """hc ``[Bc, Nc, C]`` new context tokens, ht ``[B, Nt, C]`` target tokens (either None);
        temb_c, temb_t: their conditioning ``[Bc or 1, 1, C]``, ``[B, 1 or Nt, C]``; text: (tokens
        ``[B, Nx, C]``, temb ``[B, 1, C]``) or None with ht; text_mask ``[B, Nx]`` or None;
        sp_tokens: under sequence parallelism (``self.sp``) ht is this rank's slice of that many
        target tokens, the text and context are whole, and context K/V hold this rank's heads; the
        rest as :meth:`pfp.backbones.wan_style.WanStyleBlock.forward`. Returns (hc', (ht', text') or
        None, (K, V) of every context token)."""
        attn, heads = self.attn, self.num_heads
        buffer, prev_kv = take_joint_buffer(prev_kv, hc, self.sp)
        qkv_c = None
        if hc is not None:
            c_sh, c_sc, c_g, c_sh2, c_sc2, c_g2 = _chunks(self.norm1, temb_c, 6)
            qkv_c = _qkv(attn, self.norm1.norm(hc) * (1 + c_sc) + c_sh, heads, rope_c)
        qkv_c, prev_kv, (k_all, v_all) = self._context_keys(qkv_c, prev_kv)
        oc = None
        streams = None
        if ht is not None:
            hx, temb_x = text
            sh, sc, g, sh2, sc2, g2 = _chunks(self.norm1, temb_t, 6)
            x_sh, x_sc, x_g, x_sh2, x_sc2, x_g2 = _chunks(self.norm1_context, temb_x, 6)
            qkv_t = _qkv(attn, self.norm1.norm(ht) * (1 + sc) + sh, heads, rope_t)
            qkv_x = _qkv(attn, self.norm1_context.norm(hx) * (1 + x_sc) + x_sh, heads, None, added=True)
            ot, ox, oc = self._attend_streams(qkv_c, *self._to_heads(qkv_t, qkv_x, sp_tokens), k_all, v_all,
                                              ctx_mask, text_mask, joint, buffer)
            ot, ox = ot.flatten(2), ox.flatten(2)
            ht = ht + attn.to_out[1](attn.to_out[0](ot)) * g
            hx = hx + attn.to_add_out(ox) * x_g
            ht = ht + g2 * self.ff(self.norm2(ht) * (1 + sc2) + sh2)
            hx = hx + x_g2 * self.ff_context(self.norm2_context(hx) * (1 + x_sc2) + x_sh2)
            streams = (ht, hx)
        if hc is not None and need_context_out:
            oc = self._context_out(oc, qkv_c[0], k_all, v_all, prev_kv, frames, ctx_mask)
            hc = hc + attn.to_out[1](attn.to_out[0](oc.flatten(2))) * c_g
            hc = hc + c_g2 * self.ff(self.norm2(hc) * (1 + c_sc2) + c_sh2)
        return hc, streams, (k_all, v_all)


class HunyuanSingleBlock(_ThreeStreamBlock):
    """A single-stream block (``HunyuanVideoSingleTransformerBlock``'s modules): one set of weights
    for context, target and text; attention and MLP in parallel."""

    PARTS = ("attn", "norm", "proj_mlp", "act_mlp", "proj_out")

    def _inputs(self, h: Tensor, temb: Tensor):
        sh, sc, g = _chunks(self.norm, temb, 3)
        return self.norm.norm(h) * (1 + sc) + sh, g

    def forward(self, hc: Optional[Tensor], ht: Optional[Tensor], temb_c, temb_t, text, text_mask,
                rope_c, rope_t, prev_kv, joint: bool, need_context_out: bool, frames,
                ctx_mask: Optional[Tensor] = None, sp_tokens: int = 0):
        """As :meth:`HunyuanDualBlock.forward`."""
        attn, heads = self.attn, self.num_heads
        buffer, prev_kv = take_joint_buffer(prev_kv, hc, self.sp)
        qkv_c = None
        if hc is not None:
            xc, c_g = self._inputs(hc, temb_c)
            qkv_c = _qkv(attn, xc, heads, rope_c)
        qkv_c, prev_kv, (k_all, v_all) = self._context_keys(qkv_c, prev_kv)
        oc = None
        streams = None
        if ht is not None:
            hx, temb_x = text
            nt = ht.shape[1]
            xt, g = self._inputs(ht, temb_t)
            xx, x_g = self._inputs(hx, temb_x)
            z = torch.cat([xt, xx], 1)            # one pass of the linears over target and text
            mlp = self.act_mlp(self.proj_mlp(z))
            q, k, v = _qkv(attn, z, heads, None)
            qkv_t = (apply_rope(q[:, :nt], *rope_t), apply_rope(k[:, :nt], *rope_t), v[:, :nt])
            qkv_x = (q[:, nt:], k[:, nt:], v[:, nt:])
            ot, ox, oc = self._attend_streams(qkv_c, *self._to_heads(qkv_t, qkv_x, sp_tokens), k_all, v_all,
                                              ctx_mask, text_mask, joint, buffer)
            out = self.proj_out(torch.cat([torch.cat([ot, ox], 1).flatten(2), mlp], -1))
            streams = (ht + g * out[:, :nt], hx + x_g * out[:, nt:])
        if hc is not None and need_context_out:
            oc = self._context_out(oc, qkv_c[0], k_all, v_all, prev_kv, frames, ctx_mask)
            mlp_c = self.act_mlp(self.proj_mlp(xc))
            hc = hc + c_g * self.proj_out(torch.cat([oc.flatten(2), mlp_c], -1))
        return hc, streams, (k_all, v_all)


class HunyuanVideoBackbone(WanStyleBackbone):
    """PFP backbone over a ``diffusers.HunyuanVideoTransformer3DModel`` (HunyuanVideo T2V, 13 B).

    Its blocks become :class:`HunyuanDualBlock` / :class:`HunyuanSingleBlock` modules over the same
    parameters (state-dict names unchanged), so hooks on them (offload, casting, FSDP) fire under
    this forward; run the transformer through this backbone, not its own forward.

    guidance: the embedded guidance scale of a guidance-distilled model (``guidance_embeds``;
    HunyuanVideoPipeline's default 6.0); ignored by a model without one. Such a model samples
    with the sampler's CFG off (scale 1).
    """

    # LoRA on the blocks' attention and MLP linears (not on the token refiner's, nor the head)
    lora_target_modules = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                           r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)")
    mask_text_padding = True   # as upstream: padded text positions are masked

    def buffer_tail_tokens(self, target_tokens: int, text_tokens: int) -> int:
        """The target's keys and the text's (its blocks attend over ``[context ; target ; text]``);
        ``text_tokens`` counts the packed text, whose token 0 (the pooled vector) is not attended."""
        return target_tokens + text_tokens - 1

    def __init__(self, transformer: nn.Module, context_mode: str = "cached", guidance: float = DEFAULT_GUIDANCE):
        super().__init__()
        cfg = transformer.config
        if getattr(cfg, "image_condition_type", None) is not None:
            raise ValueError(f"HunyuanVideoBackbone: image_condition_type={cfg.image_condition_type!r} (HunyuanVideo "
                             f"I2V) is not supported; use the T2V transformer (image_condition_type None)")
        if int(cfg.pooled_projection_dim) > int(cfg.text_embed_dim):
            raise ValueError(f"HunyuanVideoBackbone: pooled_projection_dim ({cfg.pooled_projection_dim}) must not "
                             f"exceed text_embed_dim ({cfg.text_embed_dim}): the pooled vector travels as a text token")
        heads = int(cfg.num_attention_heads)
        for i, blk in enumerate(transformer.transformer_blocks):
            transformer.transformer_blocks[i] = HunyuanDualBlock.adopt(blk, heads)
        for i, blk in enumerate(transformer.single_transformer_blocks):
            transformer.single_transformer_blocks[i] = HunyuanSingleBlock.adopt(blk, heads)
        self.transformer = transformer
        self.context_mode = check_context_mode(context_mode)
        self.num_heads = heads
        self.inner_dim = heads * int(cfg.attention_head_dim)
        self.latent_channels = int(cfg.out_channels or cfg.in_channels)
        if int(cfg.in_channels) != self.latent_channels:
            raise ValueError(f"HunyuanVideoBackbone: in_channels ({cfg.in_channels}) must equal out_channels "
                             f"({cfg.out_channels})")
        self.patch_size = (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))
        self.rope_theta = float(cfg.rope_theta)
        self.rope_axis_dims = tuple(int(d) for d in cfg.rope_axes_dim)
        self.pooled_dim = int(cfg.pooled_projection_dim)
        self.text_dim = int(cfg.text_embed_dim)
        self.guidance = float(guidance)

    # the modules the shared parts read
    @property
    def patch_embedding(self) -> nn.Module:
        return self.transformer.x_embedder.proj

    @property
    def proj_out(self) -> nn.Module:
        return self.transformer.proj_out

    @property
    def blocks(self) -> list:
        """Every block in the order they run: the dual-stream ones, then the single-stream ones."""
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def add_memory_attention(self, feature_dim: int) -> None:
        raise ValueError("HunyuanVideo has no text cross-attention for the cross-attention enhancement "
                         "(config cross_attention) to join; it is Wan-only")

    # ---- conditioning ---------------------------------------------------------------------------
    def _guidance(self, batch: int, device) -> Optional[Tensor]:
        if self.transformer.time_text_embed.guidance_embedder is None:
            return None
        # as HunyuanVideoPipeline: the scale in the model's dtype, times 1000
        return torch.full((batch,), self.guidance, dtype=self.compute_dtype, device=device) * 1000.0

    def conditioning(self, t: Tensor, pooled: Tensor) -> Tensor:
        """temb ``[*t.shape, C]`` of timesteps t in [0, 1] (any shape ``[B, ...]``) with pooled text
        ``[B or 1, P]`` and the embedded guidance: diffusers' ``time_text_embed`` per token."""
        tte = self.transformer.time_text_embed
        dtype = pooled.dtype
        shape = t.shape
        temb = tte.timestep_embedder(tte.time_proj(t.reshape(-1).float() * 1000.0).to(dtype))
        temb = temb.reshape(*shape, -1)
        extra = (1,) * (len(shape) - 1)
        guidance = self._guidance(1, t.device)
        if guidance is not None:
            temb = temb + tte.guidance_embedder(tte.time_proj(guidance).to(dtype)).reshape(1, *extra, -1)
        pooled_emb = tte.text_embedder(pooled)
        return temb + pooled_emb.reshape(pooled_emb.shape[0], *extra, -1)

    def _context_modulation(self, like: Tensor) -> Tensor:
        """temb ``[1, 1, C]`` of context tokens: timestep 0, the guidance, an empty pooled text."""
        pooled = torch.zeros(1, self.pooled_dim, dtype=self.compute_dtype, device=like.device)
        return self.conditioning(torch.zeros(1, 1, device=like.device), pooled)

    def _text_stream(self, text: Tensor, text_mask: Optional[Tensor], t_text: Tensor, batch: int):
        """(refined text tokens ``[B, Nx, C]``, their mask or None, pooled ``[B, P]``)."""
        dtype = self.compute_dtype
        states, mask, pooled = unpack_text(text.to(dtype), text_mask, self.pooled_dim)
        if states.shape[-1] != self.text_dim:
            raise ValueError(f"HunyuanVideo text states must be {self.text_dim} wide, got {states.shape[-1]}")
        states, pooled = states.expand(batch, -1, -1), pooled.expand(batch, -1)
        mask = mask.expand(batch, -1) if mask is not None else None
        hx = self.transformer.context_embedder(states, t_text * 1000.0, mask)
        hx, mask = _drop_padding(hx, mask)
        return hx, mask, pooled

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, timesteps: Tensor, text: Tensor, context=None, *,
                positions: Optional[Tensor] = None, t_start: float = 0.0,
                text_mask: Optional[Tensor] = None, condition: Optional[Tensor] = None,
                image: Optional[Tensor] = None) -> Tensor:
        """Velocity ``noise - x_0`` for noisy latents x ``[B, C, T, H, W]``; as
        :meth:`pfp.backbones.wan_style.WanStyleBackbone.forward`, with ``text`` ``[B or 1, 1 + L, D]``
        and ``text_mask`` ``[B or 1, 1 + L]`` laid out by :func:`pack_text`."""
        self._with_condition(x, condition)      # refuses a condition: HunyuanVideo T2V takes none
        self._embedded_image(image, x.shape[0])  # and no image tokens
        self._check_forward_args(x, text, text_mask)
        b, _, t, h, w = x.shape
        grid, rope_t, ts = self._target_inputs(x, timesteps, positions, t_start)   # ts: [B, 1 | Nt]
        nt = grid[0] * grid[1] * grid[2]
        dtype = self.compute_dtype

        t_text = ts.mean(dim=1)                                             # [B]
        hx, text_mask, pooled = self._text_stream(text, text_mask, t_text, b)
        temb_t = self.conditioning(ts, pooled)                              # [B, 1 | Nt, C]
        temb_x = self.conditioning(t_text[:, None], pooled)                 # [B, 1, C]
        ht = self.transformer.x_embedder(x.to(dtype))

        hc, rope_c, temb_c, cached, frames, ctx_mask, _ = self._resolve_context(context, b, x)
        joint = self.context_mode == "joint"
        sp = self.sequence_parallel
        if sp is not None:   # this rank's slice of the target tokens; the text and context stay whole
            ht = sp.local(ht, 1)
            rope_t = tuple(sp.local(z, -2) for z in rope_t)
            if temb_t.shape[1] == nt:
                temb_t = sp.local(temb_t, 1)
        blocks = self.blocks
        n = len(blocks)
        streams = (ht, hx)
        buffers = self._joint_buffers(cached, hc, b, nt + hx.shape[1], dtype)   # tails: target and text K/V
        for i, blk in enumerate(blocks):
            prev = buffers[i] if buffers is not None else cached.layer(i, dtype) if cached is not None else None
            hc, streams, _ = self._call_block(blk, hc, streams[0], temb_c, temb_t, (streams[1], temb_x), text_mask,
                                              rope_c, rope_t, prev, joint, i < n - 1, frames, ctx_mask,
                                              nt if sp is not None else 0)
        ht = streams[0]

        norm = self.transformer.norm_out
        scale, shift = norm.linear(norm.silu(temb_t).to(ht.dtype)).chunk(2, dim=-1)
        out = self.proj_out(norm.norm(ht) * (1 + scale) + shift)
        if sp is not None:
            out = sp.gather_seq(out, nt)
        pt, ph, pw = self.patch_size
        # diffusers' layout: each token's outputs are (channel, pt, ph, pw)
        out = out.reshape(b, *grid, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, -1, t, h, w)

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, context_mode: str = "cached", guidance: float = DEFAULT_GUIDANCE,
                    **config) -> "HunyuanVideoBackbone":
        """A randomly initialised HunyuanVideo transformer from config keys (e.g. a tiny one)."""
        from diffusers import HunyuanVideoTransformer3DModel
        return cls(HunyuanVideoTransformer3DModel(**config), context_mode=context_mode, guidance=guidance)

    @classmethod
    def from_pretrained(cls, path: str, context_mode: str = "cached", subfolder: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None,
                        guidance: float = DEFAULT_GUIDANCE) -> "HunyuanVideoBackbone":
        """Load a local diffusers checkpoint directory (never downloads)."""
        from diffusers import HunyuanVideoTransformer3DModel
        model = HunyuanVideoTransformer3DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype,
                                                               local_files_only=True)
        return cls(model, context_mode=context_mode, guidance=guidance)


def _drop_padding(hx: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Refined text tokens without the padding no sample uses: when every sample's real tokens come
    first, positions past the longest are dropped (no real token reads a padded one, so nothing
    changes), and the mask goes when none is left. Otherwise both stay."""
    if mask is None:
        return hx, None

    def keep(m: Tensor):
        lengths = m.sum(1)
        first = torch.arange(m.shape[1], device=m.device)[None, :] < lengths[:, None]
        return int(lengths.max()) if bool((first == m).all()) else None

    from torch._subclasses.fake_tensor import is_fake
    if is_fake(mask):   # traced without values (pfp.memory): the padded length is the worst case
        return hx, mask
    n = _host(keep, mask)
    if n is None:
        return hx, mask
    hx, mask = hx[:, :n], mask[:, :n]
    return hx, (None if bool(mask.all()) else mask)


HUNYUAN_VIDEO_CONFIG = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                            num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                            patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                            pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56))
"""diffusers config of HunyuanVideo's 13 B transformer (inner 3072 = 24 heads x 128)."""


__all__ = ["HunyuanVideoBackbone", "HunyuanDualBlock", "HunyuanSingleBlock", "HUNYUAN_VIDEO_CONFIG",
           "DEFAULT_GUIDANCE", "pack_text", "unpack_text"]
