"""Compression rates, the high-res stage plan they imply, and what to feed each branch.

A rate ``"h x w x t"`` (e.g. ``"4x4x2"``) is the compression on top of the backbone's own token
grid, i.e. after its patchify (patch ``(pt, ph, pw)``, ``(1, 2, 2)`` for Wan and HunyuanVideo):

- the high-res (HR) latent ``[B, C, T, H, W]`` is downsampled by ``(rt, ph*rh, pw*rw)`` by the
  strided causal conv stages, giving a token grid ``ceil(T/rt) x floor(H/(ph*rh)) x floor(W/(pw*rw))``;
- the low-res (LR) branch is fed the same video at ``1/rh`` height, ``1/rw`` width and ``1/rt``
  frame rate; its VAE latent, patchified by the backbone's patch embedding, lands on the same grid.

Spatially the grid floors: only the top-left ``floor(H/(ph*rh))*(ph*rh)`` rows and
``floor(W/(pw*rw))*(pw*rw)`` columns of the HR latent are read (a view, no copy), and the LR
latent is cut to the matching ``floor(H/(ph*rh))*ph`` rows and ``floor(W/(pw*rw))*pw`` columns.
The paper's check: 832x480, 20 s at 24 fps, VAE 8x8 spatial / 4x temporal -> HR latent
120x60x104 -> rate 4x4x2 with patch (1,2,2) -> 60 x 7 x 13 = 5460 tokens (60/8 = 7.5 floors to 7).
Temporally nothing floors: the causal convs give ``ceil(T/rt)`` tokens (pfp_kernels.conv's time
convention).

Stage plan (how a rate maps onto the ``len(hidden)`` conv stages). The HR latent needs
``log2(rt)`` temporal halvings and ``max(log2(ph*rh), log2(pw*rw))`` spatial halvings (a
spatial halving halves each of H and W that still needs it). Halvings are ordered time first,
then space, as in the paper. With K halvings and S stages:

- K == S: one halving per stage. The default ``hidden=(64, 128, 256, 512)`` at 4x4x2 with patch
  (1,2,2) gives strides (2,1,1), (1,2,2), (1,2,2), (1,2,2) - the shapes benchmarked in issue 2.
- K < S: the first K stages halve, the remaining stages keep stride 1 (e.g. 2x2x1 ->
  (1,2,2), (1,2,2), (1,1,1), (1,1,1)).
- K > S: halvings are dealt out as evenly as possible, earlier stages taking the extra ones, so a
  stage may stride 4 or more on an axis (e.g. 2x2x8 -> (4,1,1), (2,1,1), (1,2,2), (1,2,2)).

Kernel per axis: 3 where the stride is 1 or 2 (the paper's kernel), ``stride + 1`` for larger
strides, so that every input frame/pixel is read and neighbouring outputs overlap by one, as
with kernel 3 / stride 2. Spatial padding is ``kernel // 2`` (symmetric), which makes every
stage divide H and W exactly; time is causal (output j of stride s reads frames s*j-(k-1)..s*j).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

RATE_PRESETS = ("4x4x2", "2x2x2", "2x2x4", "2x2x1", "2x2x8")


def _is_pow2(v: int) -> bool:
    return isinstance(v, int) and v >= 1 and (v & (v - 1)) == 0


@dataclass(frozen=True)
class Rate:
    """Compression ``h x w x t`` on top of the backbone's token grid; powers of two, >= 1."""

    h: int
    w: int
    t: int

    def __post_init__(self):
        for name in ("h", "w", "t"):
            v = getattr(self, name)
            if not _is_pow2(v):
                raise ValueError(f"rate {name} must be a power of two >= 1, got {v!r}")

    def __str__(self) -> str:
        return f"{self.h}x{self.w}x{self.t}"

    @property
    def tokens_ratio(self) -> int:
        """How many backbone tokens one context token stands for."""
        return self.h * self.w * self.t


RateLike = Union[str, Rate, Sequence[int]]


