"""Video VAEs behind one small interface.

Layouts (every VAE here):

- video:  ``[B, 3, T, H, W]`` float, RGB, values in ``[-1, 1]``.
- latent: ``[B, C, T', H', W']`` with ``C = latent_channels``, ``H' = H / spatial_factor``,
  ``W' = W / spatial_factor`` and ``T' = latent_frames(T)``.

Temporal convention (causal, as Wan's VAE): the first frame is encoded on its own, then every
``temporal_factor`` frames make one more latent frame. So ``T = 1 + temporal_factor * k`` video
frames give ``1 + k`` latent frames, and any other ``T`` is an error that names the nearest valid
counts. With ``temporal_factor == 1`` every ``T >= 1`` is valid and ``T' = T``.

Latents are *normalised* for diffusion: roughly zero-mean and unit-variance per channel (Wan's
published per-channel mean/std for :class:`WanVAE`; a user-chosen ``shift``/``scale`` for
:class:`PatchVAE`). ``decode`` undoes the normalisation.

- :class:`PatchVAE`: exact and weight-free (pixel-unshuffle), for the tiny model and tests.
- :class:`WanVAE`: adapter around diffusers' ``AutoencoderKLWan`` loaded from a local path.
- :class:`HunyuanVAE`: adapter around diffusers' ``AutoencoderKLHunyuanVideo``; its streams are
  windowed (each chunk decoded after a few frames of the previous one), not exact: see there.

Streams (:func:`decode_stream`, :func:`encode_stream`) encode and decode a video chunk by chunk
with the causal state carried between chunks, so the concatenated outputs equal one call on the
whole video: the first latent chunk of ``n`` frames decodes to ``1 + tf*(n-1)`` frames, every
later one to ``tf*n``. Generation decodes each new chunk and re-encodes its low-res frames this way.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["VideoVAE", "PatchVAE", "WanVAE", "HunyuanVAE", "check_video_frames", "valid_frame_counts", "DecodeStream",
           "EncodeStream", "decode_stream", "encode_stream", "tiled_decode_stream", "TiledDecodeStream"]


@runtime_checkable
class VideoVAE(Protocol):
    """What the compressor, trainer and sampler need from a video VAE.

    Attributes:
        latent_channels: ``C`` of the latent.
        spatial_factor: pixels per latent cell along H and along W.
        temporal_factor: video frames per latent frame after the first (causal convention above).
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in ``[-1, 1]`` -> normalised latent ``[B, C, latent_frames(T), H/s, W/s]``."""
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``[B, C, T', H', W']`` -> video ``[B, 3, video_frames(T'), H'*s, W'*s]``."""
        ...

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` video frames; raises ValueError if ``num_frames`` is not valid."""
        ...

    def video_frames(self, num_latent: int) -> int:
        """Video frames that ``num_latent`` latent frames decode to."""
        ...


def valid_frame_counts(temporal_factor: int, near: int) -> tuple[int, int]:
    """The valid video frame counts (``1 + temporal_factor * k``) just below and just above ``near``."""
    k_lo = max(0, (near - 1) // temporal_factor)
    lo = 1 + temporal_factor * k_lo
    hi = lo + temporal_factor if lo < near else lo
    return lo, hi


def check_video_frames(num_frames: int, temporal_factor: int, what: str = "video") -> int:
    """Return the latent frame count for ``num_frames``, or raise a ValueError naming valid counts."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise ValueError(f"{what}: the frame count must be an int, got {num_frames!r}")
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        lo, hi = valid_frame_counts(temporal_factor, max(num_frames, 1))
        choices = f"{lo} or {hi}" if lo != hi else f"{lo}"
        raise ValueError(
            f"{what} has {num_frames} frames; this VAE (temporal factor {temporal_factor}) takes "
            f"1 + {temporal_factor}*k frames (1, {1 + temporal_factor}, {1 + 2 * temporal_factor}, ...): "
            f"use {choices}"
        )
    return 1 + (num_frames - 1) // temporal_factor


def _check_video(video: torch.Tensor, spatial_factor: int, temporal_factor: int) -> int:
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a [B, 3, T, H, W] tensor, got {shape}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got dtype {video.dtype}")
    h, w = video.shape[-2:]
    if h % spatial_factor or w % spatial_factor:
        fix = (max(spatial_factor, h // spatial_factor * spatial_factor),
               max(spatial_factor, w // spatial_factor * spatial_factor))
        raise ValueError(
            f"video size {h}x{w} (HxW) is not a multiple of the VAE's spatial factor {spatial_factor}; "
            f"use e.g. {fix[0]}x{fix[1]}"
        )
    return check_video_frames(video.shape[2], temporal_factor)


def _check_latent(latent: torch.Tensor, channels: int) -> None:
    if not isinstance(latent, torch.Tensor) or latent.dim() != 5 or latent.shape[1] != channels:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"latent must be a [B, {channels}, T', H', W'] tensor, got {shape}")
    if latent.shape[2] < 1:
        raise ValueError("latent has 0 frames; it needs at least 1")


class _CausalFrameCounts:
    """Frame-count arithmetic of the causal time convention (module docstring), shared by the
    VAEs; needs ``self.temporal_factor``."""

    def latent_frames(self, num_frames: int) -> int:
        return check_video_frames(num_frames, self.temporal_factor)

    def video_frames(self, num_latent: int) -> int:
        if not isinstance(num_latent, int) or num_latent < 1:
            raise ValueError(f"num_latent must be an int >= 1, got {num_latent!r}")
        return 1 + self.temporal_factor * (num_latent - 1)


class PatchVAE(_CausalFrameCounts, nn.Module):
    """Exact, weight-free "VAE": pixel-unshuffle in space (and time).

    ``encode`` folds each ``temporal_factor x spatial_factor x spatial_factor`` block of pixels into
    the channel axis, channel order ``(rgb, dt, dy, dx)``; the first frame is repeated
    ``temporal_factor`` times to fill the first (causal) group. ``decode`` is the exact inverse:
    ``decode(encode(x)) == x`` bit for bit when ``scale`` is a power of two (default 1) and ``shift``
    is 0, and to float rounding otherwise. (``encode(decode(z)) == z`` holds only for ``z`` whose
    first latent frame has identical copies, as every encoded latent does; decode keeps the last copy.)

    Normalisation: ``latent = (unshuffled_pixels - shift) * scale``. Pixels in ``[-1, 1]`` of natural
    or synthetic content typically have std ~0.5, so ``scale=2`` is a reasonable choice for diffusion
    training; the default ``1`` keeps latents equal to pixel values.

    Args:
        spatial_factor: s >= 1; H and W must be multiples of it.
        temporal_factor: tf >= 1; T must be ``1 + tf*k``.
        shift, scale: normalisation as above (``scale != 0``).

    ``latent_channels = 3 * s * s * tf``. No parameters; works on any device and float dtype.
    """

    def __init__(self, spatial_factor: int = 4, temporal_factor: int = 1, *, shift: float = 0.0,
                 scale: float = 1.0):
        super().__init__()
        for name, v in (("spatial_factor", spatial_factor), ("temporal_factor", temporal_factor)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PatchVAE: {name} must be an int >= 1, got {v!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"PatchVAE: scale must be a non-zero finite number, got {scale!r}")
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = 3 * spatial_factor * spatial_factor * temporal_factor
        self.shift = float(shift)
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return (f"spatial_factor={self.spatial_factor}, temporal_factor={self.temporal_factor}, "
                f"latent_channels={self.latent_channels}, shift={self.shift}, scale={self.scale}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` -> ``[B, 3*s*s*tf, 1 + (T-1)/tf, H/s, W/s]`` (contiguous)."""
        _check_video(video, self.spatial_factor, self.temporal_factor)
        tf = self.temporal_factor
        if tf > 1:  # causal first group: frame 0 repeated tf times
            b, c, _, h, w = video.shape
            video = torch.cat([video[:, :, :1].expand(b, c, tf - 1, h, w), video], dim=2)
        return self._encode_groups(video)

    def _encode_groups(self, video: torch.Tensor) -> torch.Tensor:
        """Whole groups of ``tf`` frames ``[B, 3, tf*n, H, W]`` -> ``[B, C, n, H/s, W/s]``."""
        s, tf = self.spatial_factor, self.temporal_factor
        b, c, t, h, w = video.shape
        tl = t // tf
        x = video.reshape(b, c, tl, tf, h // s, s, w // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, self.latent_channels, tl, h // s, w // s)
        if self.shift != 0.0:
            x = x - self.shift
        if self.scale != 1.0:
            x = x * self.scale
        return x.contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, 3*s*s*tf, T', H', W']`` -> ``[B, 3, 1 + tf*(T'-1), H'*s, W'*s]`` (contiguous)."""
        return self._decode_groups(latent, first=True)

    def _decode_groups(self, latent: torch.Tensor, first: bool) -> torch.Tensor:
        """``first``: the latent starts the video, so its first frame decodes to one frame (the last
        copy of the causal first group); otherwise every latent frame decodes to ``tf`` frames."""
        _check_latent(latent, self.latent_channels)
        s, tf = self.spatial_factor, self.temporal_factor
        b, _, tl, hl, wl = latent.shape
        x = latent
        if self.scale != 1.0:
            x = x / self.scale
        if self.shift != 0.0:
            x = x + self.shift
        x = x.reshape(b, 3, tf, s, s, tl, hl, wl).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, 3, tl * tf, hl * s, wl * s)
        if tf > 1 and first:
            x = x[:, :, tf - 1:]
        return x.contiguous()

    def decode_stream(self) -> "DecodeStream":
        """Chunk-by-chunk decoding equal to one :meth:`decode` of the concatenated latents (exactly)."""
        return _PatchDecodeStream(self)

    def encode_stream(self) -> "EncodeStream":
        """Chunk-by-chunk encoding equal to one :meth:`encode` of the concatenated frames (exactly)."""
        return _GroupEncodeStream(self, group=self.temporal_factor,
                                  encode_first=lambda v: self.encode(v),
                                  encode_groups=lambda v: self._encode_groups(v))


