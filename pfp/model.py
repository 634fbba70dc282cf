"""The model bundle: text encoder + backbone + compressor (+ VAE), built from a :class:`PFPConfig`.

The compressor's low-res branch reuses the backbone's patch embedding (one module, two owners),
so weights files store it once, under ``backbone.patch_embedding``.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import nn

from .config import _DTYPES, PFPConfig, check_component


class PFPModel(nn.Module):
    """Text encoder + backbone + compressor (+ a parameter-free VAE), built from a :class:`PFPConfig`."""

    def __init__(self, config: PFPConfig, backbone: Optional[nn.Module] = None, vae=None, text_encoder=None):
        super().__init__()
        from pfp.compressor import MemoryCompressor
        self.config = config
        self.text_encoder = text_encoder if text_encoder is not None else _build_text(config)
        self._vae = vae if vae is not None else _build_vae(config)
        self.backbone = backbone if backbone is not None else _build_backbone(
            config, latent_channels=self._vae.latent_channels, text_dim=self.text_encoder.dim)
        if self.backbone.latent_channels != self._vae.latent_channels:
            raise ValueError(f"the backbone takes {self.backbone.latent_channels} latent channels but the VAE makes "
                             f"{self._vae.latent_channels}; config dit and vae do not fit together")
        branches = [MemoryCompressor(self.backbone.patch_embed, self.backbone.latent_channels,
                                     self.backbone.inner_dim, rate=c.rate, hidden=tuple(c.compressor_hidden),
                                     kind=c.compressor_kind, lr_phase=c.lr_phase)
                    for c in config.branch_configs()]
        self.compressor = branches[0]
        # config.mix_compressors: more compressors, each with its own low-res input, whose contexts
        # join the first one's (pfp.mix_contexts); empty for one compressor
        self.mix = nn.ModuleList(branches[1:])
        # Wan 2.1 I2V reads the picture's CLIP states beside the text (config image_encoder)
        self.image_encoder = _build_image_encoder(config)
        image_dim = getattr(self.backbone, "image_dim", None)
        takes_image = image_dim is not None
        if takes_image != (self.image_encoder is not None):
            raise ValueError("config image_encoder: " + (
                "this backbone has an image cross-attention (Wan 2.1 I2V): give it its image encoder "
                "({\"kind\": \"clip\", \"path\": the pipeline folder})" if takes_image else
                "this backbone has no image cross-attention; use {\"kind\": \"none\"}"))
        if takes_image and self.image_encoder.dim != image_dim:
            raise ValueError(f"config image_encoder makes states of width {self.image_encoder.dim} but the "
                             f"backbone's image cross-attention takes {image_dim}")
        if config.cross_attention:   # PFP 3.4's cross-attention enhancement, zero-initialised
            if not hasattr(self.backbone, "add_memory_attention"):
                raise ValueError(f"config cross_attention: the {type(self.backbone).__name__} backbone cannot take it")
            self.backbone.add_memory_attention(int(config.compressor_hidden[-1]))

    @property
    def compressors(self) -> list:
        """Every compressor: :attr:`compressor`, then those of ``config.mix_compressors``."""
        return [self.compressor, *self.mix]

    def low_res_videos(self, hr_video, lr_video=None) -> list:
        """The low-res branch input of every compressor for a clip ``[..., 3, T, H, W]`` (what
        :func:`pfp.data.to_low_res` makes of it at each compressor's rate); ``lr_video``, when
        given, is the first one's (the dataset's ``"lr"``)."""
        from pfp.data import to_low_res
        frames = hr_video.shape[-3]
        size = tuple(hr_video.shape[-2:])
        return [lr_video if i == 0 and lr_video is not None else to_low_res(hr_video, c.video_spec(frames, size))
                for i, c in enumerate(self.config.branch_configs())]

    def compress(self, hr_latent, lr_latents, hr_frames=None):
        """The context of a whole history from every compressor: ``lr_latents`` holds one low-res
        latent per compressor (:attr:`compressors` order); one compressor's context as it is, several
        joined by :func:`pfp.mix_contexts`."""
        from pfp.compressor import mix_contexts
        comps = self.compressors
        if len(lr_latents) != len(comps):
            raise ValueError(f"compress needs one low-res latent per compressor ({len(comps)}), got {len(lr_latents)}")
        args = () if hr_frames is None else (hr_frames,)
        return mix_contexts([c(hr_latent, lr, *args) for c, lr in zip(comps, lr_latents)])

    def frozen_prefixes(self) -> tuple:
        """State-dict prefixes of the parts loaded from their own local paths and never trained (a
        ``"wan"`` VAE, a ``"umt5"`` text encoder). Weights files and checkpoints leave them out: the
        config names where they come from."""
        out = []
        if any(True for _ in self._vae.parameters()):
            out.append("_vae.")
        if getattr(self.text_encoder, "frozen", False):
            out.append("text_encoder.")
        if self.image_encoder is not None:
            out.append("image_encoder.")
        return tuple(out)

    def train(self, mode: bool = True):
        super().train(mode)
        for prefix in self.frozen_prefixes():  # frozen parts stay in eval mode (no dropout)
            getattr(self, prefix[:-1]).eval()
        return self

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

    def encode_image(self, picture):
        """picture ``[3, H, W]`` or ``[B, 3, H, W]`` in [-1, 1] -> image states ``[B, N, D]`` (Wan 2.1
        I2V's image cross-attention input), on the picture's device. The encoder runs where its
        weights are (memory plans leave it put). ValueError for a model without an image encoder."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder (config image_encoder is 'none')")
        where = next(self.image_encoder.parameters()).device
        return self.image_encoder(picture.to(where)).to(picture.device)

    def trainable_state_dict(self) -> dict:
        """State dict with the shared patch embedding stored once (under the backbone), without the
        frozen parts loaded from their own paths (:meth:`frozen_prefixes`)."""
        return {k: v for k, v in self.state_dict().items() if self.is_saved_key(k)}

    def is_saved_key(self, key: str) -> bool:
        """Whether a state-dict key belongs in weights files and checkpoints."""
        # every compressor's patch embedding is the backbone's, stored once, under the backbone
        if key.startswith(("compressor.", "mix.")) and ".patch_embed." in key:
            return False
        return not key.startswith(self.frozen_prefixes())


