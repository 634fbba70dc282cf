"""The model bundle (text encoder + backbone + compressor + VAE), its config, and its weights.

A :class:`PFPConfig` fixes everything that shapes tensors or data: video size and frame rate,
chunk length, VAE, text encoder, backbone, compression rate and context mode. :func:`build_model`
makes a :class:`PFPModel` from it; :func:`save_weights` / :func:`load_weights` write and read a
safetensors file that carries the config as metadata. ``default.safetensors`` beside this file is
the built-in tiny model trained on the synthetic scenes (``default.json`` is its config and the
command that made it).

The compressor's low-res branch reuses the backbone's patch embedding (one module, two owners),
so the files store it once, under ``backbone.patch_embedding``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from .._io import save_safetensors_atomic, state_mismatch

WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "default.safetensors")
DEFAULT_CONFIG = os.path.join(WEIGHTS_DIR, "default.json")
FORMAT = "pfp.PFPModel/1"


@dataclass
class PFPConfig:
    """Everything that shapes the model and its data. Sizes are (height, width) in pixels."""

    video_size: tuple = (32, 32)
    fps: float = 8.0
    chunk_frames: int = 4                 # video frames generated per chunk
    rate: str = "2x2x2"                   # compression rate on top of the backbone's token grid
    compressor_hidden: tuple = (32, 64, 128)
    context_mode: str = "cached"
    vae: dict = field(default_factory=lambda: {"kind": "patch", "spatial_factor": 4, "temporal_factor": 1,
                                               "scale": 2.0})
    text: dict = field(default_factory=lambda: {"kind": "tiny", "dim": 64, "max_length": 24, "num_layers": 1})
    dit: dict = field(default_factory=lambda: {"kind": "tiny", "inner_dim": 128, "depth": 4, "num_heads": 4,
                                               "mlp_ratio": 3.0, "freq_dim": 64})
    sample_shift: float = 3.0             # sampling timestep shift (Wan's flow shift)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["video_size"] = list(self.video_size)
        d["compressor_hidden"] = list(self.compressor_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PFPConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PFPConfig keys {unknown}; valid keys are {sorted(known)}")
        d = dict(d)
        if "video_size" in d:
            d["video_size"] = tuple(d["video_size"])
        if "compressor_hidden" in d:
            d["compressor_hidden"] = tuple(d["compressor_hidden"])
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "PFPConfig":
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d.get("config", d))

    # -- derived -----------------------------------------------------------------------------
    @property
    def vae_spatial(self) -> int:
        return int(self.vae.get("spatial_factor", 8))

    @property
    def vae_temporal(self) -> int:
        return int(self.vae.get("temporal_factor", 1))

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_frames / self.fps

    def video_spec(self, frames: int):
        """The :class:`pfp.data.VideoSpec` for a clip of ``frames`` video frames (HR + LR branch)."""
        from pfp.data import VideoSpec
        from pfp.rates import parse_rate
        r = parse_rate(self.rate)
        h, w = self.video_size
        return VideoSpec(hr_size=(h, w), hr_fps=self.fps, hr_frames=frames,
                         lr_size=(h // r.h, w // r.w), lr_fps=self.fps / r.t)

    def check(self) -> None:
        """Raise ValueError when sizes, chunk length and rate do not fit together (says what to use)."""
        from pfp.rates import parse_rate, plan_inputs
        r = parse_rate(self.rate)
        h, w = self.video_size
        plan_inputs((w, h), self.fps, self.chunk_seconds, self.rate, vae_spatial=self.vae_spatial,
                    vae_temporal=self.vae_temporal, patch=(1, 2, 2))
        step = r.t * self.vae_temporal
        if self.vae_temporal != 1:
            raise ValueError(f"chunked generation needs a VAE with temporal factor 1 here (got {self.vae_temporal})")
        if self.chunk_frames % step:
            raise ValueError(f"chunk_frames={self.chunk_frames} is not a multiple of {step} (rate {self.rate} "
                             f"compresses time by {r.t}); use {max(step, self.chunk_frames // step * step)} "
                             f"or {(self.chunk_frames // step + 1) * step}")
        pad = 2 * r.h * self.vae_spatial, 2 * r.w * self.vae_spatial
        if h % pad[0] or w % pad[1]:
            raise ValueError(f"video_size {h}x{w} (HxW) does not fit rate {self.rate} with a {self.vae_spatial}x VAE "
                             f"and patch 2: height must be a multiple of {pad[0]} and width of {pad[1]}; use "
                             f"{max(pad[0], h // pad[0] * pad[0])}x{max(pad[1], w // pad[1] * pad[1])}")


class PFPModel(nn.Module):
    """Text encoder + backbone + compressor (+ a parameter-free VAE), built from a :class:`PFPConfig`."""

    def __init__(self, config: PFPConfig, backbone: Optional[nn.Module] = None, vae=None, text_encoder=None):
        super().__init__()
        from pfp.compressor import MemoryCompressor
        self.config = config
        self.text_encoder = text_encoder if text_encoder is not None else _build_text(config)
        self.backbone = backbone if backbone is not None else _build_backbone(config)
        self.compressor = MemoryCompressor(self.backbone.patch_embed, self.backbone.latent_channels,
                                           self.backbone.inner_dim, rate=config.rate,
                                           hidden=tuple(config.compressor_hidden))
        self._vae = vae if vae is not None else _build_vae(config)

    @property
    def vae(self):
        return self._vae

    @property
    def context_mode(self) -> str:
        return self.backbone.context_mode

    def encode_text(self, prompts):
        """prompts -> (states [B, L, D], mask [B, L])."""
        out = self.text_encoder(list(prompts))
        return out.tokens, out.mask

    def trainable_state_dict(self) -> dict:
        """State dict with the shared patch embedding stored once (under the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("compressor.patch_embed.")}


