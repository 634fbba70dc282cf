"""TinyDiT: a small Wan-style DiT that trains on a CPU.

Same block as Wan 2.x (adaLN timestep modulation with a per-block scale/shift table, 3D RoPE,
self-attention through ``pfp_kernels.joint_attention``, text cross-attention, GELU MLP), same
module names, so the shared forward in :mod:`pfp.backbones.wan_style` runs it and the diffusers
Wan adapter alike. Default size: inner 192, 4 blocks, 4 heads (head dim 48), ~3 M parameters.

Conditioning. Besides Wan's text cross-attention, the mean text state is added to the timestep
embedding of the target tokens (``pooled_text``): with few training steps the global route learns
the caption's colours and layout much sooner than attention does.

Output parameterisation. ``prediction="x0"`` (default) makes the network predict the clean latent
and turns it into the velocity ``(x_t - x0) / max(t, min_t)``, so :meth:`forward` returns a velocity
either way. A patch of the built-in pixel-unshuffle VAE holds more values (2x2 latent pixels x 48
channels = 192) than the tiny inner width: predicting the velocity would have to carry the
per-pixel noise through that bottleneck, while the clean frame is smooth and low-dimensional
(the argument of Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025).
``prediction="velocity"`` is Wan's own parameterisation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .wan_style import WanStyleBackbone, WanStyleBlock, check_context_mode, sinusoidal_embedding


@dataclass
class TinyDiTConfig:
    latent_channels: int = 48
    inner_dim: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    freq_dim: int = 64
    patch_size: Sequence[int] = (1, 2, 2)
    rope_theta: float = 10000.0
    context_mode: str = "cached"
    prediction: str = "x0"       # what the network outputs; forward always returns the velocity
    pooled_text: bool = True     # also add the mean text state to the timestep embedding (adaLN)
    min_t: float = 0.05          # x0 -> velocity divides by max(t, min_t)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


class _FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever its parameters' dtype, as Wan's: the blocks feed their
    norms fp32 activations, and a model cast to bf16 keeps bf16 norm weights."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class _Attention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)  # across heads, as Wan's "rms_norm_across_heads"
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


def _block(dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6) -> WanStyleBlock:
    """A block with Wan's layout (diffusers ``WanTransformerBlock``, ``cross_attn_norm=True``). The
    parts are made and registered in the order the tiny DiT always had (initialisation and the
    optimizer's parameter order stay as they were)."""
    return WanStyleBlock(
        num_heads,
        norm1=nn.LayerNorm(dim, eps=eps, elementwise_affine=False),
        attn1=_Attention(dim, dim, eps),
        norm2=_FP32LayerNorm(dim, eps=eps, elementwise_affine=True),
        attn2=_Attention(dim, dim, eps),
        norm3=nn.LayerNorm(dim, eps=eps, elementwise_affine=False),
        ffn=nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)),
        scale_shift_table=nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5))


class TinyDiT(WanStyleBackbone):
    """Wan-style DiT sized for CPU training. See :class:`TinyDiTConfig` and :class:`WanStyleBackbone`."""

    def __init__(self, config: TinyDiTConfig | None = None, **overrides):
        super().__init__()
        cfg = config or TinyDiTConfig()
        if overrides:
            cfg = TinyDiTConfig(**{**cfg.to_dict(), **overrides})
        if cfg.inner_dim % cfg.num_heads:
            raise ValueError(f"inner_dim {cfg.inner_dim} must be divisible by num_heads {cfg.num_heads}")
        self.config = cfg
        self.text_width = cfg.text_dim
        self.context_mode = check_context_mode(cfg.context_mode)
        self.inner_dim, self.num_heads = cfg.inner_dim, cfg.num_heads
        self.latent_channels, self.patch_size = cfg.latent_channels, tuple(cfg.patch_size)
        self.rope_theta, self.freq_dim = cfg.rope_theta, cfg.freq_dim
        if cfg.prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {cfg.prediction!r}")
        self.prediction, self.min_t = cfg.prediction, float(cfg.min_t)
        dim = cfg.inner_dim

        self.patch_embedding = nn.Conv3d(cfg.latent_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.time_embedder = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        if cfg.pooled_text:
            self.text_pool = nn.Linear(cfg.text_dim, dim)
            nn.init.zeros_(self.text_pool.weight)
            nn.init.zeros_(self.text_pool.bias)
        self.blocks = nn.ModuleList([_block(dim, cfg.num_heads, int(dim * cfg.mlp_ratio)) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        n_patch = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.proj_out = nn.Linear(dim, cfg.latent_channels * n_patch)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)
        # Zero-initialised timestep modulation and output: training starts from a model that
        # predicts zero velocity and whose blocks see plain layer norms (adaLN-Zero style).
        nn.init.zeros_(self.time_proj.weight)
        nn.init.zeros_(self.time_proj.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def embed_time(self, t: Tensor, extra: Tensor | None = None):
        # the sinusoid is built in fp32; a model cast to bf16/fp16 takes it in its own dtype
        freq = sinusoidal_embedding(t * 1000.0, self.freq_dim).to(self.time_embedder[0].weight.dtype)
        temb = self.time_embedder(freq)
        if extra is not None:
            temb = temb + extra
        mod = self.time_proj(nn.functional.silu(temb)).unflatten(-1, (6, -1))
        return temb, mod

    def embed_text(self, text: Tensor) -> Tensor:
        return self.text_embedder(text)

    def pooled_text(self, text: Tensor, mask: Tensor | None):
        """``[B, inner]`` projection of the mean text state, added to the timestep embedding of the
        target tokens (not the context's), as PixArt/SD3-style DiTs do: a global route for the prompt
        next to cross-attention. None when disabled."""
        if not self.config.pooled_text:
            return None
        if mask is None:
            pooled = text.mean(dim=1)
        else:
            m = mask.to(text.dtype).unsqueeze(-1)
            pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)
        return self.text_pool(pooled)