def _build_image_encoder(config: PFPConfig):
    check_component("image_encoder", config.image_encoder)
    spec = dict(config.image_encoder)
    if spec.get("kind", "none") == "none":
        return None
    from pfp.image_encoder import CLIPImageEncoder
    if "config" in spec:
        return CLIPImageEncoder.from_config(**spec["config"])
    return CLIPImageEncoder.from_pretrained(spec["path"], subfolder=spec.get("subfolder"),
                                            torch_dtype=_DTYPES[spec.get("dtype", "fp32")])


def _build_text(config: PFPConfig):
    check_component("text", config.text)
    t = dict(config.text)
    kind = t.pop("kind", "tiny")
    if kind == "umt5":
        # {"kind": "umt5", "path": local dir, "tokenizer_path": ..., "max_length": 512, "dtype": "bf16",
        #  "clean_prompts": true}
        from pfp.text import UMT5TextEncoder
        clean = t.get("clean_prompts", True)
        if not isinstance(clean, bool):
            raise ValueError(f"text.clean_prompts must be true or false, got {clean!r}")
        return UMT5TextEncoder.from_pretrained(t["path"], tokenizer_path=t.get("tokenizer_path"),
                                               max_length=int(t.get("max_length", 512)),
                                               dtype=_DTYPES[t["dtype"]] if "dtype" in t else None,
                                               clean_prompts=clean)
    if kind == "hunyuan":
        # {"kind": "hunyuan", "path": a HunyuanVideo pipeline dir (Llama + CLIP), "max_length": 256}
        from pfp.text import HUNYUAN_CROP_START, HunyuanTextEncoder
        return HunyuanTextEncoder.from_pretrained(t["path"], dtype=_DTYPES[t["dtype"]] if "dtype" in t else None,
                                                  max_length=int(t.get("max_length", 256)),
                                                  crop_start=int(t.get("crop_start", HUNYUAN_CROP_START)))
    from pfp.text import TinyTextEncoder
    return TinyTextEncoder(**t)