class WanVAE(_CausalFrameCounts, nn.Module):
    """Adapter around diffusers' ``AutoencoderKLWan`` (Wan 2.1 / 2.2 VAEs).

    ``encode`` returns the posterior mean (deterministic; ``sample=True`` draws from the posterior
    instead), normalised per channel with the config's ``latents_mean``/``latents_std`` as Wan's
    pipelines do: ``z = (mu - mean) / std``. ``decode`` inverts that and clamps the output to
    ``[-1, 1]``. Factors come from the model config (Wan 2.1: 16 channels, 8x spatial, 4x temporal;
    Wan 2.2 5B: 48 channels, 16x spatial, 4x temporal).

    Args:
        model: an ``AutoencoderKLWan`` instance.
        dtype: compute dtype for encode/decode (inputs are cast; outputs come back as the input's
            dtype). ``None`` keeps the model's dtype.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "z_dim"):
            raise ValueError(f"WanVAE: model must be a diffusers AutoencoderKLWan, got {type(model).__name__}")
        self.model = model
        if dtype is not None:
            self.model.to(dtype)
        self.spatial_factor, self.temporal_factor, self.latent_channels = self.factors_from_config(cfg)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if mean.shape[1] != self.latent_channels or std.shape[1] != self.latent_channels:
            raise ValueError(
                f"WanVAE: config latents_mean/latents_std have {mean.shape[1]}/{std.shape[1]} entries, "
                f"z_dim is {self.latent_channels}")
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)

    @staticmethod
    def factors_from_config(cfg) -> tuple[int, int, int]:
        """``(spatial_factor, temporal_factor, latent_channels)`` of an ``AutoencoderKLWan`` config
        (its ``config`` or the dict of its config.json). From the architecture, not from
        ``scale_factor_*``: diffusers fills those with Wan 2.1's 4/8 whatever ``dim_mult`` and
        ``temperal_downsample`` say."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        tf = 2 ** sum(bool(d) for d in get("temperal_downsample", [False, True, True]))
        sf = 2 ** (len(get("dim_mult", [1, 2, 4, 4])) - 1) * (get("patch_size", None) or 1)
        return int(sf), int(tf), int(get("z_dim", 16))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, subfolder: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "WanVAE":
        """Load from a local diffusers folder: the VAE folder itself, or a pipeline folder with a ``vae/``
        subfolder (used automatically when ``path`` has no ``config.json`` but ``path/vae`` does).
        Nothing is downloaded."""
        try:
            from diffusers import AutoencoderKLWan
        except Exception as e:  # pragma: no cover - depends on the environment
            raise RuntimeError(f"WanVAE needs diffusers with AutoencoderKLWan (pip install 'pfp[wan]'): {e}") from e
        vae = cls(_load_diffusers_vae(AutoencoderKLWan, "WanVAE", path, subfolder, dtype))
        if device is not None:
            vae.to(device)
        return vae

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, video: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in ``[-1, 1]`` -> normalised latent ``[B, z_dim, 1 + (T-1)/tf, H/s, W/s]``.
        T is 1 + 4k whatever tf: ``AutoencoderKLWan`` encodes frame 0, then groups of 4 frames, and
        drops a last partial group (with tf = 2, T = 3 would give one latent frame, not two)."""
        t = video.shape[2] if isinstance(video, torch.Tensor) and video.dim() == 5 else 1
        if (t - 1) % _WAN_ENCODE_GROUP:
            raise ValueError(f"WanVAE.encode: video has T={t} frames; AutoencoderKLWan encodes frame 0 then groups "
                             f"of {_WAN_ENCODE_GROUP}, so T must be 1 + {_WAN_ENCODE_GROUP}k (e.g. "
                             f"{1 + (t - 1) // _WAN_ENCODE_GROUP * _WAN_ENCODE_GROUP} or "
                             f"{1 + -(-(t - 1) // _WAN_ENCODE_GROUP) * _WAN_ENCODE_GROUP}); encode_stream() "
                             f"takes any chunks")
        _check_video(video, self.spatial_factor, self.temporal_factor)
        out_dtype = video.dtype
        dist = self.model.encode(video.to(self._model_dtype())).latent_dist
        mu = dist.sample(generator=generator) if sample else dist.mode()
        z = (mu.float() - self.latents_mean.to(mu.device)) / self.latents_std.to(mu.device)
        return z.to(out_dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``[B, z_dim, T', H', W']`` -> video ``[B, 3, 1 + tf*(T'-1), H'*s, W'*s]``
        in ``[-1, 1]``."""
        _check_latent(latent, self.latent_channels)
        out_dtype = latent.dtype
        z = latent.float() * self.latents_std.to(latent.device) + self.latents_mean.to(latent.device)
        video = self.model.decode(z.to(self._model_dtype())).sample
        return video.clamp(-1, 1).to(out_dtype)

    # -- streaming ---------------------------------------------------------------------------
    def _streamable(self) -> bool:
        """Whether this diffusers version lets a stream hold the causal feature cache itself: the
        encoder/decoder take ``feat_cache``/``feat_idx`` (and the decoder ``first_chunk``), and
        tiling is off (tiled decoding splits space, which a per-frame cache does not follow)."""
        import inspect
        m = self.model
        if getattr(m, "use_tiling", False):
            return False
        try:
            enc = inspect.signature(m.encoder.forward).parameters
            dec = inspect.signature(m.decoder.forward).parameters
        except (TypeError, ValueError, AttributeError):
            return False
        return {"feat_cache", "feat_idx"} <= set(enc) and {"feat_cache", "feat_idx", "first_chunk"} <= set(dec)

    def _cache_slots(self, part: nn.Module) -> list:
        n = sum(type(mod).__name__ == "WanCausalConv3d" for mod in part.modules())
        return [None] * n

    def decode_stream(self) -> "DecodeStream":
        """Chunk-by-chunk decoding equal to one :meth:`decode` of the concatenated latents.

        Wan's decoder is causal: ``AutoencoderKLWan.decode`` itself runs one latent frame at a time,
        carrying each causal conv's last frames in a feature cache. The stream owns such a cache
        and makes the same calls, so chunked output equals a full decode up to float rounding of
        the per-frame 1x1x1 convs (the tests check it). Where the installed diffusers does not take
        an external cache (or tiling is on), it falls back to re-decoding everything so far (exact,
        but its cost grows with the history).
        """
        if not self._streamable():
            return _RecomputeDecodeStream(self)
        return _WanDecodeStream(self)

    def tiled_decode_stream(self, tiles: int = 2, split: int | None = None) -> "DecodeStream":
        """A :meth:`decode_stream` whose decoder runs its last up-blocks (from ``up_blocks[split]``
        on; by default the last two, at the two highest resolutions, where the activations are
        largest) in ``tiles`` x ``tiles`` spatial tiles, one at a time.

        The same frames as the untiled stream, up to float rounding: the part with the middle
        block's attention (which mixes the whole frame) runs on the whole frame, and each tile of
        the rest reads a halo as wide as that part's receptive field (every conv's radius, walked
        back through the upsamplings), so the pixels it keeps saw all they depend on; nothing is
        blended. Each tile carries its own causal cache for the tiled part, halo included, so
        streaming stays exact too. The tiled part's activations follow one tile; the whole frame
        at the split and the decoded frames are still held. Falls back, with a warning, to an
        untiled stream where the installed diffusers does not stream."""
        if not (isinstance(tiles, int) and not isinstance(tiles, bool) and tiles >= 1):
            raise ValueError(f"tiles must be an int >= 1, got {tiles!r}")
        if not self._streamable():
            import warnings
            warnings.warn("WanVAE.tiled_decode_stream: this diffusers' AutoencoderKLWan cannot stream with an "
                          "outside feature cache (or its use_tiling is on), so the decode runs untiled, re-decoding "
                          "the video so far at every chunk", RuntimeWarning, stacklevel=2)
            return _RecomputeDecodeStream(self)
        return _WanTiledDecodeStream(self, tiles, split)

    def encode_stream(self) -> "EncodeStream":
        """Chunk-by-chunk encoding (posterior mean) equal to one :meth:`encode` of the concatenated
        frames: frame 0 alone, then groups of 4 frames, as ``AutoencoderKLWan`` encodes, with the
        stream owning the encoder's causal feature cache. Frames of an incomplete group wait."""
        if not self._streamable():
            return _RecomputeEncodeStream(self)
        m = self.model
        cache = self._cache_slots(m.encoder)

        def run(groups: list) -> torch.Tensor:
            outs = []
            for g in groups:
                x = g.to(self._model_dtype())
                if getattr(m.config, "patch_size", None) is not None:
                    x = _wan_patchify(x, m.config.patch_size)
                outs.append(m.encoder(x, feat_cache=cache, feat_idx=[0]))
            enc = m.quant_conv(torch.cat(outs, dim=2))
            mu = enc[:, :self.latent_channels]
            return ((mu.float() - self.latents_mean.to(mu.device)) / self.latents_std.to(mu.device))

        return _GroupEncodeStream(self, group=_WAN_ENCODE_GROUP, encode_first=lambda v: run([v]),
                                  encode_groups=lambda v: run(list(v.split(_WAN_ENCODE_GROUP, dim=2))))