def _build_text(config: PFPConfig):
    from pfp.text import TinyTextEncoder
    t = dict(config.text)
    kind = t.pop("kind", "tiny")
    if kind != "tiny":
        raise ValueError(f"text encoder kind {kind!r} is not built from a config; pass text_encoder=")
    return TinyTextEncoder(**t)


def _build_vae(config: PFPConfig):
    from pfp.vae import PatchVAE
    v = dict(config.vae)
    kind = v.pop("kind", "patch")
    if kind != "patch":
        raise ValueError(f"VAE kind {kind!r} is not built from a config; pass vae=")
    return PatchVAE(**v)


def _build_backbone(config: PFPConfig):
    from pfp.backbones import TinyDiT, TinyDiTConfig
    d = dict(config.dit)
    kind = d.pop("kind", "tiny")
    if kind == "wan":
        # {"kind": "wan", "path": local diffusers dir, "subfolder": "transformer", "dtype": "bf16"}
        # or {"kind": "wan", "config": {WanTransformer3DModel kwargs}} for a randomly initialised one
        from pfp.backbones import WanBackbone
        if "path" in d:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d.get("dtype", "fp32")]
            return WanBackbone.from_pretrained(d["path"], context_mode=config.context_mode,
                                               subfolder=d.get("subfolder"), torch_dtype=dtype)
        if "config" in d:
            return WanBackbone.from_config(context_mode=config.context_mode, **d["config"])
        raise ValueError("dit kind 'wan' needs 'path' (a local diffusers checkpoint) or 'config'")
    if kind != "tiny":
        raise ValueError(f"backbone kind {kind!r} is unknown (tiny, wan); or pass backbone=")
    vae = _build_vae(config)
    text_dim = int(config.text.get("dim", 64))
    return TinyDiT(TinyDiTConfig(latent_channels=vae.latent_channels, text_dim=text_dim,
                                 context_mode=config.context_mode, **d))


def build_model(config: Optional[PFPConfig] = None) -> PFPModel:
    config = config or PFPConfig()
    config.check()
    return PFPModel(config)


def save_weights(model: PFPModel, path: str, dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None) -> None:
    """Write the model's weights (optionally cast, e.g. to bf16) with its config as metadata."""
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.trainable_state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    if extra:
        meta.update({k: json.dumps(v) for k, v in extra.items()})
    save_safetensors_atomic(state, path, meta)


def read_weights(path: str) -> tuple[dict, Optional[PFPConfig]]:
    """(tensors, config or None) of a :func:`save_weights` file."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    cfg = PFPConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
    return tensors, cfg


def load_state_checked(model: PFPModel, tensors: dict, source: str) -> None:
    """Copy tensors into the model; ValueError naming every missing / unexpected / misshapen tensor."""
    own = model.trainable_state_dict()
    missing, unexpected, mismatched = state_mismatch(own, tensors)
    wrong = sorted(f"{k} (checkpoint {have}, model {want})" for k, have, want in mismatched)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} with other shapes: {_few(wrong)}")
        if missing:
            parts.append(f"{len(missing)} missing: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        raise ValueError(f"checkpoint {source} is from another config; tensors that do not fit: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _few(names, n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


def load_weights(path: Optional[str] = None, config: Optional[PFPConfig] = None,
                 context_mode: Optional[str] = None) -> PFPModel:
    """Build the model a weights file describes (or ``config``) and load it. Default: the built-in model.

    ``context_mode`` must match the mode the weights were trained in (recorded in the file); a
    different one raises, since the two modes need their own training.
    """
    path = path or DEFAULT_WEIGHTS
    tensors, file_cfg = read_weights(path)
    cfg = config or file_cfg
    if cfg is None:
        raise ValueError(f"checkpoint {path} carries no config; pass config=")
    if context_mode is not None and context_mode != cfg.context_mode:
        raise ValueError(f"checkpoint {path} was trained with context_mode={cfg.context_mode!r}; "
                         f"--context-mode {context_mode!r} needs weights trained in that mode")
    model = build_model(cfg)
    load_state_checked(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, path)
    return model.eval()


__all__ = ["PFPConfig", "PFPModel", "build_model", "save_weights", "read_weights", "load_weights",
           "load_state_checked", "DEFAULT_WEIGHTS", "DEFAULT_CONFIG"]
