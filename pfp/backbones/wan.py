"""Wan 2.x backbones through diffusers' ``WanTransformer3DModel`` (needs ``pip install diffusers``).

:class:`WanBackbone` wraps a model you built or loaded yourself (nothing is downloaded):

    from diffusers import WanTransformer3DModel
    wan = WanTransformer3DModel.from_pretrained("/path/to/Wan2.2-TI2V-5B-Diffusers", subfolder="transformer",
                                                local_files_only=True)
    backbone = WanBackbone(wan, context_mode="cached")

It runs the shared Wan-style forward of :mod:`pfp.backbones.wan_style` on the model's own modules
(patch embedding, condition embedder, blocks, output head), so with no context it computes what
the diffusers forward computes (the tests check this), while adding the compressed context in
"joint" or "cached" mode, per-token timesteps and RoPE from explicit positions.
Wan's I2V image cross-attention (``added_kv_proj_dim``) is not supported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .wan_style import WanStyleBackbone, WanStyleBlock, check_context_mode


class WanBackbone(WanStyleBackbone):
    """PFP backbone over a ``diffusers.WanTransformer3DModel`` (Wan 2.1 / 2.2 T2V, TI2V).

    It takes the transformer over: its blocks become :class:`WanStyleBlock` modules over the same
    parameters (state-dict names unchanged), so run it through this backbone, not its own forward."""

    lora_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                           "ffn.net.0.proj", "ffn.net.2")

    def __init__(self, transformer: nn.Module, context_mode: str = "cached", mask_text_padding: bool = False):
        super().__init__()
        cfg = transformer.config
        if getattr(cfg, "added_kv_proj_dim", None) is not None or getattr(cfg, "image_dim", None) is not None:
            raise ValueError("WanBackbone: image cross-attention (I2V, added_kv_proj_dim/image_dim) is not supported")
        # Each block becomes a WanStyleBlock over the block's own modules (same names, same
        # parameters), so the blocks' forward is what runs and hooks on them fire. The transformer
        # is then driven through this backbone only: its own forward would call the new blocks
        # with diffusers' arguments.
        for i, blk in enumerate(transformer.blocks):
            transformer.blocks[i] = WanStyleBlock.adopt(blk, int(cfg.num_attention_heads))
        self.transformer = transformer
        # Wan's pipelines zero-pad the text states to 512 positions and pass no mask, so the model
        # was trained attending to the pads; True skips them instead (a departure from upstream)
        self.mask_text_padding = bool(mask_text_padding)
        self.context_mode = check_context_mode(context_mode)
        self.num_heads = int(cfg.num_attention_heads)
        self.inner_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.latent_channels = int(cfg.in_channels)
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.rope_theta = 10000.0
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ValueError("WanBackbone: out_channels must equal in_channels (velocity of the same latent)")

    # the modules the shared forward reads, under Wan's names
    @property
    def patch_embedding(self) -> nn.Module:
        return self.transformer.patch_embedding

    @property
    def blocks(self):
        return self.transformer.blocks

    @property
    def norm_out(self):
        return self.transformer.norm_out

    @property
    def proj_out(self):
        return self.transformer.proj_out

    @property
    def scale_shift_table(self):
        return self.transformer.scale_shift_table

    def embed_time(self, t: Tensor):
        ce = self.transformer.condition_embedder
        shape = t.shape
        proj = ce.timesteps_proj(t.reshape(-1).float() * 1000.0)
        # as diffusers: the time embedder may be kept in fp32 (its _keep_in_fp32_modules) while
        # the rest is bf16, so its input takes its dtype and its output the model's
        temb = ce.time_embedder(proj.to(next(ce.time_embedder.parameters()).dtype)).to(self.compute_dtype)
        mod = ce.time_proj(ce.act_fn(temb))
        return temb.reshape(*shape, -1), mod.reshape(*shape, 6, -1)

    def embed_text(self, text: Tensor) -> Tensor:
        return self.transformer.condition_embedder.text_embedder(text)

    @classmethod
    def from_config(cls, context_mode: str = "cached", mask_text_padding: bool = False, **config) -> "WanBackbone":
        """Build a randomly initialised Wan transformer from config keys (e.g. a tiny one for tests)."""
        from diffusers import WanTransformer3DModel
        return cls(WanTransformer3DModel(**config), context_mode=context_mode, mask_text_padding=mask_text_padding)

    @classmethod
    def from_pretrained(cls, path: str, context_mode: str = "cached", subfolder: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None, mask_text_padding: bool = False) -> "WanBackbone":
        """Load a local diffusers checkpoint directory (never downloads)."""
        from diffusers import WanTransformer3DModel
        model = WanTransformer3DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype,
                                                      local_files_only=True)
        return cls(model, context_mode=context_mode, mask_text_padding=mask_text_padding)


WAN22_5B_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                       out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
"""diffusers config of Wan 2.2 TI2V 5B's transformer (inner 3072 = 24 heads x 128)."""


__all__ = ["WanBackbone", "WAN22_5B_CONFIG"]
