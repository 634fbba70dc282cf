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
Wan 2.1 I2V transformers (``image_dim``, ``added_kv_proj_dim``, 36 input channels for 16 output
ones) run too: the forward then takes ``condition=`` (the 20 channels after the latent's: the
first-frame mask and the image latent, as ``WanImageToVideoPipeline`` builds them) and ``image=``
(the image encoder's states), and the compressor's low-res branch patchifies through the latent
channels' weights only (:class:`~pfp.backbones.wan_style.LatentPatchEmbed`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .wan_style import WanStyleBackbone, WanStyleBlock, check_context_mode


class WanBackbone(WanStyleBackbone):
    """PFP backbone over a ``diffusers.WanTransformer3DModel`` (Wan 2.1 / 2.2 T2V, TI2V, Wan 2.1 I2V).

    It takes the transformer over: its blocks become :class:`WanStyleBlock` modules over the same
    parameters (state-dict names unchanged), so run it through this backbone, not its own forward."""

    lora_target_modules = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                           "ffn.net.0.proj", "ffn.net.2")

    def __init__(self, transformer: nn.Module, context_mode: str = "cached", mask_text_padding: bool = False):
        super().__init__()
        cfg = transformer.config
        image_dim, added_kv = getattr(cfg, "image_dim", None), getattr(cfg, "added_kv_proj_dim", None)
        if (image_dim is None) != (added_kv is None):
            raise ValueError(f"WanBackbone: an image cross-attention needs both image_dim and added_kv_proj_dim "
                             f"(Wan 2.1 I2V), got image_dim={image_dim}, added_kv_proj_dim={added_kv}")
        if getattr(cfg, "pos_embed_seq_len", None) is not None:
            raise ValueError("WanBackbone: pos_embed_seq_len (Wan FLF2V's two-image embedding) is not supported")
        self.image_dim = None if image_dim is None else int(image_dim)
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
        self.text_width = int(cfg.text_dim)
        self.num_heads = int(cfg.num_attention_heads)
        self.inner_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
        out_channels = int(cfg.out_channels or cfg.in_channels)
        self.latent_channels = out_channels
        # Wan 2.1 I2V reads [latent ; condition] and predicts the latent's velocity only
        self.condition_channels = int(cfg.in_channels) - out_channels
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.rope_theta = 10000.0
        if self.condition_channels < 0:
            raise ValueError(f"WanBackbone: in_channels ({cfg.in_channels}) must be at least out_channels "
                             f"({out_channels}): the velocity is of the latent, the rest of the input is condition")

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

    def embed_image(self, image: Tensor) -> Tensor:
        return self.transformer.condition_embedder.image_embedder(image)

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
