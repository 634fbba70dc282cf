"""The dual-branch memory compressor (PFP section 3.2, Figure 3), streaming.

Data flow for a history of T high-res latent frames at rate ``h x w x t`` (see pfp/rates.py for
the rate arithmetic, the stage plan and the what-to-feed helper :func:`pfp.plan_inputs`)::

    hr_latent [B, C, T, H, W] --crop top-left to the token grid (view)--> causal conv+SiLU stages
        (time first, then space; widths ``hidden``) --> [B, hidden[-1], t, h, w]
        --> project_tokens into ``inner_dim`` ----------------------------+ (epilogue add)
    lr_latent [B, C, t, H', W'] --crop--> patch_embed (the backbone's own) --> tokens [B, t*h*w, inner]

The high-res features go straight from the last stage (``hidden[-1]`` wide) into the backbone's
width: they never pass through the VAE's channel bottleneck. Token j of the context adds the
HR stack's output frame j (which reads HR frames up to ``rt*j``, causally) and the LR latent
frame j (the video at 1/rt fps, whose latent frame j ends on the same video frame when the VAE
is causal; a model config with ``lr_phase = "end"`` feeds instead the last frame of each 1/rt
interval, so that the newest history frame is in the context: see ``PFPConfig.video_spec``).
Tokens are ordered (t, h, w); their positions are documented in :func:`pfp.rates.token_positions`.

Initialisation:

- The conv + SiLU stages keep the signal's scale: each conv's weights are drawn with std
  ``SILU_GAIN / sqrt(fan_in)`` (He initialisation with SiLU's gain) and zero bias. A conv over the
  SiLU of unit-Gaussian pre-activations then gives unit-variance pre-activations again, so the
  scale holds from stage to stage (a unit-variance latent's features stay at rms 0.8-1.0 through
  the Table 1 recipe's three stages, the lower end at the zero-padded borders). With
  ``nn.Conv3d``'s default (variance 1/(3 fan_in)) each conv + SiLU stage shrank the signal's rms
  about 3.5x, and the 3-stage branch of the Table 1 recipe started at 1/60 of the patch embedding's
  token scale. Trained 1000 steps from there, its HR-only variant still sat at 1/8 of it
  (``docs/table1.md``).
- The HR projection (weight and bias) starts at zero, so a fresh compressor outputs the LR branch
  alone, i.e. exactly what the backbone's patch embedding makes of the low-res video, and training
  starts from the backbone's own representation. The zero projection still gets a gradient
  (``dL/dW = g^T h`` with h the nonzero stage features); the conv stages receive gradient once the
  first update has moved the projection off zero. Pass ``zero_init=False`` for the usual
  ``nn.Linear``-style initialisation instead (``without_lr``, which has no LR tokens to start
  from, always takes it).

Every conv and the projection run through :mod:`pfp_kernels` (``impl="auto"`` by default:
C++ on CPU, Triton on CUDA when present, else the plain-PyTorch reference).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._io import describe_mismatch, save_safetensors_atomic, state_mismatch
from pfp_kernels.conv import CausalConvState, project_tokens
from pfp_kernels.nn import CausalConv3dAct, TokenProjection

from .rates import Rate, RateLike, StageSpec, parse_rate, stage_plan, token_grid, token_positions

CL3 = torch.channels_last_3d
CHECKPOINT_FORMAT = "pfp.MemoryCompressor/1"
# The compressors the paper compares (Table 1): the proposed dual branch, each branch alone, and a
# FramePack-style large patchify of the high-res latent. All give the same token grid.
COMPRESSOR_KINDS = ("pfp", "only_lr", "without_lr", "large_patchify")
# 1 / sqrt(E[silu(z)^2]) for z ~ N(0, 1) (by quadrature, to 1e-6): with weights of std
# SILU_GAIN / sqrt(fan_in), a conv over silu(z) gives pre-activations of unit variance again.
SILU_GAIN = 1.676532


# ----------------------------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------------------------
def order_keys(context, n: Optional[int] = None) -> Tensor:
    """``[n]`` float32 arrival-order keys of anything with ``positions`` ``[n, 3]`` and an optional
    ``order`` ``[n]`` (a :class:`Context`, a cache of one): ``order``, else the times
    ``positions[:, 0]``. ``n`` (default: the positions' count) is checked against ``order``. Read
    from a real tensor even while a FakeTensorMode traces the rest (pfp.memory traces full-size
    models that way; orders are host-side structure)."""
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
    order = getattr(context, "order", None)
    n = context.positions.shape[0] if n is None else n
    if order is not None and tuple(order.shape) != (n,):
        raise ValueError(f"Context.order must be [{n}], got {tuple(order.shape)}")
    src = context.positions if order is None else order
    pick = (lambda t: t[:, 0].float()) if order is None else (lambda t: t.float())
    if is_fake(src):
        return pick(src)
    with unset_fake_temporarily():
        return pick(src)


@dataclass
class Context:
    """Compressed history handed to the backbone.

    tokens: ``[B, N, C]`` in the backbone's inner width C.
    positions: ``[N, 3]`` float32 ``(t, h, w)`` in the backbone's latent-token coordinates (the
        centre of the region each token covers; shared by the whole batch).
    mask: ``[B, N]`` bool, True where a token is real, or None when every token is real. Set when
        the samples of a batch have histories of different lengths (padded tokens are False).
    order: ``[N]`` float32, non-decreasing: when each token becomes available, in backbone token
        frames (a compressor's token is available once the last frame it reads has arrived). In
        ``context_mode="cached"`` a context token attends to the context tokens whose order is at
        most its own, so tokens that arrive later never change earlier ones and a cache can grow
        chunk by chunk. None: ``positions[:, 0]`` (one compressor's tokens, ordered by time).
    features: ``[B, Nf, F]``, the compressor's penultimate features (its last conv stage, before the
        projection into the backbone's width), one per HR token, for the backbone's cross-attention
        over them (PFP 3.4, config ``cross_attention``); None when not kept. They are a set, not
        tied to ``tokens``' order: a window's tokens have none.
    feature_mask: ``[B, Nf]`` bool (False: padding), or None when every feature is real.
    """

    tokens: Tensor
    positions: Tensor
    mask: Optional[Tensor] = None
    order: Optional[Tensor] = None
    features: Optional[Tensor] = None
    feature_mask: Optional[Tensor] = None

    def __post_init__(self):
        if self.tokens.dim() != 3:
            raise ValueError(f"Context.tokens must be [B, N, C], got shape {tuple(self.tokens.shape)}")
        n = self.tokens.shape[1]
        if tuple(self.positions.shape) != (n, 3):
            raise ValueError(f"Context.positions must be [N={n}, 3], got shape {tuple(self.positions.shape)}")
        if self.mask is not None and (tuple(self.mask.shape) != tuple(self.tokens.shape[:2])
                                      or self.mask.dtype != torch.bool):
            raise ValueError(f"Context.mask must be a bool [B, N]={tuple(self.tokens.shape[:2])} tensor, got "
                             f"{self.mask.dtype} {tuple(self.mask.shape)}")
        if self.order is not None and tuple(self.order.shape) != (n,):
            raise ValueError(f"Context.order must be [N={n}], got shape {tuple(self.order.shape)}")
        if self.features is not None:
            if self.features.dim() != 3 or self.features.shape[0] != self.tokens.shape[0]:
                raise ValueError(f"Context.features must be [B={self.tokens.shape[0]}, Nf, F], got shape "
                                 f"{tuple(self.features.shape)}")
            if self.feature_mask is not None and (tuple(self.feature_mask.shape) != tuple(self.features.shape[:2])
                                                  or self.feature_mask.dtype != torch.bool):
                raise ValueError(f"Context.feature_mask must be a bool [B, Nf]={tuple(self.features.shape[:2])} "
                                 f"tensor, got {self.feature_mask.dtype} {tuple(self.feature_mask.shape)}")
        elif self.feature_mask is not None:
            raise ValueError("Context.feature_mask needs Context.features")

    def order_keys(self) -> Tensor:
        """``[N]`` float32: :attr:`order`, or ``positions[:, 0]`` where it is None."""
        return order_keys(self)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.num_tokens

    def valid_mask(self) -> Tensor:
        """``[B, N]`` bool, True where a token is real (all True when ``mask`` is None)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)

    @property
    def lengths(self) -> Tensor:
        """``[B]`` int64 number of real tokens per sample."""
        return self.valid_mask().sum(dim=1)


def mix_contexts(*contexts: Context) -> Context:
    """Join contexts (e.g. from a 4x4x2 and a 2x2x8 compressor, or a compressed history and a
    sliding window of recent frames) into one.

    Each token keeps its own position (they share the backbone's coordinates, so RoPE places every
    token correctly). Tokens are merged in :meth:`Context.order_keys` order, stably (on ties the
    earlier argument's tokens first), so in ``context_mode="cached"`` the joined context streams
    exactly: tokens that arrive in a later chunk come after every token of earlier chunks. The
    result's mask is None unless some input has one.
    """
    if len(contexts) == 1 and isinstance(contexts[0], (list, tuple)):
        contexts = tuple(contexts[0])
    if not contexts:
        raise ValueError("mix_contexts needs at least one Context")
    for i, c in enumerate(contexts):
        if not isinstance(c, Context):
            raise ValueError(f"mix_contexts: argument {i} is a {type(c).__name__}, not a Context")
    first = contexts[0].tokens
    for i, c in enumerate(contexts[1:], 1):
        t = c.tokens
        if t.shape[0] != first.shape[0] or t.shape[2] != first.shape[2]:
            raise ValueError(f"mix_contexts: context {i} has tokens {tuple(t.shape)} but context 0 has "
                             f"{tuple(first.shape)}; batch size and width must agree")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"mix_contexts: context {i} is {t.dtype} on {t.device}, context 0 is "
                             f"{first.dtype} on {first.device}")
    if len(contexts) == 1:
        return contexts[0]
    tokens = torch.cat([c.tokens for c in contexts], dim=1)
    positions = torch.cat([c.positions for c in contexts], dim=0)
    order = torch.cat([c.order_keys().to(positions.device) for c in contexts])
    mask = None
    if any(c.mask is not None for c in contexts):
        mask = torch.cat([c.valid_mask() for c in contexts], dim=1)
    if order.numel() > 1 and bool((order[1:] < order[:-1]).any()):
        perm = torch.sort(order, stable=True).indices
        tokens, positions, order = tokens[:, perm.to(tokens.device)], positions[perm], order[perm]
        mask = mask[:, perm.to(mask.device)] if mask is not None else None
    features = feature_mask = None
    with_features = [c for c in contexts if c.features is not None]
    if with_features:
        widths = {c.features.shape[2] for c in with_features}
        if len(widths) > 1:
            raise ValueError(f"mix_contexts: contexts carry features of different widths {sorted(widths)}; "
                             "cross-attention over them needs one width (the same last compressor stage)")
        features = torch.cat([c.features for c in with_features], dim=1)
        if any(c.feature_mask is not None for c in with_features):
            feature_mask = torch.cat([c.feature_mask if c.feature_mask is not None else torch.ones(
                c.features.shape[:2], dtype=torch.bool, device=c.features.device) for c in with_features], dim=1)
    return Context(tokens, positions, mask, order, features, feature_mask)