def _build_vae(config: PFPConfig):
    check_component("vae", config.vae)
    v = dict(config.vae)
    kind = v.pop("kind", "patch")
    if kind == "wan":
        # {"kind": "wan", "path": local diffusers AutoencoderKLWan dir (or pipeline dir), "dtype": "bf16"}
        from pfp.vae import WanVAE
        return WanVAE.from_pretrained(v["path"], subfolder=v.get("subfolder"),
                                      dtype=_DTYPES[v["dtype"]] if "dtype" in v else None)
    if kind == "hunyuan":
        # {"kind": "hunyuan", "path": local AutoencoderKLHunyuanVideo dir (or pipeline dir), "warmup": 2}
        from pfp.vae import HunyuanVAE
        return HunyuanVAE.from_pretrained(v["path"], subfolder=v.get("subfolder"),
                                          dtype=_DTYPES[v["dtype"]] if "dtype" in v else None,
                                          warmup=v.get("warmup", 2))
    from pfp.vae import PatchVAE
    return PatchVAE(**v)


def _build_backbone(config: PFPConfig, latent_channels: int, text_dim: int):
    from pfp.backbones import TinyDiT, TinyDiTConfig
    check_component("dit", config.dit)
    d = dict(config.dit)
    kind = d.pop("kind", "tiny")
    if kind == "wan":
        # {"kind": "wan", "path": local diffusers dir, "subfolder": "transformer", "dtype": "bf16"}
        # or {"kind": "wan", "config": {WanTransformer3DModel kwargs}} for a randomly initialised one;
        # "boundary": t (+ "subfolder_2", "lr_patch_embed") adds Wan 2.2 A14B's low-noise expert
        from pfp.backbones import WanBackbone
        mask = bool(d.get("mask_text_padding", False))

        def load(subfolder):
            if "path" in d:
                return WanBackbone.from_pretrained(d["path"], context_mode=config.context_mode, subfolder=subfolder,
                                                   torch_dtype=_DTYPES[d.get("dtype", "fp32")], mask_text_padding=mask)
            return WanBackbone.from_config(context_mode=config.context_mode, mask_text_padding=mask, **d["config"])

        sub = d.get("subfolder")
        if "path" in d and sub is None and not os.path.isfile(os.path.join(d["path"], "config.json")):
            sub = "transformer"
        bb = load(sub)
        wan_text = int(bb.transformer.config.text_dim)
        if d.get("boundary") is not None:  # Wan 2.2 A14B: a second expert for the low-noise steps
            from pfp.backbones.experts import ExpertPair
            bb = ExpertPair(bb, load(d.get("subfolder_2", "transformer_2")), float(d["boundary"]),
                            d.get("lr_patch_embed", "high"))
        if wan_text != text_dim:
            raise ValueError(f"config dit (Wan) takes text states of width {wan_text} but the text encoder "
                             f"makes {text_dim}; use a text encoder of that width")
        return bb
    if kind == "hunyuan_video":
        # {"kind": "hunyuan_video", "path": local dir (or pipeline dir), "dtype": "bf16", "guidance": 6.0}
        # or {"kind": "hunyuan_video", "config": {HunyuanVideoTransformer3DModel kwargs}}
        from pfp.backbones.hunyuan_video import DEFAULT_GUIDANCE, HunyuanVideoBackbone
        guidance = float(d.get("guidance", DEFAULT_GUIDANCE))
        if "path" in d:
            sub = d.get("subfolder")
            if sub is None and not os.path.isfile(os.path.join(d["path"], "config.json")):
                sub = "transformer"
            bb = HunyuanVideoBackbone.from_pretrained(d["path"], context_mode=config.context_mode, subfolder=sub,
                                                      torch_dtype=_DTYPES[d.get("dtype", "fp32")], guidance=guidance)
        else:
            bb = HunyuanVideoBackbone.from_config(context_mode=config.context_mode, guidance=guidance, **d["config"])
        if bb.text_dim != text_dim:
            raise ValueError(f"config dit (HunyuanVideo) takes text states of width {bb.text_dim} but the text "
                             f"encoder makes {text_dim}; use the hunyuan text encoder (Llama + CLIP) of that width")
        return bb
    return TinyDiT(TinyDiTConfig(latent_channels=latent_channels, text_dim=text_dim,
                                 context_mode=config.context_mode, **d))


def build_model(config: Optional[PFPConfig] = None) -> PFPModel:
    config = config or PFPConfig()
    config.check()
    return PFPModel(config)


__all__ = ["PFPModel", "build_model"]
