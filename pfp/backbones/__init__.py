"""Backbones: what the compressor and the sampler need from a DiT.

:class:`Backbone` is the protocol. Built in: :class:`TinyDiT` (CPU-sized, Wan-style blocks) and
:class:`WanBackbone` (diffusers' ``WanTransformer3DModel``; needs ``diffusers``).
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from .rope import apply_rope, frame_positions, grid_positions, rope_angles, rope_cos_sin
from .tiny_dit import TinyDiT, TinyDiTConfig
from .wan_style import CONTEXT_MODES, ContextKV, WanStyleBackbone


@runtime_checkable
class Backbone(Protocol):
    """What PFP needs from a DiT.

    - ``patch_embed``: the patch embedding module ``[B, C, T, H, W] -> [B, inner, T/pt, H/ph, W/pw]``,
      shared with the compressor's low-res branch; ``inner_dim``: its output width;
      ``latent_channels`` and ``patch_size`` ``(pt, ph, pw)``.
    - ``context_mode``: "joint" or "cached" (see :mod:`pfp.backbones.wan_style`).
    - RoPE positions: context tokens are placed by ``Context.positions`` ``[N, 3]`` (t, h, w) in the
      token grid; target tokens by ``positions`` or the grid starting at ``t_start``.
    - ``forward(x, timesteps, text, context, positions=None, t_start=0, text_mask=None)`` -> velocity.
    - ``cache_context(context)`` -> per-layer K/V for the cached mode (None for an empty context).
    """

    inner_dim: int
    latent_channels: int
    patch_size: tuple
    context_mode: str

    @property
    def patch_embed(self) -> nn.Module: ...

    def forward(self, x: Tensor, timesteps: Tensor, text: Tensor, context=None, *,
                positions: Optional[Tensor] = None, t_start: float = 0.0,
                text_mask: Optional[Tensor] = None) -> Tensor: ...

    def cache_context(self, context) -> Optional[ContextKV]: ...


def __getattr__(name):
    if name in ("WanBackbone", "WAN22_5B_CONFIG"):
        from . import wan  # imports diffusers only when asked for
        return getattr(wan, name)
    raise AttributeError(name)


__all__ = ["Backbone", "TinyDiT", "TinyDiTConfig", "WanStyleBackbone", "ContextKV", "CONTEXT_MODES",
           "WanBackbone", "apply_rope", "rope_angles", "rope_cos_sin", "grid_positions", "frame_positions"]
