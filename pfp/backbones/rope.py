"""3D rotary position embedding computed from explicit (t, h, w) positions.

Each token carries a position in the backbone's latent-token grid. Compressed context tokens sit
at the centre of the region they cover, so their positions may be fractional (e.g. t = 0.5 for a
token that covers frames 0 and 1). The rotation angle is ``position * frequency`` for every axis,
so a fractional position is a true rotation by the in-between angle; averaging the cos/sin tables
of neighbouring integer positions would not be (its norm shrinks).

The head dimension is split the way Wan splits it: ``h`` and ``w`` get ``2 * (D // 6)`` channels
each and ``t`` the rest, so a Wan model's own target-grid RoPE is reproduced exactly for integer
positions. Channels are rotated in interleaved pairs (0, 1), (2, 3), ... as in Wan.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim given to the (t, h, w) axes."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"RoPE needs an even head_dim >= 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0, axis_dims=None) -> Tensor:
    """Rotation angles ``[..., N, head_dim // 2]`` (float64) for positions ``[..., N, 3]`` (t, h, w).
    axis_dims: channels per axis (t, h, w), summing to head_dim (HunyuanVideo: 16, 56, 56); default
    Wan's split (:func:`rope_axis_dims`)."""
    if positions.ndim not in (2, 3) or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [N, 3] or [B, N, 3] (t, h, w), got {tuple(positions.shape)}")
    pos = positions.to(torch.float64)
    parts = []
    dims = rope_axis_dims(head_dim) if axis_dims is None else tuple(int(d) for d in axis_dims)
    if sum(dims) != head_dim or len(dims) != 3 or any(d % 2 for d in dims):
        raise ValueError(f"RoPE axis_dims must be three even sizes summing to head_dim={head_dim}, got {dims}")
    for axis, dim in enumerate(dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        parts.append(pos[..., axis:axis + 1] * freqs)
    return torch.cat(parts, dim=-1)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0, axis_dims=None) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[N, head_dim // 2]`` float32, for :func:`apply_rope`."""
    ang = rope_angles(positions, head_dim, theta, axis_dims)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, N, H, D]`` by per-token angles (``cos``/``sin`` ``[N, D/2]`` or
    ``[B, N, D/2]`` for per-sample positions), in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c = cos.unsqueeze(-2) if cos.ndim == 3 else cos[None, :, None, :]
    s = sin.unsqueeze(-2) if sin.ndim == 3 else sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def grid_positions(t: int, h: int, w: int, t_start: float = 0.0, device=None) -> Tensor:
    """Positions ``[t*h*w, 3]`` of a target token grid, row-major (t, h, w), time offset t_start."""
    tt = torch.arange(t, dtype=torch.float32, device=device) + t_start
    hh = torch.arange(h, dtype=torch.float32, device=device)
    ww = torch.arange(w, dtype=torch.float32, device=device)
    g = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij"), dim=-1)
    return g.reshape(-1, 3)


def frame_positions(frame_times: Tensor, h: int, w: int) -> Tensor:
    """Positions ``[len(frame_times)*h*w, 3]`` for target frames at arbitrary token-grid times.

    Used by frame retrieval, where the retrieved frames keep their original times in the history.
    """
    ft = frame_times.to(torch.float32)
    hh = torch.arange(h, dtype=torch.float32, device=ft.device)
    ww = torch.arange(w, dtype=torch.float32, device=ft.device)
    g = torch.stack(torch.meshgrid(ft, hh, ww, indexing="ij"), dim=-1)
    return g.reshape(-1, 3)
