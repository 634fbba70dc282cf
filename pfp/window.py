"""The sliding window of PFP §3.4: the newest latent frames of the history, uncompressed.

Beside the compressed context, the backbone can see the last ``N`` latent frames of the history
at full resolution, patchified by its own patch embedding (the same tokens a target frame would
have, but clean). They join the context as one more :class:`pfp.Context`:

- positions: their own token-grid places, at the times of those frames;
- order (:attr:`pfp.Context.order`): after every compressed token of the history, one step per
  token frame, so in ``context_mode="cached"`` a window token sees the whole compressed history
  and the window frames before it, and no compressed token ever sees the window. The compressed
  K/V can therefore grow chunk by chunk while the window is rebuilt over them each chunk
  (``backbone.cache_context(window, cache)`` returns a new cache and leaves ``cache`` as it was);
- ``context_mode="joint"``: the window is simply more context tokens.

Config: ``"sliding_window": N`` (latent frames; 0 = off). Used by ``pfp.train finetune`` and by
:func:`pfp.generate.generate`; frame-retrieval pretraining trains the compressor alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backbones.rope import grid_positions
from .compressor import Context

__all__ = ["window_context", "with_window"]


def window_context(backbone, history: Tensor, frames: int, *, history_frames: Optional[int] = None
                   ) -> Optional[Context]:
    """The newest ``frames`` latent frames of a history as context tokens.

    Args:
        backbone: a Wan-style backbone (its ``patch_embed``, ``patch_size``).
        history: ``[B, C, T, H, W]`` clean latents: the whole history, or only its newest frames.
        frames: the window's length in latent frames; it takes the newest ``min(frames, T)``,
            rounded down to whole patches in time.
        history_frames: how many latent frames the whole history has (default ``T``): the window's
            frames end there, which places them in time.

    Returns:
        :class:`pfp.Context` ``[B, n*h*w, inner]`` (in the patch embedding's dtype) with positions
        and order keys, or None when the window is empty.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        raise ValueError(f"frames must be an int >= 0 (latent frames), got {frames!r}")
    if history.dim() != 5:
        raise ValueError(f"history must be [B, C, T, H, W] latents, got shape {tuple(history.shape)}")
    total = history.shape[2] if history_frames is None else int(history_frames)
    if total < history.shape[2]:
        raise ValueError(f"history_frames={total} is less than the {history.shape[2]} frames given")
    pt, ph, pw = backbone.patch_size
    n = min(frames, history.shape[2]) // pt * pt
    if n == 0:
        return None
    embed = backbone.patch_embed
    recent = history[:, :, history.shape[2] - n:]
    dtype = next(embed.parameters()).dtype   # a Conv3d, or Wan I2V's LatentPatchEmbed around one
    tokens = embed(recent.to(dtype)).flatten(2).transpose(1, 2)                    # [B, n/pt*h*w, inner]
    positions, order = window_layout(n, total, backbone.patch_size, history.shape[3], history.shape[4],
                                     device=tokens.device)
    return Context(tokens, positions, None, order)


def window_layout(n: int, total: int, patch_size, h: int, w: int, device=None) -> tuple[Tensor, Tensor]:
    """``(positions [N, 3], order [N])`` of the window tokens of a history's newest ``n`` latent
    frames (whole patches) out of ``total``, on an ``h x w`` latent grid: :func:`window_context`'s
    layout, for a caller that needs it apart from the tokens (the training planner makes it real
    while the tokens are fake)."""
    pt, ph, pw = patch_size
    gt, gh, gw = n // pt, h // ph, w // pw
    positions = grid_positions(gt, gh, gw, t_start=(total - n) / pt, device=device)
    # after every compressed token: those are available by the history's last frame, total/pt - 1
    order = (total / pt + torch.arange(gt, dtype=torch.float32, device=device)).repeat_interleave(gh * gw)
    return positions, order


def with_window(context: Optional[Context], window: Optional[Context]) -> Optional[Context]:
    """A compressed context joined with a window (either may be None or empty), in the
    compressed context's dtype."""
    from .compressor import mix_contexts
    if window is None or window.num_tokens == 0:
        return context
    if context is None or context.num_tokens == 0:
        return window
    window = Context(window.tokens.to(context.tokens.dtype), window.positions, window.mask, window.order)
    return mix_contexts(context, window)