_WAN_ENCODE_GROUP = 4  # AutoencoderKLWan._encode feeds the encoder frame 0, then 4 frames at a time


def _load_diffusers_vae(model_class, who: str, path, subfolder, dtype):
    """A diffusers VAE from a local folder: the VAE's own, or a pipeline's with ``vae/`` (used when
    ``path`` has no config.json but ``path/vae`` does); frozen, in eval mode. Nothing is downloaded."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{who}.from_pretrained: {path!r} is not a local directory (no hub downloads here)")
    if subfolder is None and not os.path.isfile(os.path.join(path, "config.json")) \
            and os.path.isfile(os.path.join(path, "vae", "config.json")):
        subfolder = "vae"
    where = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise ValueError(f"{who}.from_pretrained: no config.json in {where!r}")
    kwargs = {"local_files_only": True, **({"subfolder": subfolder} if subfolder else {}),
              **({"torch_dtype": dtype} if dtype is not None else {})}
    return model_class.from_pretrained(path, **kwargs).eval().requires_grad_(False)


def _wan_patchify(x, patch_size):
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify
    return patchify(x, patch_size=patch_size)


def _wan_unpatchify(x, patch_size):
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    return unpatchify(x, patch_size=patch_size)


# ------------------------------------------------------------------------------------------------
# streams: chunk-by-chunk encoding and decoding that equal one call on the whole video
# ------------------------------------------------------------------------------------------------
class HunyuanVAE(_CausalFrameCounts, nn.Module):
    """Adapter around diffusers' ``AutoencoderKLHunyuanVideo`` (HunyuanVideo's VAE: 16 channels, 8x
    space, 4x time, causal frame counts).

    ``encode`` returns the posterior mean times the config's ``scaling_factor`` (as HunyuanVideo's
    pipelines scale latents); ``decode`` divides it back out and clamps to ``[-1, 1]``. Both run the
    whole input at once (diffusers' tiling and frame-wise tiling off), so they are the exact
    whole-video transforms.

    **Streams are windowed, not exact.** The encoder's and decoder's GroupNorms take their
    statistics over every frame, so no chunk can be decoded as the whole video would decode it
    without the whole video; carrying a cache (as :class:`WanVAE` does) cannot fix that. Its
    :meth:`decode_stream` decodes each chunk after the last ``warmup`` latent frames before it
    and keeps the new frames only (diffusers' own frame-wise decode likewise decodes overlapping
    windows); :meth:`encode_stream` does the same with ``warmup`` latent frames' worth of video.
    The cost per chunk stays constant. ``warmup=None`` re-runs the whole history each chunk: each
    chunk's frames are then those a whole decode of the video up to it gives, at a cost that grows
    with the video (the frames of earlier chunks still differ from a decode of the finished video,
    whose statistics include later frames).
    """

    def __init__(self, model: nn.Module, *, warmup: int | None = 2):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "scaling_factor") or not hasattr(cfg, "temporal_compression_ratio"):
            raise ValueError(f"HunyuanVAE: model must be a diffusers AutoencoderKLHunyuanVideo, got "
                             f"{type(model).__name__}")
        if warmup is not None and not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1):
            # a window's first latent frame decodes to one video frame (causal counts), so at least
            # one frame of warm-up is needed for a chunk's own frames to come out whole
            raise ValueError(f"HunyuanVAE: warmup must be an int >= 1 (latent frames) or None, got {warmup!r}")
        self.model = model
        # whole-input transforms: diffusers' spatial and frame-wise tiling blend overlapping tiles
        for flag in ("use_tiling", "use_framewise_encoding", "use_framewise_decoding"):
            if hasattr(model, flag):
                setattr(model, flag, False)
        self.spatial_factor = int(cfg.spatial_compression_ratio)
        self.temporal_factor = int(cfg.temporal_compression_ratio)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.warmup = warmup

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, subfolder: str | None = None,
                        dtype: torch.dtype | None = None, warmup: int | None = 2) -> "HunyuanVAE":
        """Load from a local diffusers folder (the VAE's, or a pipeline's with ``vae/``); nothing is
        downloaded."""
        from diffusers import AutoencoderKLHunyuanVideo
        return cls(_load_diffusers_vae(AutoencoderKLHunyuanVideo, "HunyuanVAE", path, subfolder, dtype), warmup=warmup)

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, video: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in ``[-1, 1]`` -> latent ``[B, 16, 1 + (T-1)/4, H/8, W/8]``."""
        _check_video(video, self.spatial_factor, self.temporal_factor)
        dist = self.model.encode(video.to(self._model_dtype())).latent_dist
        mu = dist.sample(generator=generator) if sample else dist.mode()
        return (mu.float() * self.scaling_factor).to(video.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, 16, T', H', W']`` -> video ``[B, 3, 1 + 4*(T'-1), 8*H', 8*W']`` in ``[-1, 1]``."""
        _check_latent(latent, self.latent_channels)
        z = (latent.float() / self.scaling_factor).to(self._model_dtype())
        return self.model.decode(z).sample.clamp(-1, 1).to(latent.dtype)

    @contextmanager
    def tiled_encoding(self):
        """While open, :meth:`encode` runs diffusers' own tiled encode: overlapping spatial tiles
        and frame windows, blended at their seams (the model's ``tile_sample_*`` sizes; diffusers'
        defaults are 256 px tiles at a 192 px stride and 17-frame windows at a 12-frame stride).
        The peak falls from the whole clip's activations to one tile's; each tile's GroupNorms see
        that tile only, so the latents approximate the whole-clip encode's. A training plan's
        ``encode="tiled"`` (:class:`pfp.offload.TrainPlacement`) uses it."""
        model = self.model
        saved = (model.use_tiling, model.use_framewise_encoding)
        model.use_tiling = model.use_framewise_encoding = True
        try:
            yield
        finally:
            model.use_tiling, model.use_framewise_encoding = saved

    def decode_stream(self) -> "DecodeStream":
        """Windowed chunk-by-chunk decoding (see the class)."""
        return _WindowDecodeStream(self, self.warmup)

    def encode_stream(self) -> "EncodeStream":
        """Windowed chunk-by-chunk encoding (see the class)."""
        return _WindowEncodeStream(self, self.warmup)


class DecodeStream:
    """Decodes a latent video chunk by chunk (:func:`decode_stream`).

    ``decode(latent)`` takes the next ``n >= 1`` latent frames ``[B, C, n, H', W']`` and returns
    their frames ``[B, 3, F, H'*s, W'*s]`` in ``[-1, 1]``: ``F = 1 + tf*(n-1)`` for the first chunk
    (the causal first latent frame is one video frame), ``F = tf*n`` after. Concatenated, the
    outputs equal ``vae.decode`` of the concatenated latents. One stream per video; the batch size
    and spatial size must not change.
    """

    def __init__(self, vae):
        self.vae = vae
        self.latent_frames_seen = 0
        self.video_frames_seen = 0
        self._shape = None

    def _check(self, latent: torch.Tensor) -> None:
        _check_latent(latent, self.vae.latent_channels)
        shape = (latent.shape[0], *latent.shape[3:])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"latent chunk has batch/size {shape} (B, H', W') but this stream started with "
                             f"{self._shape}; start a new stream for another video")
        self._shape = shape

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self._check(latent)
        out = self._decode(latent)
        self.latent_frames_seen += latent.shape[2]
        self.video_frames_seen += out.shape[2]
        return out

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class EncodeStream:
    """Encodes a video chunk by chunk (:func:`encode_stream`).

    ``encode(video)`` takes the next ``m >= 0`` frames ``[B, 3, m, H, W]`` and returns the latent
    frames they complete ``[B, C, k, H/s, W/s]`` (``k`` may be 0): frame 0 makes latent frame 0,
    then every ``tf`` frames one more. Frames of an unfinished group wait in the stream
    (``pending_frames``). Concatenated, the outputs equal ``vae.encode`` of the frames seen so far
    up to their last complete group.
    """

    def __init__(self, vae):
        self.vae = vae
        self.video_frames_seen = 0
        self.latent_frames_seen = 0
        self._shape = None

    def _check(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video chunk must be a [B, 3, m, H, W] tensor, got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"video chunk must be a float tensor in [-1, 1], got dtype {video.dtype}")
        s = self.vae.spatial_factor
        h, w = video.shape[-2:]
        if h % s or w % s:
            raise ValueError(f"video size {h}x{w} (HxW) is not a multiple of the VAE's spatial factor {s}")
        shape = (video.shape[0], h, w)
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"video chunk has batch/size {shape} (B, H, W) but this stream started with "
                             f"{self._shape}; start a new stream for another video")
        self._shape = shape

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check(video)
        self.video_frames_seen += video.shape[2]
        out = self._encode(video)
        self.latent_frames_seen += out.shape[2]
        return out

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = like.shape
        s = self.vae.spatial_factor
        return like.new_zeros(b, self.vae.latent_channels, 0, h // s, w // s)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _PatchDecodeStream(DecodeStream):
    def _decode(self, latent):
        return self.vae._decode_groups(latent, first=self.latent_frames_seen == 0)


class _WanDecodeStream(DecodeStream):
    def __init__(self, vae):
        super().__init__(vae)
        self._cache = vae._cache_slots(vae.model.decoder)

    def _decode(self, latent):
        vae, m = self.vae, self.vae.model
        out_dtype = latent.dtype
        z = latent.float() * vae.latents_std.to(latent.device) + vae.latents_mean.to(latent.device)
        x = m.post_quant_conv(z.to(vae._model_dtype()))
        outs = []
        for i in range(x.shape[2]):
            outs.append(self._decode_frame(x[:, :, i:i + 1], first=self.latent_frames_seen == 0 and i == 0))
        out = torch.cat(outs, dim=2)
        if getattr(m.config, "patch_size", None) is not None:
            out = _wan_unpatchify(out, m.config.patch_size)
        return out.clamp(-1, 1).to(out_dtype)

    def _decode_frame(self, x, first: bool):
        """One latent frame ``[B, C, 1, h, w]`` (after post_quant_conv) through the decoder."""
        return self.vae.model.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=first)


def _wan_cached_conv(conv, x, cache: list, idx: list):
    """``conv(x)`` for a WanCausalConv3d that reads and renews its slot of a feature cache, as
    ``WanDecoder3d.forward`` does for its ``conv_in`` and ``conv_out``."""
    from diffusers.models.autoencoders import autoencoder_kl_wan
    i = idx[0]
    keep = x[:, :, -getattr(autoencoder_kl_wan, "CACHE_T", 2):].clone()
    if keep.shape[2] < 2 and cache[i] is not None:   # one new frame: keep the last cached one before it
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return out


# the layers of Wan's up-blocks, whose reach _wan_tail_reach knows: per-position RMS norms and
# activations, the walked convs (and 1x1 shortcuts), nearest 2x upsampling, pixel-shuffle shortcuts
_WAN_TAIL_LAYERS = {"WanUpBlock", "WanResidualUpBlock", "WanResidualBlock", "WanRMS_norm", "WanCausalConv3d",
                    "WanResample", "WanUpsample", "DupUp3D", "Conv2d", "Sequential", "ModuleList", "Identity",
                    "Dropout", "SiLU"}


def _wan_tail_reach(decoder, split: int) -> tuple[int, int]:
    """``(halo, factor)`` of the decoder's part after ``up_blocks[:split]``: how many pixels of
    its input, on each side, an output pixel depends on, and how many output pixels one input
    pixel becomes per axis. Walked back from the output: each conv adds its spatial radius at its
    level; a nearest 2x upsampling maps a radius R after it to ceil(R / 2) before it (output
    pixel q reads input pixel q // 2). Residual shortcuts (1x1 convs, Wan 2.2's pixel-shuffling
    DupUp3D) reach no further than the main path."""
    steps, walked = [], set()   # ("conv", radius) or ("up", 2), in forward order; the convs seen

    def conv(c):
        k = c.kernel_size
        steps.append(("conv", max(k[-2], k[-1]) // 2))
        walked.add(id(c))
    for block in decoder.up_blocks[split:]:
        for resnet in block.resnets:
            conv(resnet.conv1)
            conv(resnet.conv2)
        up = getattr(block, "upsampler", None)
        if up is None and getattr(block, "upsamplers", None) is not None:
            up = block.upsamplers[0]
        if up is not None and up.mode in ("upsample2d", "upsample3d"):
            steps.append(("up", 2))
            conv(up.resample[1])
    conv(decoder.conv_out)
    # a layer this walk does not know (an attention, a norm over the frame, a conv elsewhere, an
    # upsampling other than 2x) would reach further than the halo: refuse rather than decode tiles
    # that silently differ from the whole frame
    tail = [m for block in decoder.up_blocks[split:] for m in block.modules()]
    unknown = sorted({type(m).__name__ for m in tail if type(m).__name__ not in _WAN_TAIL_LAYERS or (
        isinstance(m, (nn.Conv2d, nn.Conv3d)) and max(m.kernel_size[-2:]) > 1 and id(m) not in walked) or (
        isinstance(m, nn.Upsample) and tuple(m.scale_factor or ()) != (2.0, 2.0))})
    if unknown:
        raise ValueError(f"tiled decode: the decoder's up_blocks[{split}:] hold layers whose spatial reach is not "
                         f"known here ({', '.join(unknown)}); pass a later split")
    reach, factor = 0, 1
    for kind, n in reversed(steps):
        if kind == "conv":
            reach += n
        else:
            reach, factor = -(-reach // n), factor * n
    return reach, factor


class _WanTiledDecodeStream(_WanDecodeStream):
    """Wan's decoder with its last up-blocks run tile by tile: :meth:`WanVAE.tiled_decode_stream`."""

    def __init__(self, vae, tiles: int, split=None):
        super().__init__(vae)
        decoder = vae.model.decoder
        n_up = len(decoder.up_blocks)
        self.split = max(0, n_up - 2) if split is None else split
        if not (isinstance(self.split, int) and 0 <= self.split <= n_up):
            raise ValueError(f"split must be an int in 0..{n_up} (up-blocks decoded whole), got {split!r}")
        self.tiles = tiles
        self.halo, self.factor = _wan_tail_reach(decoder, self.split)
        self._tiles = None   # [(rows, cols, own rows, own cols, the tile's cache slots)] at the split level

    def _make_tiles(self, h: int, w: int) -> None:
        def spans(n):   # the blended tiles' spans with the halo as their margin; no tile without pixels of its own
            return [span for span in TiledDecodeStream._spans(n, self.tiles, self.halo) if span[3] > span[2]]
        slots = len(self._cache)
        self._tiles = [((y0, y1), (x0, x1), (ylo, yhi), (xlo, xhi), [None] * slots)
                       for y0, y1, ylo, yhi in spans(h) for x0, x1, xlo, xhi in spans(w)]

    def _decode_frame(self, x, first: bool):
        decoder = self.vae.model.decoder
        idx = [0]
        # conv_in, the middle block (its attention sees the whole frame) and the first up-blocks
        h = _wan_cached_conv(decoder.conv_in, x, self._cache, idx)
        h = decoder.mid_block(h, feat_cache=self._cache, feat_idx=idx)
        for block in decoder.up_blocks[:self.split]:
            h = block(h, feat_cache=self._cache, feat_idx=idx, first_chunk=first)
        if self._tiles is None:
            self._make_tiles(h.shape[3], h.shape[4])
        f, out = self.factor, None
        for (y0, y1), (x0, x1), (ylo, yhi), (xlo, xhi), cache in self._tiles:
            t, tidx = h[:, :, :, y0:y1, x0:x1], [idx[0]]   # each tile renews its own slots of the rest
            for block in decoder.up_blocks[self.split:]:
                t = block(t, feat_cache=cache, feat_idx=tidx, first_chunk=first)
            t = _wan_cached_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(t)), cache, tidx)
            if out is None:
                out = t.new_empty(*t.shape[:3], h.shape[3] * f, h.shape[4] * f)
            # the tile's own pixels; its halo covered everything they read
            out[..., ylo * f:yhi * f, xlo * f:xhi * f] = t[..., (ylo - y0) * f:(yhi - y0) * f,
                                                              (xlo - x0) * f:(xhi - x0) * f]
        return out