def parse_rate(rate: RateLike) -> Rate:
    """``"4x4x2"`` / ``(4, 4, 2)`` / :class:`Rate` -> :class:`Rate` (h, w, t)."""
    if isinstance(rate, Rate):
        return rate
    if isinstance(rate, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*", rate)
        if not m:
            raise ValueError(f"rate must look like 'HxWxT' with powers of two (e.g. one of {RATE_PRESETS}), "
                             f"got {rate!r}")
        return Rate(*(int(g) for g in m.groups()))
    try:
        values = [int(v) for v in rate]
    except TypeError:
        values = []
    if len(values) != 3:
        raise ValueError(f"rate must be 'HxWxT', a Rate or 3 ints (h, w, t), got {rate!r}")
    return Rate(*values)


def _log2(v: int) -> int:
    return int(math.log2(v))


@dataclass(frozen=True)
class StageSpec:
    """One causal conv + SiLU stage of the high-res branch."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding_hw: tuple[int, int]


def _kernel_for(stride: int) -> int:
    return 3 if stride <= 2 else stride + 1


def stage_plan(rate: RateLike, patch: Sequence[int], latent_channels: int,
               hidden: Sequence[int]) -> list[StageSpec]:
    """The HR stages for ``rate`` (see the module docstring for the mapping and kernels)."""
    rate = parse_rate(rate)
    pt, ph, pw = patch
    if len(hidden) == 0 or any(int(c) < 1 for c in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive widths, got {tuple(hidden)!r}")
    nt = _log2(pt * rate.t)
    nh, nw = _log2(ph * rate.h), _log2(pw * rate.w)
    steps = [(2, 1, 1)] * nt
    for i in range(max(nh, nw)):
        steps.append((1, 2 if i < nh else 1, 2 if i < nw else 1))
    n_stages = len(hidden)
    base, extra = divmod(len(steps), n_stages)
    specs, cursor, cin = [], 0, int(latent_channels)
    for s, cout in enumerate(hidden):
        take = base + (1 if s < extra else 0)
        stride = [1, 1, 1]
        for step in steps[cursor: cursor + take]:
            stride = [a * b for a, b in zip(stride, step)]
        cursor += take
        kernel = tuple(_kernel_for(v) for v in stride)
        specs.append(StageSpec(cin, int(cout), kernel, tuple(stride), (kernel[1] // 2, kernel[2] // 2)))
        cin = int(cout)
    return specs


def token_grid(hr_latent_thw: Sequence[int], rate: RateLike, patch: Sequence[int]) -> tuple[int, int, int]:
    """Context token grid ``(t, h, w)`` for an HR latent of ``(T, H, W)`` frames/rows/columns."""
    rate = parse_rate(rate)
    t, h, w = (int(v) for v in hr_latent_thw)
    pt, ph, pw = patch
    return -(-t // (pt * rate.t)), h // (ph * rate.h), w // (pw * rate.w)


def token_positions(rate: RateLike, grid: Sequence[int], t_start: int = 0,
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """``[t*h*w, 3]`` float32 (t, h, w) positions of context tokens, ordered (t, h, w).

    Coordinates are the backbone's latent-token grid (after its patchify), and each position is
    the centre of the region the token covers:

    - space: token (a, b) covers backbone tokens rows ``rh*a .. rh*a+rh-1``, columns likewise, so
      ``h = rh*a + (rh-1)/2``, ``w = rw*b + (rw-1)/2``;
    - time: causal. Token j first appears when backbone frame ``rt*j`` arrives and holds the frames
      ``rt*j-rt+1 .. rt*j`` that no earlier token covered (with a causal VAE and the LR video
      sampled at frames 0, rt, 2rt, ..., the LR latent j ends on that same frame), so
      ``t = rt*j - (rt-1)/2`` (token 0 sits at -(rt-1)/2: its cell reaches before the stream start).
      A model config with ``lr_phase = "end"`` feeds the LR branch frame ``rt*j + rt - 1`` instead;
      the positions stay these, and the model learns the offset.

    ``t_start`` is the index j of the first token (streams pass how many they already emitted).
    """
    rate = parse_rate(rate)
    nt, nh, nw = (int(v) for v in grid)
    j = torch.arange(t_start, t_start + nt, dtype=torch.float32, device=device)
    a = torch.arange(nh, dtype=torch.float32, device=device)
    b = torch.arange(nw, dtype=torch.float32, device=device)
    tt = rate.t * j - (rate.t - 1) / 2
    hh = rate.h * a + (rate.h - 1) / 2
    ww = rate.w * b + (rate.w - 1) / 2
    grid_t, grid_h, grid_w = torch.meshgrid(tt, hh, ww, indexing="ij")
    return torch.stack([grid_t, grid_h, grid_w], dim=-1).reshape(-1, 3)


@dataclass(frozen=True)
class InputPlan:
    """What to feed each branch of a compressor for one video (see :func:`plan_inputs`).

    Shapes are ``(C, T, H, W)`` latents; videos are ``(width, height)`` at ``fps`` with ``frames``.
    """

    rate: Rate
    patch: tuple[int, int, int]
    hr_video_size: tuple[int, int]
    hr_fps: float
    hr_frames: int
    hr_latent_shape: tuple[int, int, int, int]
    hr_rows_cols_used: tuple[int, int]
    lr_video_size: tuple[int, int]
    lr_fps: float
    lr_frames: int
    lr_latent_shape: tuple[int, int, int, int]
    token_grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    def __str__(self) -> str:
        (w, h), (lw, lh) = self.hr_video_size, self.lr_video_size
        t, gh, gw = self.token_grid
        return (f"rate {self.rate}, patch {'x'.join(map(str, self.patch))}:\n"
                f"  high-res: {w}x{h} video, {self.hr_frames} frames at {self.hr_fps:g} fps -> latent "
                f"{list(self.hr_latent_shape)} (C,T,H,W); rows x cols used {self.hr_rows_cols_used}\n"
                f"  low-res:  {lw}x{lh} video, {self.lr_frames} frames at {self.lr_fps:g} fps (frames 0, "
                f"{self.rate.t}, {2 * self.rate.t}, ... of the video) -> latent {list(self.lr_latent_shape)}\n"
                f"  context:  {t} x {gh} x {gw} = {self.num_tokens} tokens (t x h x w)")


def plan_inputs(video_size: Sequence[int], fps: float, seconds: float, rate: RateLike = "4x4x2",
                vae_spatial: int = 8, vae_temporal: int = 4, latent_channels: int = 16,
                patch: Sequence[int] = (1, 2, 2)) -> InputPlan:
    """Say what to feed each branch for a ``video_size = (width, height)`` video.

    The video has ``round(seconds * fps)`` frames F. A VAE with factors ``vae_spatial`` x
    ``vae_spatial`` x ``vae_temporal`` gives ``ceil(F / vae_temporal)`` latent frames (equal to
    the causal ``1 + (F-1)//vae_temporal`` of Wan/Hunyuan). The LR branch gets frames
    0, rt, 2rt, ... of the video (``ceil(F/rt)`` frames at ``fps/rt``), resized to
    ``(width/rw, height/rh)``; its latent frames match the HR token frames one to one. When that
    size is not a whole number of latents, the LR video shows only the top-left region the token
    grid covers (``hr_rows_cols_used``), at 1/rate size.

    Raises ValueError when the video cannot be encoded as planned (sizes not multiples of the
    VAE factor, or a grid of 0 tokens).
    """
    rate = parse_rate(rate)
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or not all(_is_pow2(p) for p in patch):
        raise ValueError(f"patch must be 3 powers of two (pt, ph, pw), got {patch!r}")
    if patch[0] != 1:
        raise ValueError(f"only a temporal patch of 1 is supported (Wan, HunyuanVideo), got patch {patch}")
    width, height = (int(v) for v in video_size)
    if width % vae_spatial or height % vae_spatial:
        raise ValueError(f"video_size {width}x{height} must be a multiple of the VAE's spatial factor "
                         f"{vae_spatial}; crop it to {width // vae_spatial * vae_spatial}x"
                         f"{height // vae_spatial * vae_spatial}")
    frames = int(round(seconds * fps))
    if frames < 1:
        raise ValueError(f"seconds * fps must give at least one frame, got {seconds} s at {fps} fps")
    hr_latent = (int(latent_channels), -(-frames // vae_temporal), height // vae_spatial, width // vae_spatial)
    grid = token_grid(hr_latent[1:], rate, patch)
    if grid[1] < 1 or grid[2] < 1:
        raise ValueError(f"a {width}x{height} video is too small for rate {rate} with patch {patch}: the HR "
                         f"latent {hr_latent[2]}x{hr_latent[3]} needs at least {patch[1] * rate.h}x"
                         f"{patch[2] * rate.w} rows x cols")
    used = (grid[1] * patch[1] * rate.h, grid[2] * patch[2] * rate.w)   # latent rows x cols the grid covers
    if width % (rate.w * vae_spatial) == 0 and height % (rate.h * vae_spatial) == 0:
        lr_size = (width // rate.w, height // rate.h)          # the whole frame at 1/rate
    else:  # not a whole number of latents at 1/rate: the region the grid covers, at 1/rate
        lr_size = (used[1] * vae_spatial // rate.w, used[0] * vae_spatial // rate.h)
    lr_frames = -(-frames // rate.t)
    lr_latent = (int(latent_channels), -(-lr_frames // vae_temporal), lr_size[1] // vae_spatial,
                 lr_size[0] // vae_spatial)
    assert lr_latent[1] == grid[0], (lr_latent, grid)  # ceil(ceil(F/rt)/vt) == ceil(ceil(F/vt)/rt)
    return InputPlan(rate, patch, (width, height), float(fps), frames, hr_latent, used, lr_size,
                     float(fps) / rate.t, lr_frames, lr_latent, grid)


__all__ = ["Rate", "RATE_PRESETS", "parse_rate", "StageSpec", "stage_plan", "token_grid",
           "token_positions", "InputPlan", "plan_inputs"]