def _empty_context(batch: int, width: int, dtype: torch.dtype, device: torch.device) -> Context:
    return Context(torch.empty(batch, 0, width, dtype=dtype, device=device),
                   torch.empty(0, 3, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------------
# the compressor
# ----------------------------------------------------------------------------------------------
def _patch_of(patch_embed: nn.Module, patch_size) -> tuple[int, int, int]:
    if patch_size is None:
        if isinstance(patch_embed, nn.Conv3d):
            k, s, p = tuple(patch_embed.kernel_size), tuple(patch_embed.stride), tuple(patch_embed.padding)
            if k != s or any(p) or tuple(patch_embed.dilation) != (1, 1, 1) or patch_embed.groups != 1:
                raise ValueError(f"patch_embed must be a patchify Conv3d (kernel == stride, no padding, "
                                 f"dilation 1, groups 1), got kernel {k}, stride {s}, padding {p}")
            patch_size = k
        elif hasattr(patch_embed, "patch_size"):
            patch_size = patch_embed.patch_size
        else:
            raise ValueError("patch_embed is not an nn.Conv3d and has no .patch_size; pass patch_size=(pt, ph, pw)")
    if isinstance(patch_size, int):
        patch_size = (1, patch_size, patch_size)
    patch_size = tuple(int(v) for v in patch_size)
    if len(patch_size) == 2:
        patch_size = (1,) + patch_size
    if len(patch_size) != 3 or any(v < 1 or v & (v - 1) for v in patch_size):
        raise ValueError(f"patch size must be 3 powers of two (pt, ph, pw), got {patch_size!r}")
    if patch_size[0] != 1:
        raise ValueError(f"only a temporal patch of 1 is supported (Wan, HunyuanVideo use (1, 2, 2)); "
                         f"patch_embed has patch {patch_size}")
    return patch_size


class MemoryCompressor(nn.Module):
    """Dual-branch streaming memory compressor.

    Args:
        patch_embed: the backbone's patch embedding, shared with it (its parameters are this
            module's too, so they train with it). Maps ``[B, C, t, h*ph, w*pw]`` latents to
            ``[B, inner_dim, t, h, w]`` features or ``[B, t*h*w, inner_dim]`` tokens; typically
            ``nn.Conv3d(C, inner_dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))``.
        latent_channels: VAE latent channels C (16: Wan 2.1 / HunyuanVideo, 48: Wan 2.2 5B).
        inner_dim: the backbone's width (3072, 5120, or small).
        rate: ``"HxWxT"`` string, ``(h, w, t)`` or :class:`pfp.Rate`; see pfp/rates.py.
        hidden: widths of the HR conv + SiLU stages.
        patch_size: ``(pt, ph, pw)``; read from ``patch_embed`` when None.
        impl: pfp_kernels implementation for the convs and the projection (``"auto"``).
        zero_init: zero the HR projection (see the module docstring).
        kind: which compressor (the paper's Table 1 rows, all on the same token grid):
            ``"pfp"`` (proposed: HR conv stages + projection, with the LR tokens added),
            ``"without_lr"`` (the HR branch alone), ``"only_lr"`` (the LR tokens alone: the HR
            latent only sets the grid) or ``"large_patchify"`` (FramePack-style: one causal
            patchify conv of the HR latent, kernel = stride = the token's HR footprint, straight
            into ``inner_dim``; no LR branch).
        lr_phase: which frame of each 1/rt interval the LR latents are taken from (``"start"`` or
            ``"end"``, as the data's :class:`pfp.data.VideoSpec`). It changes no tensor, only when a
            token is available (:attr:`Context.order`): with ``"end"`` the LR latent of token j
            arrives ``rt - 1`` frames after its HR frames.

    ``compressor(hr_latent, lr_latent)`` compresses a whole history; ``compressor.stream(B)``
    returns a :class:`CompressorStream` that compresses it chunk by chunk with the same result.
    """

    def __init__(self, patch_embed: nn.Module, latent_channels: int, inner_dim: int,
                 rate: RateLike = "4x4x2", hidden: Sequence[int] = (64, 128, 256, 512), *,
                 patch_size=None, impl: str = "auto", zero_init: bool = True, kind: str = "pfp",
                 lr_phase: str = "start"):
        super().__init__()
        if kind not in COMPRESSOR_KINDS:
            raise ValueError(f"compressor kind {kind!r} is not valid; choose one of: {', '.join(COMPRESSOR_KINDS)}")
        if lr_phase not in ("start", "end"):
            raise ValueError(f"lr_phase {lr_phase!r} is not valid; choose one of: start, end")
        self.kind, self.lr_phase = kind, lr_phase
        if not isinstance(patch_embed, nn.Module):
            raise ValueError(f"patch_embed must be an nn.Module (the backbone's patchify), got {type(patch_embed).__name__}")
        if int(latent_channels) < 1 or int(inner_dim) < 1:
            raise ValueError(f"latent_channels and inner_dim must be >= 1, got {latent_channels}, {inner_dim}")
        self.latent_channels, self.inner_dim = int(latent_channels), int(inner_dim)
        self.rate: Rate = parse_rate(rate)
        self.patch_size = _patch_of(patch_embed, patch_size)
        if isinstance(patch_embed, nn.Conv3d):
            if patch_embed.in_channels != self.latent_channels or patch_embed.out_channels != self.inner_dim:
                raise ValueError(f"patch_embed maps {patch_embed.in_channels} -> {patch_embed.out_channels} channels, "
                                 f"but latent_channels={self.latent_channels}, inner_dim={self.inner_dim}")
        self.hidden = tuple(int(c) for c in hidden)
        self.patch_embed = patch_embed
        ref = next(patch_embed.parameters(), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        if kind in ("pfp", "without_lr"):
            self.specs = stage_plan(self.rate, self.patch_size, self.latent_channels, self.hidden)
            self.stages = nn.ModuleList(
                CausalConv3dAct(s.in_channels, s.out_channels, s.kernel, s.stride, s.padding_hw,
                                activation="silu", impl=impl, **factory) for s in self.specs)
            self.proj = TokenProjection(self.hidden[-1], self.inner_dim, impl=impl, **factory)
            with torch.no_grad():
                for stage in self.stages:
                    fan_in = stage.weight[0].numel()
                    stage.weight.normal_(0.0, SILU_GAIN / fan_in ** 0.5)
                    if stage.bias is not None:
                        stage.bias.zero_()
        elif kind == "large_patchify":
            foot = self.hr_factors
            self.specs = [StageSpec(self.latent_channels, self.inner_dim, foot, foot, (0, 0))]
            self.stages = nn.ModuleList([CausalConv3dAct(self.latent_channels, self.inner_dim, foot, foot, 0,
                                                         activation=None, impl=impl, **factory)])
            self.proj = None
        else:  # only_lr
            self.specs, self.stages, self.proj = [], nn.ModuleList(), None
        self.zero_init = bool(zero_init)
        if self.zero_init and kind == "pfp":  # the LR tokens carry the context from the first step
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.bias.zero_()
        self._impl = impl

    # -- configuration -------------------------------------------------------------------------
    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        for stage in self.stages:
            stage.impl = value
        if self.proj is not None:
            self.proj.impl = value
        self._impl = value

    @property
    def uses_hr(self) -> bool:
        """Whether the HR latent's content reaches the tokens (``only_lr``: it sets the grid only)."""
        return self.kind != "only_lr"

    @property
    def has_features(self) -> bool:
        """Whether its contexts carry penultimate features (kinds with conv stages and a projection)."""
        return self.kind in ("pfp", "without_lr")

    def _features(self, hr_feats: Tensor) -> Optional[Tensor]:
        return hr_feats.flatten(2).transpose(1, 2) if self.has_features else None

    @property
    def uses_lr(self) -> bool:
        return self.kind in ("pfp", "only_lr")

    def token_order(self, t_frames: int, h: int, w: int, t_start: int = 0, device=None) -> Tensor:
        """:attr:`Context.order` of the tokens of ``t_frames`` token frames from token frame
        ``t_start`` on a ``h x w`` grid: token frame j is available at backbone frame ``rt*j`` (its
        last HR frame), or ``rt*j + rt - 1`` when its LR latent comes from the interval's end."""
        lag = self.rate.t - 1 if self.uses_lr and self.lr_phase == "end" else 0
        j = torch.arange(t_start, t_start + t_frames, dtype=torch.float32, device=device)
        return (self.rate.t * j + lag).repeat_interleave(h * w)

    @property
    def hr_factors(self) -> tuple[int, int, int]:
        """``(ft, fh, fw)``: how many HR latent frames/rows/cols one context token covers."""
        pt, ph, pw = self.patch_size
        return pt * self.rate.t, ph * self.rate.h, pw * self.rate.w

    def config(self) -> dict:
        return {"kind": self.kind, "rate": str(self.rate), "latent_channels": self.latent_channels,
                "inner_dim": self.inner_dim, "hidden": list(self.hidden), "patch_size": list(self.patch_size)}

    def extra_repr(self) -> str:
        strides = ", ".join(str(s.stride) for s in self.specs)
        return (f"kind={self.kind}, rate={self.rate}, patch={self.patch_size}, strides=[{strides}], "
                f"inner_dim={self.inner_dim}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the compressor takes its latents in and makes its tokens in (its own layers')."""
        return self._param_ref().dtype

    def _param_ref(self) -> Tensor:
        """A parameter whose dtype and device are the compressor's own (the tokens')."""
        if self.proj is not None:
            return self.proj.weight
        if len(self.stages):
            return self.stages[0].weight
        return next(self.patch_embed.parameters())

    # -- input checks --------------------------------------------------------------------------
    def expected_lr_shape(self, hr_shape: Sequence[int]) -> tuple[int, ...]:
        """LR latent shape ``[B, C, t, H', W']`` that goes with an HR latent of ``hr_shape``.

        H' = H // rh and W' = W // rw (the same video at 1/rh, 1/rw size); any H' from
        ``grid_h * ph`` up to that is accepted (only the first ``grid_h * ph`` rows are read).
        """
        b, c, t, h, w = hr_shape
        return (b, c, -(-t // self.rate.t), h // self.rate.h, w // self.rate.w)

    def _check_tensor(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a Tensor [B, C, T, H, W], got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"{name} must be 5-D [B, C, T, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.latent_channels:
            raise ValueError(f"{name} has {x.shape[1]} channels but this compressor takes latent_channels="
                             f"{self.latent_channels} (shape {tuple(x.shape)}, layout [B, C, T, H, W])")
        ref = self._param_ref()
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device} but the compressor's parameters are {ref.dtype} "
                             f"on {ref.device}; convert one with .to(...)")

    def _check_spatial(self, hr_hw: Sequence[int], lr_hw: Sequence[int]) -> tuple[int, int]:
        fh, fw = self.hr_factors[1:]
        h, w = hr_hw
        gh, gw = h // fh, w // fw
        r = self.rate
        if gh < 1 or gw < 1:
            raise ValueError(f"hr_latent is {h}x{w} (HxW); rate {r} with patch {self.patch_size} needs at least "
                             f"{fh}x{fw} latent rows x cols (a video of {fh}x{fw} times the VAE's spatial factor)")
        ph, pw = self.patch_size[1:]
        lh, lw = lr_hw
        if not (gh * ph <= lh <= h // r.h and gw * pw <= lw <= w // r.w):
            raise ValueError(
                f"lr_latent is {lh}x{lw} (HxW) but hr_latent {h}x{w} at rate {r} needs an LR latent of "
                f"{h // r.h}x{w // r.w}: the same video at 1/{r.h} height and 1/{r.w} width "
                f"(accepted: height {gh * ph}..{h // r.h}, width {gw * pw}..{w // r.w}; "
                f"pfp.plan_inputs gives the video sizes and frame counts)")
        return gh, gw

    def _lr_frames_error(self, hr_frames: int, lr_frames: int) -> ValueError:
        r = self.rate
        return ValueError(
            f"lr_latent has {lr_frames} frames but hr_latent has {hr_frames}: rate {r} needs ceil({hr_frames}/{r.t}) = "
            f"{-(-hr_frames // r.t)} LR latent frames, i.e. the video at 1/{r.t} of the frame rate "
            f"(frames 0, {r.t}, {2 * r.t}, ... of it; pfp.plan_inputs gives the counts)")

    # -- the two branches ----------------------------------------------------------------------
    def _crop_hr(self, x: Tensor, gh: int, gw: int) -> Tensor:
        fh, fw = self.hr_factors[1:]
        return x[:, :, :, : gh * fh, : gw * fw]  # a view: the token grid floors (rates.py)

    def _crop_lr(self, x: Tensor, gh: int, gw: int) -> Tensor:
        ph, pw = self.patch_size[1:]
        return x[:, :, :, : gh * ph, : gw * pw]

    def _lr_tokens(self, lr: Tensor, grid: tuple[int, int, int]) -> Tensor:
        # The layout is the patch embedding's business (the backbone's module); the token view
        # below is free when it writes channels-last, and project_tokens reads any strides.
        # It runs in the backbone's dtype (e.g. a bf16 backbone beside an fp32 compressor); its
        # tokens join the compressor's in the compressor's dtype (no copy when the two agree).
        embed_dtype = next((p.dtype for p in self.patch_embed.parameters()), lr.dtype)
        out = self.patch_embed(lr.to(embed_dtype)).to(self._param_ref().dtype)
        n = grid[0] * grid[1] * grid[2]
        if out.dim() == 5:
            if tuple(out.shape[1:]) != (self.inner_dim,) + tuple(grid):
                raise RuntimeError(f"patch_embed gave {tuple(out.shape)} for LR input {tuple(lr.shape)}; expected "
                                   f"[B, {self.inner_dim}, {grid[0]}, {grid[1]}, {grid[2]}]")
            return out.flatten(2).transpose(1, 2)
        if out.dim() == 3 and tuple(out.shape[1:]) == (n, self.inner_dim):
            return out
        raise RuntimeError(f"patch_embed gave {tuple(out.shape)} for LR input {tuple(lr.shape)}; expected "
                           f"[B, {self.inner_dim}, {grid[0]}, {grid[1]}, {grid[2]}] or [B, {n}, {self.inner_dim}]")

    def _fuse(self, hr_feats: Tensor, lr: Tensor) -> Tensor:
        """Tokens ``[B, t*h*w, inner]`` of the HR features ``[B, C', t, h, w]`` (C' is 0 for
        ``only_lr``) and the cropped LR latent of the same t frames."""
        grid = tuple(hr_feats.shape[2:])
        if self.kind == "only_lr":
            return self._lr_tokens(lr, grid)
        if self.kind == "large_patchify":
            return hr_feats.flatten(2).transpose(1, 2)
        residual = self._lr_tokens(lr, grid) if self.kind == "pfp" else None
        return project_tokens(hr_feats, self.proj.weight, self.proj.bias, residual, impl=self.proj.impl)

    def _hr_features(self, h: Tensor, states=None):
        """The HR branch over cropped HR frames: ``(features, new states)``; the features of
        ``only_lr`` have no channels, one frame per token frame (they only count)."""
        if self.kind == "only_lr":
            ft = self.hr_factors[0]
            seen = 0 if states is None else states
            n = -(-(seen + h.shape[2]) // ft) - (-(-seen // ft))
            return h.new_zeros(h.shape[0], 0, n, h.shape[3] // self.hr_factors[1],
                               h.shape[4] // self.hr_factors[2]), seen + h.shape[2]
        states = list(states) if states is not None else [None] * len(self.stages)
        for i, stage in enumerate(self.stages):
            if h.shape[2] == 0:
                break  # nothing reached this stage; its state is unchanged
            h, states[i] = stage(h, states[i])
        return h, states

    # -- whole history -------------------------------------------------------------------------
    def forward(self, hr_latent: Tensor, lr_latent: Tensor,
                hr_frames: Union[Tensor, Sequence[int], None] = None) -> Context:
        """Compress a whole history.

        Args:
            hr_latent: ``[B, C, T, H, W]`` high-res latent (channels-last-3d avoids relayouts).
            lr_latent: ``[B, C, ceil(T/rt), H', W']`` the same video at 1/rh, 1/rw size and 1/rt fps
                (:meth:`expected_lr_shape`, :func:`pfp.plan_inputs`).
            hr_frames: optional ``[B]`` real HR frames per sample (0..T) when histories of
                different lengths are padded at the end to T; tokens past ``ceil(hr_frames[b]/rt)``
                are masked (all of them for 0: a sample with no history). Causality makes the real
                tokens independent of the padding; the backbones ignore the masked ones.

        Returns:
            :class:`Context` with ``ceil(T/rt) * (H//(ph*rh)) * (W//(pw*rw))`` tokens.
        """
        self._check_tensor(hr_latent, "hr_latent")
        self._check_tensor(lr_latent, "lr_latent")
        if lr_latent.shape[0] != hr_latent.shape[0]:
            raise ValueError(f"hr_latent has batch {hr_latent.shape[0]} but lr_latent has {lr_latent.shape[0]}")
        t = hr_latent.shape[2]
        if t < 1:
            raise ValueError("hr_latent has no frames (T=0); use a stream to start from nothing")
        gh, gw = self._check_spatial(hr_latent.shape[3:], lr_latent.shape[3:])
        gt = -(-t // self.rate.t)
        if lr_latent.shape[2] != gt:
            raise self._lr_frames_error(t, lr_latent.shape[2])
        h, _ = self._hr_features(self._crop_hr(hr_latent, gh, gw))  # the whole history: no stream to continue
        tokens = self._fuse(h, self._crop_lr(lr_latent, gh, gw))
        positions = token_positions(self.rate, (gt, gh, gw), device=tokens.device)
        mask = None
        if hr_frames is not None:
            frames = torch.as_tensor(hr_frames, device=tokens.device).long().reshape(-1)
            if frames.shape[0] != hr_latent.shape[0] or bool(((frames < 0) | (frames > t)).any()):
                raise ValueError(f"hr_frames must be {hr_latent.shape[0]} frame counts in 0..{t}, got {hr_frames!r}")
            real_t = -(-frames // self.rate.t)  # [B]
            token_t = torch.arange(gt, device=tokens.device).repeat_interleave(gh * gw)
            mask = token_t[None, :] < real_t[:, None]
        features = self._features(h)
        return Context(tokens, positions, mask, self.token_order(gt, gh, gw, device=tokens.device), features,
                       mask if features is not None else None)

    def token_grid(self, hr_latent_thw: Sequence[int]) -> tuple[int, int, int]:
        """``(t, h, w)`` context grid for an HR latent of ``(T, H, W)``."""
        return token_grid(hr_latent_thw, self.rate, self.patch_size)

    # -- streaming -----------------------------------------------------------------------------
    def stream(self, batch_size: int, keep_features: bool = False, cuda_graph: bool = False) -> "CompressorStream":
        """Start compressing a history chunk by chunk; see :class:`CompressorStream`.
        ``keep_features``: :attr:`CompressorStream.context` also holds every emitted token's
        penultimate features (for cross-attention over them; each append returns its own anyway).
        ``cuda_graph``: replay repeated appends as CUDA graphs (see :class:`CompressorStream`)."""
        return CompressorStream(self, batch_size, keep_features, cuda_graph)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: Union[str, os.PathLike], include_patch_embed: bool = True) -> None:
        """Write the parameters (and the config, as metadata) to a safetensors file.

        The file appears complete or not at all (written beside it, then renamed). With
        ``include_patch_embed=False`` the shared patch embedding is left to the backbone's checkpoint.
        """
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if include_patch_embed or not k.startswith("patch_embed.")}
        meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(self.config()),
                "includes_patch_embed": json.dumps(bool(include_patch_embed))}
        save_safetensors_atomic(state, path, meta)

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Load a :meth:`save_checkpoint` file into this compressor.

        Raises ValueError naming every missing, unexpected and wrongly-shaped tensor (with both
        configs) when the checkpoint was written by a differently configured compressor; nothing
        is loaded then.
        """
        from safetensors import safe_open
        path = os.fspath(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        includes_pe = json.loads(meta.get("includes_patch_embed", "true"))
        own = self.state_dict()
        expected = {k: v for k, v in own.items() if includes_pe or not k.startswith("patch_embed.")}
        missing, unexpected, mismatched = state_mismatch(expected, tensors)
        if missing or unexpected or mismatched:
            raise ValueError(f"checkpoint {path} does not fit this compressor "
                             f"({describe_mismatch(missing, unexpected, mismatched)}). "
                             f"checkpoint config: {meta.get('config', 'unknown')}; this compressor: "
                             f"{json.dumps(self.config())}")
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)


# ----------------------------------------------------------------------------------------------
# the stream
# ----------------------------------------------------------------------------------------------
class _GraphedStep:
    """One whole-step append of a stream, captured as a CUDA graph (``CompressorStream(cuda_graph=True)``).

    The graph reads the chunk and the stages' held frames from buffers of its own and writes the
    tokens, features and new frames into its memory pool; a replay copies the inputs in and clones
    the outputs out (the next replay overwrites the pool). It holds the parameters' and buffers'
    addresses from the capture: one replaced or moved (``.to``, offloading) makes it stale."""

    def __init__(self, stream: "CompressorStream", hr: Tensor, lr: Tensor, frames: tuple, phases: tuple):
        # a stage that keeps no frames (temporal kernel 1) has None for them, and no buffer
        self.inputs = [hr.clone(), lr.clone(), *(None if f is None else f.clone() for f in frames)]
        self.tensor_ptrs = _tensor_ptrs(stream.compressor)
        self.graph, self.outputs = _capture(
            lambda: stream._step(self.inputs[0], self.inputs[1], tuple(self.inputs[2:]), phases), hr.device)

    @staticmethod
    def usable(compressor: "MemoryCompressor", device: torch.device) -> bool:
        """Graphs run on this device, every parameter and buffer is there, and no module has hooks
        (a replay would skip them)."""
        return (device.type in _GRAPH_DEVICE_TYPES and all(t.device == device for t in _tensors(compressor))
                and not any(m._forward_hooks or m._forward_pre_hooks for m in compressor.modules()))

    def valid_for(self, compressor: "MemoryCompressor") -> bool:
        return _tensor_ptrs(compressor) == self.tensor_ptrs

    def replay(self, hr: Tensor, lr: Tensor, frames: tuple) -> tuple:
        for buf, x in zip(self.inputs, (hr, lr, *frames)):
            if buf is not None:
                buf.copy_(x)
        self.graph.replay()
        tokens, features, new_frames = self.outputs
        return (tokens.clone(), None if features is None else features.clone(),
                tuple(None if f is None else f.clone() for f in new_frames))


def _tensors(module: nn.Module) -> list:
    return [*module.parameters(), *module.buffers()]


def _tensor_ptrs(module: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in _tensors(module))


_GRAPH_DEVICE_TYPES = ("cuda",)


def _capture(run, device: torch.device) -> tuple:
    """``(graph, outputs)``: ``run()`` captured as a CUDA graph on ``device``, after one warm-up
    run on a side stream (kernel compiles, cuBLAS/cuDNN set-up and ``auto``'s first-use timings
    happen outside the capture, as the CUDA graph docs ask)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


class CompressorStream:
    """Compresses a history chunk by chunk; ``append`` returns only the new context tokens.

    ``append(hr_chunk, lr_chunk)`` takes any number of new HR latent frames and LR latent frames
    (either may be None or have 0 frames). HR frames that a strided causal conv cannot use yet
    wait in that conv's state; finished HR features wait for their LR frame, and LR frames wait for
    their HR features, so no frame is dropped or padded. Concatenated, the appended tokens equal
    ``compressor(all_hr, all_lr)`` for any chunk plan. Every buffer is bounded by the conv kernels
    and by how far one branch runs ahead of the other, so an append costs the same however long
    the history is. ``context`` is everything emitted so far.

    The stream is tied to one batch size, and to the compressor's dtype and device.

    ``cuda_graph=True``: an append is launch-bound on a GPU (each of its few output frames costs a
    handful of small kernels and their Python). Appends that repeat one shape at one phase of the
    stream (the usual case: equal chunks, inference) then run as a CUDA graph: the second such
    append captures the branch work (conv stages, LR patch embedding, projection) and later ones
    replay it, copying the chunk and the conv states into the graph's buffers and the results out.
    The tokens are the same as without it. Steps are recorded only under ``torch.no_grad()``, for
    chunks of whole token frames (nothing left pending); other appends run as usual. A recorded
    step runs without a graph where none can run: on another device, with a parameter off the GPU
    (offloading) or with hooks on the compressor's modules (a replay would run none).
    ``replayed_appends`` counts the appends that ran as a recorded step, and ``graph_replays``
    those of them that replayed a captured graph.
    """

    def __init__(self, compressor: MemoryCompressor, batch_size: int, keep_features: bool = False,
                 cuda_graph: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.compressor, self.batch_size = compressor, batch_size
        self._states = None   # the HR branch's: one CausalConvState per stage (only_lr: frames seen)
        self._hr_pending: Optional[Tensor] = None   # last-stage features without their LR frame yet
        self._lr_pending: Optional[Tensor] = None   # cropped LR frames without their HR features yet
        self._geometry: Optional[tuple] = None      # (hr H, W, lr H, W, grid h, w)
        self._chunks: list[Tensor] = []
        self.hr_frames_seen = 0
        self.lr_frames_seen = 0
        self.num_emitted_frames = 0                 # token-grid frames emitted so far
        self.keep_features = bool(keep_features)
        self._features: list = []                   # penultimate features of the emitted tokens, if kept
        ref = compressor._param_ref()
        self._dtype, self._device = ref.dtype, ref.device
        self.cuda_graph = bool(cuda_graph)
        self._steps: dict = {}    # step key -> the input frames each stage consumes in that step
        self._graphs: dict = {}   # step key -> its _GraphedStep, once captured
        self.replayed_appends = 0
        self.graph_replays = 0    # of those, the ones that replayed a captured CUDA graph
        self._graph_error: Optional[str] = None   # why a capture failed; then no graphs for this stream
        self._grids: dict = {}    # token frames of an append -> (positions, order) from frame 0

    @property
    def num_tokens(self) -> int:
        return sum(c.shape[1] for c in self._chunks)

    @property
    def context(self) -> Context:
        """Every token emitted so far, as one :class:`Context` (a concatenation, O(history))."""
        c = self.compressor
        if not self._chunks:
            return _empty_context(self.batch_size, c.inner_dim, self._dtype, self._device)
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks, dim=1)]
        gh, gw = self._geometry[4:]
        positions = token_positions(c.rate, (self.num_emitted_frames, gh, gw), device=self._device)
        if len(self._features) > 1:
            self._features = [torch.cat(self._features, dim=1)]
        return Context(self._chunks[0], positions, None,
                       c.token_order(self.num_emitted_frames, gh, gw, device=self._device),
                       self._features[0] if self._features else None)

    def _check_chunk(self, x: Optional[Tensor], name: str) -> Optional[Tensor]:
        if x is None:
            return None
        c = self.compressor
        c._check_tensor(x, name)
        if x.shape[0] != self.batch_size:
            raise ValueError(f"{name} has batch size {x.shape[0]} but this stream was started with batch_size="
                             f"{self.batch_size}; start a new stream with compressor.stream({x.shape[0]})")
        ref = c._param_ref()
        if ref.dtype != self._dtype or ref.device != self._device:
            raise ValueError(f"the compressor moved to {ref.dtype} on {ref.device} after this stream started "
                             f"({self._dtype} on {self._device}); start a new stream")
        return x

    def append(self, hr_chunk: Optional[Tensor], lr_chunk: Optional[Tensor]) -> Context:
        """Add new frames to the history; returns the context tokens they complete.

        Args:
            hr_chunk: ``[B, C, n, H, W]`` new HR latent frames, or None.
            lr_chunk: ``[B, C, m, H', W']`` new LR latent frames (1/rt fps), or None.

        Returns:
            :class:`Context` holding only the new tokens (possibly 0) with their positions.
        """
        hr = self._check_chunk(hr_chunk, "hr_chunk")
        lr = self._check_chunk(lr_chunk, "lr_chunk")
        if hr is not None or lr is not None:
            self._check_geometry(hr, lr)
        key = self._step_key(hr, lr) if self.cuda_graph else None
        if key is not None and key in self._steps:
            return self._append_step(key, hr, lr)
        before = [s.frames_seen for s in self._states] if key is not None else None
        out = self._append(hr, lr)
        if key is not None and self._hr_pending is None and self._lr_pending is None:
            # a whole step: remember what each stage consumed; the next append like it runs as a step
            self._steps[key] = tuple(s.frames_seen - b for s, b in zip(self._states, before))
        return out

    def _append(self, hr: Optional[Tensor], lr: Optional[Tensor]) -> Context:
        c = self.compressor
        if hr is not None and hr.shape[2] > 0:
            gh, gw = self._geometry[4:]
            h, self._states = c._hr_features(c._crop_hr(hr, gh, gw), self._states)
            self.hr_frames_seen += hr.shape[2]
            if h.shape[2] > 0:  # the last stage produced frames (an early break leaves 0)
                self._hr_pending = h if self._hr_pending is None else torch.cat([self._hr_pending, h], dim=2)
        if lr is not None and lr.shape[2] > 0:
            self.lr_frames_seen += lr.shape[2]
            if c.uses_lr:  # the kinds without an LR branch keep none of it
                gh, gw = self._geometry[4:]
                lr = c._crop_lr(lr, gh, gw)
                self._lr_pending = lr if self._lr_pending is None else torch.cat([self._lr_pending, lr], dim=2)
        n_hr = self._hr_pending.shape[2] if self._hr_pending is not None else 0
        n_lr = self._lr_pending.shape[2] if self._lr_pending is not None else 0
        n = min(n_hr, n_lr) if c.uses_lr else n_hr
        if n == 0:
            return _empty_context(self.batch_size, c.inner_dim, self._dtype, self._device)
        hr_use = self._hr_pending[:, :, :n]
        lr_use = self._lr_pending[:, :, :n] if c.uses_lr else None
        self._hr_pending = self._hr_pending[:, :, n:] if n < n_hr else None
        if c.uses_lr:
            self._lr_pending = self._lr_pending[:, :, n:] if n < n_lr else None
        return self._emit(c._fuse(hr_use, lr_use), n, c._features(hr_use))

    def _emit(self, tokens: Tensor, n: int, features: Optional[Tensor]) -> Context:
        """Record ``n`` new token frames and return them as a Context, their positions and order
        shifted from :meth:`_grid_at_zero` instead of rebuilt."""
        c = self.compressor
        t0 = self.num_emitted_frames
        at_zero = self._grid_at_zero(n, tokens.device)
        # a shift by whole token frames moves times by rt per frame; every value is a multiple of
        # 1/2 far below 2**24, so float32 holds the shifted values exactly, as if rebuilt
        positions, order = at_zero[0].clone(), at_zero[1] + c.rate.t * t0
        positions[:, 0] += c.rate.t * t0
        self.num_emitted_frames += n
        self._chunks.append(tokens)
        if features is not None and self.keep_features:
            self._features.append(features)
        return Context(tokens, positions, None, order, features)

    # -- appends as replayable steps (cuda_graph) ------------------------------------------------
    def _step_key(self, hr: Optional[Tensor], lr: Optional[Tensor]) -> Optional[tuple]:
        """What an append's work depends on, when it can run as a step: the chunks' shapes and
        strides, the layers' ``impl``, each stage state's phase and held frames; None when it
        cannot (see the class docstring)."""
        c = self.compressor
        if (hr is None or lr is None or hr.shape[2] == 0 or lr.shape[2] == 0 or not c.uses_hr
                or torch.is_grad_enabled() or self._states is None or any(s is None for s in self._states)
                or self._hr_pending is not None or self._lr_pending is not None):
            return None
        impls = tuple(m.impl for m in (*c.stages, *([c.proj] if c.proj is not None else [])))
        return (tuple(hr.shape), tuple(lr.shape), hr.stride(), lr.stride(), impls,
                tuple((s.phase(), None if s.frames is None else tuple(s.frames.shape)) for s in self._states))

    def _step(self, hr: Tensor, lr: Tensor, frames: tuple, phases: tuple) -> tuple:
        """The tensor work of a whole-step append from the stages' states at their phases:
        ``(tokens, features or None, new frames per stage)``. Reads nothing of the stream."""
        c = self.compressor
        gh, gw = self._geometry[4:]
        states = [CausalConvState(f, p, s.signature) for f, p, s in zip(frames, phases, self._states)]
        h, new = c._hr_features(c._crop_hr(hr, gh, gw), states)
        tokens = c._fuse(h, c._crop_lr(lr, gh, gw))
        return tokens, c._features(h), tuple(s.frames for s in new)

    def _append_step(self, key: tuple, hr: Tensor, lr: Tensor) -> Context:
        frames = tuple(s.frames for s in self._states)
        phases = tuple(phase for phase, _ in key[-1])   # the key ends with each state's (phase, frames shape)
        graph = self._graph_error is None and _GraphedStep.usable(self.compressor, hr.device)
        if graph:
            entry = self._graphs.get(key)
            if entry is None or not entry.valid_for(self.compressor):
                try:
                    entry = self._graphs[key] = _GraphedStep(self, hr, lr, frames, phases)
                except RuntimeError as exc:   # something in the step cannot be captured: no graphs here
                    self._graph_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"CompressorStream(cuda_graph=True): the append could not be captured as a "
                                  f"CUDA graph ({self._graph_error}); this stream runs its appends without "
                                  f"graphs", RuntimeWarning, stacklevel=3)
        if graph and self._graph_error is None:
            tokens, features, new_frames = entry.replay(hr, lr, frames)
            self.graph_replays += 1
        else:   # no graph here: the same step, run directly
            tokens, features, new_frames = self._step(hr, lr, frames, phases)
        self.replayed_appends += 1
        self._states = [CausalConvState(f, s.frames_seen + k, s.signature)
                        for f, s, k in zip(new_frames, self._states, self._steps[key])]
        self.hr_frames_seen += hr.shape[2]
        self.lr_frames_seen += lr.shape[2]
        gh, gw = self._geometry[4:]
        n = tokens.shape[1] // (gh * gw)
        return self._emit(tokens, n, features)

    def _grid_at_zero(self, n: int, device) -> tuple:
        """:meth:`_grid` of ``n`` token frames from frame 0, built once per ``n`` and then shifted by
        :meth:`_emit` (two small ops per append instead of a rebuild: the grid's arange, meshgrid
        and stack were ~50 us of a 2 ms CPU append, and as many kernel launches on a GPU)."""
        grid = self._grids.get(n)
        if grid is None or grid[0].device != torch.device(device):
            grid = self._grids[n] = self._grid(n, 0, device)
        return grid

    def _grid(self, n: int, t_start: int, device) -> tuple:
        """``(positions, order)`` of ``n`` token frames from token frame ``t_start``."""
        c = self.compressor
        gh, gw = self._geometry[4:]
        return (token_positions(c.rate, (n, gh, gw), t_start=t_start, device=device),
                c.token_order(n, gh, gw, t_start=t_start, device=device))

    def _check_geometry(self, hr: Optional[Tensor], lr: Optional[Tensor]) -> None:
        c = self.compressor
        if self._geometry is None:
            if hr is None or lr is None:
                raise ValueError("the first append must carry both hr_chunk and lr_chunk (0 frames is fine), "
                                 "so the stream can check their resolutions against each other")
            gh, gw = c._check_spatial(hr.shape[3:], lr.shape[3:])
            self._geometry = (hr.shape[3], hr.shape[4], lr.shape[3], lr.shape[4], gh, gw)
            return
        for x, name, (eh, ew) in ((hr, "hr_chunk", self._geometry[0:2]), (lr, "lr_chunk", self._geometry[2:4])):
            if x is not None and tuple(x.shape[3:]) != (eh, ew):
                raise ValueError(f"{name} is {x.shape[3]}x{x.shape[4]} (HxW) but this stream started at {eh}x{ew}; "
                                 f"every chunk of a stream must have the same resolution")

    def __repr__(self) -> str:
        return (f"CompressorStream(batch_size={self.batch_size}, hr_frames={self.hr_frames_seen}, "
                f"lr_frames={self.lr_frames_seen}, tokens={self.num_tokens})")


__all__ = ["Context", "mix_contexts", "MemoryCompressor", "CompressorStream", "CHECKPOINT_FORMAT", "COMPRESSOR_KINDS"]