class _GroupEncodeStream(EncodeStream):
    """Frame 0 through ``encode_first``, then whole groups of ``group`` frames through
    ``encode_groups`` (which returns ``group / tf`` latent frames per group); the rest waits."""

    def __init__(self, vae, group: int, encode_first, encode_groups):
        super().__init__(vae)
        self.group, self._first, self._groups = group, encode_first, encode_groups
        self._pending = None

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else self._pending.shape[2]

    def _encode(self, video):
        buf = video if self._pending is None else torch.cat([self._pending, video], dim=2)
        outs = []
        if self.latent_frames_seen == 0 and buf.shape[2] >= 1:
            outs.append(self._first(buf[:, :, :1]))
            buf = buf[:, :, 1:]
        n = buf.shape[2] // self.group * self.group
        if n:
            outs.append(self._groups(buf[:, :, :n]))
        self._pending = buf[:, :, n:] if buf.shape[2] > n else None
        if not outs:
            return self._empty(video)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.to(video.dtype)


class _RecomputeDecodeStream(DecodeStream):
    """Any VAE: decode every latent frame so far and return the new frames (exact; cost grows)."""

    def __init__(self, vae):
        super().__init__(vae)
        self._latents = None

    def _decode(self, latent):
        self._latents = latent if self._latents is None else torch.cat([self._latents, latent], dim=2)
        return self.vae.decode(self._latents)[:, :, self.video_frames_seen:]


class _RecomputeEncodeStream(EncodeStream):
    """Any VAE: encode every complete group so far and return the new latent frames (exact; cost grows)."""

    def __init__(self, vae):
        super().__init__(vae)
        self._frames = None

    @property
    def pending_frames(self) -> int:
        n = 0 if self._frames is None else self._frames.shape[2]
        tf = self.vae.temporal_factor
        return 0 if n == 0 else (n - 1) % tf

    def _encode(self, video):
        self._frames = video if self._frames is None else torch.cat([self._frames, video], dim=2)
        n = self._frames.shape[2]
        tf = self.vae.temporal_factor
        if n == 0:
            return self._empty(video)
        usable = 1 + (n - 1) // tf * tf
        if 1 + (usable - 1) // tf <= self.latent_frames_seen:
            return self._empty(video)
        return self.vae.encode(self._frames[:, :, :usable])[:, :, self.latent_frames_seen:]


class _WindowDecodeStream(DecodeStream):
    """Decodes each chunk after the last ``warmup`` latent frames before it (None: all of them)
    and returns the chunk's own frames: constant cost, for VAEs whose decode is not causal."""

    def __init__(self, vae, warmup):
        super().__init__(vae)
        self.warmup, self._kept = warmup, None

    def _decode(self, latent):
        z = latent if self._kept is None else torch.cat([self._kept, latent], dim=2)
        out = self.vae.decode(z)
        if self._kept is not None:
            out = out[:, :, out.shape[2] - self.vae.temporal_factor * latent.shape[2]:]
        keep = z if self.warmup is None else z[:, :, max(0, z.shape[2] - self.warmup):]
        self._kept = keep if keep.shape[2] else None
        return out


class _WindowEncodeStream(EncodeStream):
    """Encodes each complete group of new frames after the video frames of the last ``warmup``
    latent frames before it (None: all), returning the new latent frames only."""

    def __init__(self, vae, warmup):
        super().__init__(vae)
        self.warmup, self._done, self._pending = warmup, None, None

    @property
    def pending_frames(self) -> int:
        return 0 if self._pending is None else self._pending.shape[2]

    def _encode(self, video):
        tf = self.vae.temporal_factor
        buf = video if self._pending is None else torch.cat([self._pending, video], dim=2)
        first = self._done is None
        n = (1 + (buf.shape[2] - 1) // tf * tf if buf.shape[2] else 0) if first else buf.shape[2] // tf * tf
        self._pending = buf[:, :, n:] if buf.shape[2] > n else None
        if n == 0:
            return self._empty(video)
        new = buf[:, :, :n]
        frames = new if first else torch.cat([self._done, new], dim=2)
        latent = self.vae.encode(frames)
        if not first:
            latent = latent[:, :, latent.shape[2] - n // tf:]
        # what the next chunk starts from: 1 + tf * warmup frames (a causal encoding's first frame
        # stands alone, so a window starts on one)
        keep = frames.shape[2] if self.warmup is None else min(frames.shape[2], 1 + tf * self.warmup)
        self._done = frames[:, :, frames.shape[2] - keep:]
        return latent


class TiledDecodeStream(DecodeStream):
    """Decodes the latent in ``tiles`` x ``tiles`` spatial tiles, each through its own stream
    (:func:`decode_stream`, so each keeps its own causal cache), and blends their overlaps.

    The decode's transient memory follows the tile, not the frame (about 1/tiles**2 of it, plus the
    overlaps). Streaming stays exact: chunk by chunk it equals one tiled decode of the whole latent.
    It is not the untiled decode: a VAE whose decoder mixes pixels across the frame (Wan's has a
    spatial attention in its middle block) decodes each tile without the rest, so edges and
    colours can shift; a decoder without such mixing (``PatchVAE``) gives the untiled frames up to
    rounding. Tiles overlap by ``overlap`` latent pixels on each inner edge; in the overlaps the
    two tiles are blended with linear weights. :func:`tiled_decode_stream` takes this one only for
    a VAE without an exact tiling of its own (Wan's has one: :meth:`WanVAE.tiled_decode_stream`).
    """

    def __init__(self, vae, tiles: int = 2, overlap: int = 2):
        super().__init__(vae)
        if not (isinstance(tiles, int) and tiles >= 1):
            raise ValueError(f"tiles must be an int >= 1, got {tiles!r}")
        if not (isinstance(overlap, int) and overlap >= 0):
            raise ValueError(f"overlap must be an int >= 0 (latent pixels), got {overlap!r}")
        self.tiles, self.overlap = tiles, overlap
        # [(latent y0, y1, x0, x1, weight [1, 1, 1, h, w], the tile's stream)], made at the first chunk
        self._tiles = None

    @staticmethod
    def _spans(n: int, tiles: int, overlap: int) -> list:
        """(start, end, inner start, inner end) per tile along an axis of n latent pixels."""
        bounds = [round(i * n / tiles) for i in range(tiles + 1)]
        out = []
        for i in range(tiles):
            lo, hi = bounds[i], bounds[i + 1]
            out.append((max(0, lo - overlap) if i else 0, min(n, hi + overlap) if i < tiles - 1 else n, lo, hi))
        return out

    @staticmethod
    def _ramp(start: int, end: int, inner_lo: int, inner_hi: int, s: int) -> torch.Tensor:
        """Pixel weights along one axis of a tile: 1 inside its own segment, falling linearly to 0
        across the overlap it shares with a neighbour."""
        n = (end - start) * s
        x = torch.arange(n, dtype=torch.float32) + 0.5 + start * s
        w = torch.ones(n)
        if inner_lo > start:   # shared with the tile before: ramps up over [start, 2*inner_lo - start)
            left = (x - start * s) / (2 * (inner_lo - start) * s)
            w = torch.minimum(w, left)
        if inner_hi < end:     # shared with the tile after
            right = (end * s - x) / (2 * (end - inner_hi) * s)
            w = torch.minimum(w, right)
        return w

    def _make_tiles(self, latent: torch.Tensor) -> None:
        s = self.vae.spatial_factor
        hs = self._spans(latent.shape[3], self.tiles, self.overlap)
        ws = self._spans(latent.shape[4], self.tiles, self.overlap)
        self._tiles = []
        for y0, y1, ylo, yhi in hs:
            wy = self._ramp(y0, y1, ylo, yhi, s)
            for x0, x1, xlo, xhi in ws:
                wx = self._ramp(x0, x1, xlo, xhi, s)
                weight = (wy[:, None] * wx[None, :]).to(latent.device)[None, None, None]
                self._tiles.append((y0, y1, x0, x1, weight, decode_stream(self.vae)))

    def _decode(self, latent):
        if self._tiles is None:
            self._make_tiles(latent)
        s = self.vae.spatial_factor
        out = total = None
        for y0, y1, x0, x1, weight, stream in self._tiles:
            part = stream.decode(latent[:, :, :, y0:y1, x0:x1]).float()
            if out is None:
                b, c, f = part.shape[:3]
                out = part.new_zeros(b, c, f, latent.shape[3] * s, latent.shape[4] * s)
                total = part.new_zeros(1, 1, 1, latent.shape[3] * s, latent.shape[4] * s)
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] += part * weight
            total[..., y0 * s:y1 * s, x0 * s:x1 * s] += weight
        return (out / total).to(latent.dtype)


def decode_stream(vae) -> DecodeStream:
    """A :class:`DecodeStream` for ``vae``: its own ``decode_stream()`` when it has one (PatchVAE,
    WanVAE: constant cost per chunk), else one that re-decodes the whole latent so far (exact)."""
    make = getattr(vae, "decode_stream", None)
    return make() if callable(make) else _RecomputeDecodeStream(vae)


def tiled_decode_stream(vae, tiles: int, overlap: int) -> DecodeStream:
    """A decode stream whose transient memory follows a ``tiles`` x ``tiles`` spatial tile: the
    VAE's own ``tiled_decode_stream(tiles)`` where it has one (:class:`WanVAE`: the untiled frames,
    up to rounding), else :class:`TiledDecodeStream` (tiles overlapping by ``overlap`` latent
    pixels, blended; approximate for a decoder that mixes the whole frame)."""
    make = getattr(vae, "tiled_decode_stream", None)
    return make(tiles) if callable(make) else TiledDecodeStream(vae, tiles, overlap)


def encode_stream(vae) -> EncodeStream:
    """An :class:`EncodeStream` for ``vae`` (its own ``encode_stream()`` when it has one, else one
    that re-encodes every frame so far; exact either way)."""
    make = getattr(vae, "encode_stream", None)
    return make() if callable(make) else _RecomputeEncodeStream(vae)
