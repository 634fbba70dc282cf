"""Memory planner: where each part of a model lives so that every phase of a chunk fits a GPU budget.

``python -m pfp.memory --config wan22-ti2v-5b-480p --vram 12GiB [--history S] [--rate R] [--json]``

How it estimates. The real modules (the diffusers Wan transformer and VAE, transformers' UMT5, our
compressor; for :func:`trace_model`, a built model's own) run under ``FakeTensorMode`` (shapes and
dtypes, no storage, no weights read, no GPU), and each phase of one chunk runs through the real
code under :class:`_PeakMemory`, a dispatch mode that records the peak of the tensors the phase
creates. A phase's peak on the GPU is then:

    allowance + the weights resident in that phase (per the plan) + what stays resident across
    phases (context K/V, the VAE's causal cache) + the phase's traced transient peak

The phases of a generated chunk: ``text`` (prompt encoding), ``compress`` (the compressor's append),
``context_kv`` (the new tokens' K/V, attending to the cached ones; the old and new cache coexist
until the old is dropped), ``denoise`` (one sampler step, CFG batch 2) and ``decode`` (the VAE's
streamed decode, its causal cache included).

The allowance, a stated constant, covers what tensors don't show: the CUDA context and cuBLAS
workspaces (``ALLOWANCE_BYTES``) and the caching allocator's rounding and fragmentation
(``ALLOWANCE_FRACTION`` of the rest).

The choices, and the plan it picks: every combination of

- ``weights``: ``native`` (as loaded: bf16 for the presets), or ``fp8`` (the blocks' linear weights
  stored in float8, upcast per layer as they run: diffusers' layerwise casting);
- ``offload``: ``none``, or ``block`` (the transformer's blocks on the CPU, each brought in before it
  runs with the next one prefetched on a side stream: diffusers' block-level group offload);
- ``swap``: the VAE off the GPU while the transformer runs, and the transformer off it while the
  VAE decodes;
- ``text``: ``gpu`` (the encoder resident), ``free`` (on the GPU for the storyboard's prompts, which
  are encoded once, then freed) or ``cpu``;
- ``kv``: the context K/V in ``native`` dtype or ``fp8`` (per-token, per-head scales), or ``buffer``
  (native, read through per-layer persistent ``[context ; target]`` buffers instead of a
  concatenation per step: more memory, no per-step copy of the context);

is estimated, and the one that fits with the least estimated time lost to the choices themselves
(transfers at ``PCIE_BYTES_PER_S``, fp8 upcasts and per-step context copies at ``HBM_BYTES_PER_S``; half a prefetched block's
transfer assumed hidden behind compute) wins. A budget that nothing fits is refused with one line
naming the smallest budget that does.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import sys
import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from pfp.offload import DECODE_TILES, PLAN_VALUES, check_choices

GIB = 1 << 30
ALLOWANCE_BYTES = 768 << 20      # CUDA context (~500 MiB with torch's kernels loaded) + cuBLAS workspaces
ALLOWANCE_FRACTION = 0.05        # allocator rounding and fragmentation, of everything else
PCIE_BYTES_PER_S = 25e9          # host <-> device, pinned memory, PCIe 4 x16 in practice
DEVICE_FLOPS = 4e14              # bf16 matmuls at about half an H100's peak (A14B's K/V rebuilds)
HBM_BYTES_PER_S = 1e12           # on-device reads + writes (fp8 -> native upcasts)
TILE_OVERLAP = 4                 # blended tiles overlap by 4 latent pixels (VAEs without a tiling of their own)
TILED_DECODE_SECONDS = 0.1       # rough cost per chunk of decoding the overlaps twice, per extra tile a side (not measured)
PHASES = ("text", "compress", "context_kv", "denoise", "decode")


# ------------------------------------------------------------------------------------------------
# presets: the real models' architectures (no weights, no folder needed to plan)
# ------------------------------------------------------------------------------------------------
WAN22_5B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
WAN22_A14B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                              out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                              rope_max_seq_len=1024)   # each of A14B's two experts
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
WAN21_T2V_14B_TRANSFORMER = dict(WAN22_A14B_TRANSFORMER)   # Wan 2.1 T2V 14B: one expert of A14B's shape
# Wan 2.1 I2V 14B: 36 input channels (latent, 4 mask, 16 image latent), CLIP's states through added K/V
WAN21_I2V_14B_TRANSFORMER = dict(WAN22_A14B_TRANSFORMER, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")   # its image encoder
HUNYUAN_VIDEO_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                 num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                 patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                 text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                 rope_axes_dim=(16, 56, 56))
HUNYUAN_VIDEO_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
                         temporal_compression_ratio=4)
# HunyuanVideo's text encoders: the text part of llava-llama-3-8b, and CLIP ViT-L/14's text model
LLAVA_LLAMA3_8B = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@dataclass(frozen=True)
class Preset:
    """A real model's shapes: its transformer, VAE and text encoder configs, and the video it makes."""

    name: str
    video_size: tuple          # (height, width)
    fps: float
    chunk_frames: int          # video frames per chunk (1 s)
    rate: str
    transformer: dict = field(default_factory=lambda: dict(WAN22_5B_TRANSFORMER))
    vae: dict = field(default_factory=lambda: dict(WAN22_VAE))
    text: dict = field(default_factory=lambda: dict(UMT5_XXL))
    text_length: int = 512
    compressor_hidden: tuple = (64, 128, 256, 512)
    experts: int = 1              # 2: a high-noise and a low-noise expert of this transformer (A14B)
    boundary: float = 0.875       # the timestep from which the high-noise expert denoises
    family: str = "wan"           # "wan" (Wan transformer, VAE, UMT5) or "hunyuan_video" (its own three)
    image_encoder: Optional[dict] = None   # CLIPVisionConfig keys of an I2V model's image encoder


def preset_config(p: "Preset", model_dir: str):
    """The :class:`pfp.config.PFPConfig` that runs preset ``p`` from a local diffusers pipeline folder
    (``transformer/`` (and ``transformer_2/`` for two experts), ``vae/``, ``text_encoder/`` and
    ``tokenizer/``), all in bf16, cached context, with Wan's sampling defaults (shift 5, CFG 5).
    Nothing is downloaded; ``config.check()`` names what the folder lacks."""
    from pfp.config import PFPConfig
    if p.family == "hunyuan_video":
        # HunyuanVideoPipeline's defaults: flow shift 7, embedded guidance 6 with the sampler's CFG off
        return PFPConfig(video_size=tuple(p.video_size), fps=p.fps, chunk_frames=p.chunk_frames, rate=p.rate,
                         compressor_hidden=tuple(p.compressor_hidden), context_mode="cached",
                         vae={"kind": "hunyuan", "path": model_dir, "subfolder": "vae", "dtype": "bf16"},
                         text={"kind": "hunyuan", "path": model_dir, "max_length": p.text_length, "dtype": "bf16"},
                         dit={"kind": "hunyuan_video", "path": model_dir, "subfolder": "transformer", "dtype": "bf16"},
                         sample_shift=7.0, sample_cfg=1.0)
    dit = {"kind": "wan", "path": model_dir, "subfolder": "transformer", "dtype": "bf16"}
    if p.experts == 2:
        dit.update(boundary=p.boundary, subfolder_2="transformer_2")
    image = ({"kind": "clip", "path": model_dir, "subfolder": "image_encoder", "dtype": "bf16"}
             if p.image_encoder is not None else {"kind": "none"})
    return PFPConfig(video_size=tuple(p.video_size), fps=p.fps, chunk_frames=p.chunk_frames, rate=p.rate,
                     compressor_hidden=tuple(p.compressor_hidden), context_mode="cached", image_encoder=image,
                     vae={"kind": "wan", "path": model_dir, "subfolder": "vae", "dtype": "bf16"},
                     text={"kind": "umt5", "path": model_dir, "max_length": p.text_length, "dtype": "bf16"},
                     dit=dit, sample_shift=5.0, sample_cfg=5.0)


def config_from_arg(value: str, model_dir: Optional[str], rate: Optional[str] = None, flag: str = "--config"):
    """``--config``: a preset's name (with ``--model-dir``, :func:`preset_config`) or a config JSON
    file; ``rate`` (``--rate``) replaces its compression rate. ValueError naming the flag: a preset
    without a folder, a folder that is not one, a missing file, a bad rate."""
    from pfp.config import PFPConfig
    if is_preset(value):
        if not model_dir:
            raise ValueError(f"{flag} {value} is a preset: it needs --model-dir DIR, a local diffusers pipeline "
                             f"folder (transformer/, vae/, text_encoder/, tokenizer/); nothing is downloaded")
        if not os.path.isdir(model_dir):
            raise ValueError(f"--model-dir {model_dir}: no such folder")
        config = preset_config(preset(value, rate), model_dir)
    else:
        if model_dir:
            raise ValueError(f"--model-dir goes with a preset {flag} ({', '.join(PRESETS)}); a config file names "
                             f"its own paths")
        if not os.path.isfile(value):
            raise ValueError(f"{flag} {value}: no such file, and not a preset ({', '.join(PRESETS)})")
        config = PFPConfig.load(value)
        if rate is not None:
            _check_rate(rate)
            config.rate = rate
        try:
            config.check()
        except ValueError as exc:   # what is wrong, and where it came from
            msg = str(exc)
            raise ValueError(msg if value in msg else f"{flag} {value}: {msg}") from None
        return config
    config.check()
    return config


PRESETS = {
    "wan22-ti2v-5b-480p": Preset("wan22-ti2v-5b-480p", (480, 832), 24.0, 24, "4x4x2"),
    "wan22-ti2v-5b-720p": Preset("wan22-ti2v-5b-720p", (704, 1280), 24.0, 24, "4x4x2"),
    # Wan 2.2 T2V-A14B: two 14 B experts, Wan 2.1's 16-channel 8x VAE, 16 fps
    "wan22-t2v-a14b-480p": Preset("wan22-t2v-a14b-480p", (480, 832), 16.0, 16, "4x4x2",
                                  transformer=dict(WAN22_A14B_TRANSFORMER), vae=dict(WAN21_VAE), experts=2),
    "wan22-t2v-a14b-720p": Preset("wan22-t2v-a14b-720p", (720, 1280), 16.0, 16, "4x4x2",
                                  transformer=dict(WAN22_A14B_TRANSFORMER), vae=dict(WAN21_VAE), experts=2),
    # Wan 2.1 T2V 14B: one 14 B transformer, the 16-channel 8x VAE, 16 fps
    "wan21-t2v-14b-480p": Preset("wan21-t2v-14b-480p", (480, 832), 16.0, 16, "4x4x2",
                                 transformer=dict(WAN21_T2V_14B_TRANSFORMER), vae=dict(WAN21_VAE)),
    "wan21-t2v-14b-720p": Preset("wan21-t2v-14b-720p", (720, 1280), 16.0, 16, "4x4x2",
                                 transformer=dict(WAN21_T2V_14B_TRANSFORMER), vae=dict(WAN21_VAE)),
    # Wan 2.1 I2V 14B (480p): the 14 B transformer with image cross-attention, CLIP ViT-H/14 beside UMT5
    "wan21-i2v-14b-480p": Preset("wan21-i2v-14b-480p", (480, 832), 16.0, 16, "4x4x2",
                                 transformer=dict(WAN21_I2V_14B_TRANSFORMER), vae=dict(WAN21_VAE),
                                 image_encoder=dict(CLIP_VIT_H)),
    # HunyuanVideo 13 B: 24 fps, its 16-channel 8x VAE, Llama (256 prompt tokens) + CLIP text
    "hunyuanvideo-13b-480p": Preset("hunyuanvideo-13b-480p", (480, 848), 24.0, 24, "4x4x2",
                                    transformer=dict(HUNYUAN_VIDEO_TRANSFORMER), vae=dict(HUNYUAN_VIDEO_VAE),
                                    text=dict(LLAVA_LLAMA3_8B), text_length=256, family="hunyuan_video"),
    "hunyuanvideo-13b-720p": Preset("hunyuanvideo-13b-720p", (720, 1280), 24.0, 24, "4x4x2",
                                    transformer=dict(HUNYUAN_VIDEO_TRANSFORMER), vae=dict(HUNYUAN_VIDEO_VAE),
                                    text=dict(LLAVA_LLAMA3_8B), text_length=256, family="hunyuan_video"),
}
PRESET_ALIASES = {"wan22-a14b-480p": "wan22-t2v-a14b-480p", "wan22-a14b-720p": "wan22-t2v-a14b-720p"}


def _check_rate(rate: str) -> None:
    """ValueError naming ``--rate`` when it is not a compression rate."""
    from pfp.rates import parse_rate
    try:
        parse_rate(rate)
    except ValueError as exc:
        raise ValueError(f"--rate {rate}: {exc}") from None


def is_preset(name) -> bool:
    """Whether ``name`` is a preset's name or one of its aliases."""
    return name in PRESETS or name in PRESET_ALIASES


def preset(name: str, rate: Optional[str] = None) -> Preset:
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"--config {name!r} is not a preset; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if rate is not None:
        _check_rate(rate)
        p = Preset(**{**asdict(p), "rate": rate, "video_size": tuple(p.video_size),
                      "compressor_hidden": tuple(p.compressor_hidden)})
    return p


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, name: str = "--vram") -> int:
    """``"12GiB"``, ``"8 GB"``, ``"512MiB"`` -> bytes. A unit is required; the value must be > 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be a positive size with a unit (B, KB, MB, GB, KiB, MiB, GiB, ...), "
                         f"e.g. 12GiB; got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"{name} must be > 0 (at least 1 byte), got {text!r}")
    return value


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What the trace found, in bytes (weights at their traced dtype, bf16 for the presets)."""

    target_tokens: int
    context_tokens: int
    transformer: int              # all transformer weights
    transformer_linear: int       # of which the blocks' linear weights (what fp8 stores in one byte each)
    transformer_linear_fp8: int   # those weights' bytes in fp8
    largest_block: int
    largest_linear: int           # one linear weight, native (what layerwise casting upcasts at a time)
    blocks: int                   # all block weights (what block offload moves)
    vae: int
    text: int
    compressor: int               # its own weights (the patch embedding is the transformer's)
    layers: int
    kv: int                       # the context K/V of the whole history, all layers
    kv_fp8: int                   # the same in fp8, scales included
    vae_cache: int                # the VAE's causal cache between chunks
    transient: dict               # phase -> traced peak of what the phase creates
    experts: int = 1              # 2: Wan 2.2 A14B's pair (the weights and K/V above are both experts')
    vae_cache_tiled: int = 0      # the causal caches of a 2x2 tiled decode (pfp.vae.tiled_decode_stream)
    vae_cache_tiled4: int = 0     # ... and of a 4x4 one
    expert: int = 0               # the larger expert's weights, less the patch embedding the compressor shares
    # the per-layer [context ; target] K/V buffers at the CFG batch (kv="buffer": what each step's
    # concatenation would write); 0 where the backbone takes none (joint mode, HunyuanVideo)
    kv_buffers: int = 0
    # with a sliding window in cached mode, the history's K/V without the window's tokens (both
    # experts'): under expert_kv="switch" generate holds the history cache beside the windowed one
    kv_history: int = 0
    kv_history_fp8: int = 0


class _PeakMemory(TorchDispatchMode):
    """Live bytes of the storages that ops create under it, and their peak. A storage counts once,
    from the op that made it until it is freed; storages that existed before (weights, inputs, the
    previous cache) are resident, not counted. Works on fake tensors: their storages have sizes.
    (PyTorch's MemTracker does this per module too, but refuses modules called more than once in
    one trace, as the VAE's causal decode does.)

    ``releasable``: a callable giving resident tensors that the traced call may drop (a causal
    cache it renews slot by slot); when one is freed its bytes leave ``live``, so what replaces it
    is not counted on top of it. Only its storages are kept, weakly."""

    def __init__(self, releasable=None):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for t in (releasable() if releasable is not None else ()):
            st = t.untyped_storage()
            if st not in self._seen:
                self._seen[st] = weakref.ref(st, functools.partial(self._freed, st.nbytes()))

    def _freed(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = None  # resident: existed before the trace
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    nbytes = st.nbytes()
                    self._seen[st] = weakref.ref(st, functools.partial(self._freed, nbytes))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def _tracked_peak(fn, releasable=None) -> int:
    """Peak bytes of the tensors ``fn`` creates (activations and temporaries), traced, less what it
    frees of ``releasable()`` by then (see :class:`_PeakMemory`)."""
    tracker = _PeakMemory(releasable)
    with tracker:
        fn()
    return int(tracker.peak)


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _linear_bytes(module: nn.Module, largest: bool = False) -> int:
    sizes = [m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Linear)]
    return (max(sizes, default=0)) if largest else sum(sizes)


@dataclass
class PresetParts:
    """A preset's full-size parts, as :func:`preset_parts` builds them."""

    backbone: nn.Module
    vae: nn.Module
    encoders: list        # the text encoder's models, then an I2V model's image encoder
    text_dim: int         # the width of the text states the backbone reads
    encode_text: object   # batch -> text states [batch, L, text_dim], from all-zero token ids


def preset_parts(p: Preset) -> PresetParts:
    """The transformer (both experts for a pair), VAE and encoders of preset ``p``, with random
    weights in the default dtype, on the default device or fake mode the caller set (the planners
    build them on fake tensors). The text encoder runs on token ids alone: no tokenizer needed."""
    if p.family == "hunyuan_video":
        from diffusers import AutoencoderKLHunyuanVideo
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from pfp.backbones.hunyuan_video import HunyuanVideoBackbone, pack_text
        from pfp.text import HUNYUAN_CROP_START
        from pfp.vae import HunyuanVAE
        llama, clip = LlamaModel(LlamaConfig(**p.text)), CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))

        def encode_text(batch: int):
            # Llama reads the prompt template's system tokens too: they are cut after it runs
            ids = torch.zeros(batch, HUNYUAN_CROP_START + p.text_length, dtype=torch.long)
            states = llama(input_ids=ids, output_hidden_states=True).hidden_states[-3][:, HUNYUAN_CROP_START:]
            clip_ids = torch.zeros(batch, CLIP_L_TEXT["max_position_embeddings"], dtype=torch.long)
            return pack_text(states, None, clip(clip_ids).pooler_output)[0]
        return PresetParts(HunyuanVideoBackbone.from_config(context_mode="cached", **p.transformer),
                           HunyuanVAE(AutoencoderKLHunyuanVideo(**p.vae)), [llama, clip], int(p.text["hidden_size"]),
                           encode_text)
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from pfp.backbones import WanBackbone
    from pfp.vae import WanVAE
    backbone = WanBackbone.from_config(context_mode="cached", **p.transformer)
    if p.experts == 2:
        from pfp.backbones.experts import ExpertPair
        backbone = ExpertPair(backbone, WanBackbone.from_config(context_mode="cached", **p.transformer), p.boundary)
    umt5 = UMT5EncoderModel(UMT5Config(**p.text))
    encoders = [umt5]
    if p.image_encoder is not None:   # I2V: the image encoder's phase is the text encoder's
        from transformers import CLIPVisionConfig, CLIPVisionModel
        encoders.append(CLIPVisionModel(CLIPVisionConfig(**p.image_encoder)))
    return PresetParts(backbone, WanVAE(AutoencoderKLWan(**p.vae)), encoders, int(p.text["d_model"]),
                       lambda batch: umt5(input_ids=torch.zeros(batch, p.text_length, dtype=torch.long))
                       .last_hidden_state)


def trace_preset(p: Preset, history_seconds: float, dtype: torch.dtype = torch.bfloat16, cfg_batch: int = 2) -> Trace:
    """Trace one chunk of preset ``p`` after ``history_seconds`` of history, in ``dtype``, under
    FakeTensorMode (seconds on a CPU; nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pfp.compressor import MemoryCompressor

    previous = torch.get_default_dtype()
    # Token positions are real (tiny) tensors: the backbone reads them to find the context's frames.
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        torch.set_default_dtype(dtype)  # modules are built in dtype without ever holding fp32 copies
        try:
            parts = preset_parts(p)
            backbone = parts.backbone
            compressor = MemoryCompressor(backbone.patch_embed, backbone.latent_channels, backbone.inner_dim,
                                          rate=p.rate, hidden=p.compressor_hidden)
        finally:
            torch.set_default_dtype(previous)
        encoders = parts.encoders[0] if len(parts.encoders) == 1 else nn.ModuleList(parts.encoders)
        return _trace_parts(backbone, compressor, parts.vae, encoders, lambda: parts.encode_text(1), p.video_size,
                            p.fps, p.chunk_frames, history_seconds, cfg_batch)


def trace_model(model: nn.Module, history_seconds: float, size: Optional[tuple] = None, cfg_batch: int = 2) -> Trace:
    """Trace one chunk of a built :class:`pfp.weights.PFPModel` after ``history_seconds`` of history,
    at ``size`` (H, W; default the config's ``video_size``), under FakeTensorMode: its real modules
    run on fake tensors, so no weight is read and nothing is allocated. Where the model's weights
    are (CPU, a device, or parked by a :class:`pfp.offload.Placement`) does not matter."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    config = model.config
    # the encoders' phase holds the text encoder, and Wan 2.1 I2V's image encoder beside it
    encoders = model.text_encoder if getattr(model, "image_encoder", None) is None else \
        nn.ModuleList([model.text_encoder, model.image_encoder])
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        return _trace_parts(model.backbone, model.compressor, model.vae, encoders,
                            lambda: model.text_encoder([""]).tokens, tuple(size or config.video_size),
                            float(config.fps), int(config.chunk_frames), history_seconds, cfg_batch,
                            mix=list(model.mix), window=config.sliding_window)


def _trace_parts(backbone, compressor, vae, text_module, run_text, video_size: tuple,
                 fps: float, chunk_frames: int, history_seconds: float, cfg_batch: int,
                 mix: Sequence = (), window: int = 0) -> Trace:
    """The phases of one chunk of these parts, traced; called under a FakeTensorMode. ``run_text``
    encodes one prompt and returns its states ``[1, L, D]`` (whose shape the denoise step takes).
    ``mix``: more compressors whose tokens join the context; ``window``: latent frames of the
    sliding window (pfp.window), whose tokens join it too; the cross-attention's per-block K/V of
    the compressor features count with the context K/V."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from pfp.backbones.wan_style import ContextKV
    from pfp.compressor import Context
    from pfp.vae import decode_stream, tiled_decode_stream

    dtype = backbone.compute_dtype
    s, tf = vae.spatial_factor, vae.temporal_factor
    h, w = video_size[0] // s, video_size[1] // s
    n = chunk_frames // tf
    c = backbone.latent_channels
    chunk = torch.randn(1, c, n, h, w, dtype=compressor._param_ref().dtype)
    target_tokens = math.prod(backbone.token_grid(n, h, w))
    history_chunks = max(0, int(round(history_seconds * fps / chunk_frames)))

    # the context: the history's tokens, as the stream makes them, plus one chunk's new ones
    hist_t = history_chunks * n
    comps = [compressor, *mix]
    context_tokens = sum(math.prod(c.token_grid((hist_t, h, w))) for c in comps) if hist_t else 0
    new_tokens = sum(math.prod(c.token_grid((hist_t + n, h, w))) for c in comps) - context_tokens
    window_tokens = 0
    if window:   # rebuilt each chunk over the history, beside the compressed tokens (generate holds
        # the history's own cache as the head of the windowed one: one copy of their K/V, but for
        # expert_kv="switch", whose history cache keeps its own: Trace.kv_history)
        pt = backbone.patch_size[0]
        window_tokens = math.prod(backbone.token_grid(min(window, hist_t + n) // pt * pt, h, w))
        new_tokens += window_tokens
    # cross-attention over the compressor features: one K and V per feature (HR token) and block
    features = (sum(math.prod(c.token_grid((hist_t + n, h, w))) for c in comps if c.has_features)
                if getattr(backbone, "has_memory_attention", False) else 0)
    inner, layers = backbone.inner_dim, len(backbone.blocks)
    heads, head_dim = backbone.num_heads, backbone.head_dim
    elem = torch.tensor([], dtype=dtype).element_size()

    text_states = []
    transient = {"text": _tracked_peak(lambda: text_states.append(run_text()))}
    text_shape = tuple(text_states.pop().shape[1:])
    lr_chunk = torch.randn(compressor.expected_lr_shape(chunk.shape), dtype=chunk.dtype)
    transient["compress"] = _tracked_peak(lambda: compressor.stream(1).append(chunk, lr_chunk))

    def positions(tokens: int, t: float = 0.0):
        with unset_fake_temporarily():  # real: the backbone reads them eagerly
            return torch.full((tokens, 3), t)

    from pfp.backbones.experts import ExpertKV, ExpertPair
    experts = 2 if isinstance(backbone, ExpertPair) else 1
    layers //= experts   # per expert (ExpertPair.blocks lists both experts')

    def fake_cache(tokens: int, fp8: bool = False):
        if tokens == 0:
            return None
        shape, store = (1, tokens, heads, head_dim), (torch.float8_e4m3fn if fp8 else dtype)

        def one():
            kv = [[torch.empty(shape, dtype=store) for _ in range(layers)] for _ in range(2)]
            scales = [[torch.empty(*shape[:3], 1) for _ in range(layers)] for _ in range(2)] if fp8 else [None, None]
            return ContextKV(kv[0], kv[1], positions(tokens), None, scales[0], scales[1])
        return ExpertKV(one(), one()) if experts == 2 else one()

    t0 = float(hist_t)
    new_ctx = Context(torch.randn(1, new_tokens, inner, dtype=dtype), positions(new_tokens, t0))
    if backbone.context_mode == "cached":
        old, old8 = fake_cache(context_tokens), fake_cache(context_tokens, fp8=True)
        transient["context_kv"] = _tracked_peak(lambda: backbone.cache_context(new_ctx, old))
        transient["context_kv_fp8"] = _tracked_peak(lambda: backbone.cache_context(new_ctx, old8, kv_storage="fp8"))
        context = fake_cache(context_tokens + new_tokens)
    else:  # joint mode: no cache; the context tokens go through every block at every step
        transient["context_kv"] = transient["context_kv_fp8"] = 0
        context = Context(torch.randn(1, context_tokens + new_tokens, inner, dtype=dtype),
                          positions(context_tokens + new_tokens))
    x = torch.randn(cfg_batch, c, n, h, w, dtype=dtype)
    text = torch.randn(cfg_batch, *text_shape, dtype=dtype)
    ts = torch.full((cfg_batch,), 0.5)
    net, net_context = backbone.route(1.0, context) if experts == 2 else (backbone, context)  # one step's expert
    extra = {}   # what a Wan I2V backbone reads beside the latent: its condition channels, image states
    if getattr(backbone, "condition_channels", 0):
        extra["condition"] = torch.randn(1, backbone.condition_channels, n, h, w, dtype=dtype)
    if getattr(backbone, "image_dim", None) is not None:   # 257: CLIP ViT-H/14's tokens of a 224-pixel picture
        extra["image"] = torch.randn(1, 257, backbone.image_dim, dtype=dtype)
    transient["denoise"] = _tracked_peak(lambda: net(x, ts, text, net_context, t_start=t0, **extra))

    decoder = decode_stream(vae)
    decoder.decode(chunk)  # the first chunk fills the causal cache
    cache_bytes = _decoder_cache_bytes(decoder)
    # each causal conv's renewed cache replaces the one it read, which is resident (vae_cache)
    transient["decode"] = _tracked_peak(lambda: decoder.decode(chunk), lambda: _decoder_cache_tensors(decoder))
    cache_tiled = {}
    for choice, tiles in DECODE_TILES.items():
        if tiles == 1:
            continue
        tiled = tiled_decode_stream(vae, tiles, TILE_OVERLAP)
        tiled.decode(chunk)
        cache_tiled[tiles] = _decoder_cache_bytes(tiled)
        transient[f"decode_{choice}"] = _tracked_peak(lambda: tiled.decode(chunk), lambda: _decoder_cache_tensors(tiled))

    blocks = list(backbone.blocks)
    linear_numel = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, nn.Linear))
    tokens = context_tokens + new_tokens
    cached = backbone.context_mode == "cached"   # joint mode keeps no K/V between steps
    # a buffer's tail: the target's K/V (HunyuanVideo's, the text's too); two experts are Wan's
    tail_of = getattr(backbone, "buffer_tail_tokens", None)
    buffer_tail = tail_of(target_tokens, text_shape[0]) if tail_of is not None else target_tokens
    return Trace(
        target_tokens=target_tokens, context_tokens=tokens,
        transformer=_nbytes(backbone), transformer_linear=sum(_linear_bytes(b) for b in blocks),
        transformer_linear_fp8=linear_numel,
        largest_block=max(_nbytes(b) for b in blocks), blocks=sum(_nbytes(b) for b in blocks),
        largest_linear=max(_linear_bytes(b, largest=True) for b in blocks),
        vae=_nbytes(vae), text=_nbytes(text_module),
        compressor=sum(_nbytes(c) - _nbytes(backbone.patch_embed) for c in comps),
        layers=layers * experts, kv=2 * experts * layers * (tokens + features) * inner * elem if cached else 0,
        # + an fp32 scale per token and head; the features' K/V stay in the compute dtype
        kv_fp8=2 * experts * layers * (tokens * heads * (head_dim + 4) + features * inner * elem) if cached else 0,
        kv_history=2 * experts * layers * (tokens - window_tokens) * inner * elem if cached and window else 0,
        kv_history_fp8=2 * experts * layers * (tokens - window_tokens) * heads * (head_dim + 4) if cached and window else 0,
        vae_cache=cache_bytes, transient=transient, experts=experts, vae_cache_tiled=cache_tiled[2],
        vae_cache_tiled4=cache_tiled[4],
        expert=(max(_nbytes(backbone.high), _nbytes(backbone.low)) - _nbytes(backbone.patch_embed)
                if experts == 2 else 0),
        kv_buffers=(2 * experts * layers * cfg_batch * (tokens + buffer_tail) * inner * elem
                    if cached and getattr(backbone, "supports_context_kv_buffers", False) else 0))


def _decoder_cache_tensors(decoder) -> list:
    """The tensors a decode stream keeps between chunks, those of the streams it holds (a tiled
    decode's, one per tile) included, each once."""
    from pfp.vae import DecodeStream
    seen, found = set(), []

    def walk(obj):
        if isinstance(obj, DecodeStream):
            walk([v for k, v in vars(obj).items() if k != "vae"])
        elif isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(decoder)
    return found


def _decoder_cache_bytes(decoder) -> int:
    """Bytes of the storages behind :func:`_decoder_cache_tensors` (a view keeps its whole
    buffer), each once: what the tracker takes off when such a storage is freed."""
    storages = {}   # id -> storage (held, so no id is reused while counting)
    for t in _decoder_cache_tensors(decoder):
        st = t.untyped_storage()
        storages[id(st)] = st
    return sum(st.nbytes() for st in storages.values())


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
CHOICES = PLAN_VALUES  # one list of choices for the planner and the executor (pfp.offload)


@dataclass
class PhaseEstimate:
    name: str
    peak_bytes: int
    resident: list
    bytes_moved: int = 0   # host -> device in this phase, per chunk


@dataclass
class Plan:
    fits: bool
    budget_bytes: Optional[int]   # None: planned without a budget
    phases: list
    choices: dict
    bytes_moved_per_chunk: int
    seconds_lost_per_chunk: float
    context_tokens: int
    target_tokens: int
    unit: str = "chunk"            # what bytes_moved_per_chunk and seconds_lost_per_chunk count per ("step": training)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def to_json(self) -> dict:
        return {"fits": self.fits, "budget_bytes": self.budget_bytes, "peak_bytes": self.peak_bytes,
                "phases": [asdict(p) for p in self.phases], "choices": dict(self.choices),
                "bytes_moved_per_chunk": self.bytes_moved_per_chunk,
                "seconds_lost_per_chunk": self.seconds_lost_per_chunk,
                "context_tokens": self.context_tokens, "target_tokens": self.target_tokens, "per": self.unit,
                "allowance": {"fixed_bytes": ALLOWANCE_BYTES, "fraction": ALLOWANCE_FRACTION}}

    def too_small(self, what: str, model: str) -> str:
        """The one line refusing a budget that nothing fits (``what``: the flag and its value)."""
        return (f"{what} is too small for {model}: no plan fits; the smallest needs "
                f"{self.peak_bytes / GIB:.2f} GiB ({self.peak_bytes} bytes)")

    def choices_line(self) -> str:
        return "choices: " + ", ".join(f"{k}={v}" for k, v in self.choices.items())

    def table(self) -> str:
        lines = [f"| phase | resident | peak | bytes moved per {self.unit} |", "| --- | --- | ---: | ---: |"]
        for p in self.phases:
            lines.append(f"| {p.name} | {', '.join(p.resident) or '-'} | {_gib(p.peak_bytes)} | "
                         f"{_gib(p.bytes_moved) if p.bytes_moved else '0'} |")
        return "\n".join(lines)


def _with_allowance(n: float) -> int:
    return int(ALLOWANCE_BYTES + n * (1 + ALLOWANCE_FRACTION))


def estimate(trace: Trace, choices: dict, budget: Optional[int], steps: int = 20) -> Plan:
    """The phases' peaks and the transfers of one plan (choices not given take the plain run's:
    :data:`pfp.offload.PLAN_DEFAULTS`). ``budget=None``: fits anything."""
    choices = check_choices(choices)
    fp8 = choices["weights"] == "fp8"
    transformer = trace.transformer - (trace.transformer_linear - trace.transformer_linear_fp8 if fp8 else 0)
    block_scale = transformer / trace.transformer  # fp8 shrinks the blocks too
    active = choices["experts"] == "active" and trace.experts == 2 and choices["offload"] != "block"
    if choices["offload"] == "block":
        # the non-block parts, the running block and the prefetched next one
        transformer_gpu = int(transformer - trace.blocks * block_scale + 2 * trace.largest_block * block_scale)
    elif active:  # one expert on the device at a time
        transformer_gpu = int(transformer - trace.expert * block_scale)
    else:
        transformer_gpu = transformer
    kv_fp8 = choices["kv"] == "fp8"
    kv = trace.kv_fp8 if kv_fp8 else trace.kv
    buffered = choices["kv"] == "buffer"
    # generate makes the buffers at a chunk's first denoising step and frees them after its last
    buffers = {"kv_buffers": trace.kv_buffers} if buffered else {}
    switch = choices["expert_kv"] == "switch" and trace.experts == 2
    if switch:  # one expert's K/V held; the other's rebuilt (whole) at each switch
        kv //= 2
        buffers = {k: v // 2 for k, v in buffers.items()}
    upcast = trace.largest_linear if fp8 else 0          # one layer's native copy at a time
    kv_upcast = 2 * trace.kv // max(1, trace.layers) if kv_fp8 else 0  # one layer's K and V, native
    swap = choices["swap"]

    def phase(name, parts: dict, transient: float) -> PhaseEstimate:
        return PhaseEstimate(name, _with_allowance(sum(parts.values()) + transient), sorted(parts))

    tiles = DECODE_TILES[choices["decode"]]
    tiled = tiles > 1
    vae_cache = {1: trace.vae_cache, 2: trace.vae_cache_tiled, 4: trace.vae_cache_tiled4}[tiles]
    # under switch, a window's history cache keeps its own copy of the held expert's K/V
    history_copy = (trace.kv_history_fp8 if kv_fp8 else trace.kv_history) // 2 if switch else 0
    always = {"vae_cache": vae_cache, "context_kv": kv + history_copy}
    # the compressor's own layers move with the transformer (pfp.offload.Placement parks them together)
    dit = {"transformer" + ("(fp8)" if fp8 else "") + ("(offloaded)" if choices["offload"] == "block" else "")
           + ("(one expert)" if active else ""):
           transformer_gpu, "compressor": trace.compressor}
    vae = {"vae": trace.vae}
    text_gpu = {"text_encoder": trace.text} if choices["text"] == "gpu" else {}
    # what is on the GPU while the transformer runs, and while the VAE decodes
    with_dit = {**always, **text_gpu, **dit, **({} if swap else vae)}
    with_vae = {**always, **text_gpu, **vae, **({} if swap else dit)}
    # "free": the encoder comes in for the storyboard's prompts before anything else is loaded;
    # "cpu": the prompts are encoded off the GPU
    text_parts = {"text_encoder": trace.text} if choices["text"] == "free" else with_dit
    kv_transient = trace.transient["context_kv_fp8" if kv_fp8 else "context_kv"]
    rebuild = kv + kv_transient if switch else 0   # a whole expert's K/V built at the switch (the old dropped first)
    phases = [phase("text", text_parts, 0 if choices["text"] == "cpu" else trace.transient["text"]),
              phase("compress", with_dit, trace.transient["compress"]),
              phase("context_kv", with_dit, kv_transient + upcast),
              phase("denoise", {**with_dit, **buffers}, max(trace.transient["denoise"] + kv_upcast, rebuild) + upcast),
              phase("decode", with_vae, trace.transient["decode_" + choices["decode"] if tiled else "decode"])]

    by_name = {p.name: p for p in phases}
    hidden = 0.0
    if choices["offload"] == "block":
        per_pass = int(trace.blocks * block_scale)           # every expert's blocks
        per_step = per_pass // trace.experts                 # a step runs one expert
        by_name["denoise"].bytes_moved += steps * per_step   # every step's forward streams the blocks
        by_name["context_kv"].bytes_moved += per_pass        # and so does the new tokens' K/V pass
        hidden += 0.5 * (steps * per_step + per_pass)        # prefetch overlaps about half behind compute
    if active:  # each chunk loads each expert once: the low-noise one for its steps, the high one for the K/V
        by_name["denoise"].bytes_moved += int(trace.expert * block_scale)
        by_name["context_kv"].bytes_moved += int(trace.expert * block_scale)
    if swap:  # each comes back once per chunk (a CPU copy stays, so nothing is copied out), the
        # compressor's own layers with the transformer (pfp.offload.Placement parks them together)
        by_name["context_kv"].bytes_moved += (transformer_gpu - (int(trace.expert * block_scale) if active else 0)
                                              + trace.compressor)
        if active:   # the decode parked both experts: the low-noise one comes back for the K/V (it goes
            # first, pfp.backbones.ExpertPair.cache_context) and again after the high one's steps
            by_name["context_kv"].bytes_moved += int(trace.expert * block_scale)
        by_name["decode"].bytes_moved += trace.vae
    moved = sum(p.bytes_moved for p in phases)
    seconds = (moved - hidden) / PCIE_BYTES_PER_S
    if fp8:  # every pass reads the fp8 weights and writes and reads their native copies (a step: one expert's)
        seconds += ((steps + trace.experts) / trace.experts
                    * (trace.transformer_linear_fp8 + 2 * trace.transformer_linear) / HBM_BYTES_PER_S)
    if kv_fp8:
        seconds += steps * (trace.kv_fp8 + 2 * trace.kv) / HBM_BYTES_PER_S
    # Attention over [context ; target]: without buffers each step copies the running expert's
    # context into a fresh concatenation per layer (reads the K/V, writes B x (Nc + Nt)); with
    # them that copy is made once per chunk for each expert. Charged only where the backbone can
    # take buffers.
    fill = (trace.kv_buffers + trace.kv) / HBM_BYTES_PER_S if trace.kv_buffers else 0.0
    seconds += fill if buffered else steps * fill / trace.experts
    if tiled:  # the overlaps decode twice; a rough charge, so that plans tile only when they must
        seconds += TILED_DECODE_SECONDS * (tiles - 1)
    if switch:  # two whole context passes per chunk, one per expert: 2 FLOPs per weight per token
        expert_params = trace.expert / 2     # bf16 bytes -> parameters
        seconds += 2 * 2 * expert_params * trace.context_tokens / DEVICE_FLOPS
    fits = budget is None or all(p.peak_bytes <= budget for p in phases)
    return Plan(fits, budget, phases, dict(choices), int(moved), round(seconds, 4), trace.context_tokens,
                trace.target_tokens)


def all_plans(trace: Trace, budget: int, steps: int = 20) -> list:
    names = list(CHOICES)
    combos = [dict(zip(names, combo)) for combo in itertools.product(*CHOICES.values())]
    # experts="active" means something only for a pair, and not beside block offload; expert_kv only for a pair
    combos = [c for c in combos if c["experts"] == "both" or (trace.experts == 2 and c["offload"] != "block")]
    combos = [c for c in combos if c["expert_kv"] == "both" or trace.experts == 2]
    combos = [c for c in combos if c["kv"] != "buffer" or trace.kv_buffers]
    return [estimate(trace, c, budget, steps) for c in combos]


def _departures(choices: dict) -> int:
    defaults = {name: values[0] for name, values in CHOICES.items()}
    return sum(choices[k] != v for k, v in defaults.items())


def choose(trace: Trace, budget: int, steps: int = 20) -> Plan:
    """The plan with the least time lost that fits ``budget`` (fewest departures from the plain run
    on ties); the smallest-peak plan, with ``fits=False``, when none does."""
    plans = all_plans(trace, budget, steps)
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: (p.seconds_lost_per_chunk, _departures(p.choices), p.peak_bytes))
    return min(plans, key=lambda p: p.peak_bytes)


def plan_model(model: nn.Module, budget: Optional[int], seconds: float, size: Optional[tuple] = None,
               steps: int = 20, cfg: Optional[float] = None, cfg_2: Optional[float] = None) -> Plan:
    """The plan :func:`choose` picks for generating ``seconds`` of video with a built model: traced at
    its longest history (all chunks but the last), CFG batch 2 unless ``cfg`` (or the config's
    ``sample_cfg``), and with two experts ``cfg_2`` too, is 1. ``plan.fits`` is False when nothing fits ``budget``. ``budget=None``: the
    plain run's estimate (everything resident, no budget)."""
    config = model.config
    chunk = config.chunk_frames / config.fps
    cfg = config.sample_cfg if cfg is None else cfg
    cfg_2 = (getattr(config, "sample_cfg_2", None) if cfg_2 is None else cfg_2)
    guided = cfg != 1 or (cfg_2 is not None and cfg_2 != 1 and hasattr(model.backbone, "route"))
    trace = trace_model(model, max(0.0, seconds - chunk), size, cfg_batch=2 if guided else 1)
    return plan_trace(trace, budget, steps)


def plan_trace(trace: Trace, budget: Optional[int], steps: int = 20) -> Plan:
    """:func:`choose` for ``budget``; with no budget, the plain run's estimate (everything resident)."""
    return estimate(trace, {}, None, steps) if budget is None else choose(trace, budget, steps)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
MAX_HISTORY_SECONDS = 24 * 3600   # a day of history: far past any context the planner is meant for


def _parser() -> argparse.ArgumentParser:
    from pfp._cli import Parser
    ap = Parser(prog="python -m pfp.memory", description="Plan a model's memory for a GPU budget: which "
                "parts stay on the GPU in each phase of a chunk, traced on the meta/fake device "
                "(no weights, no GPU needed).")
    ap.add_argument("--config", required=True, help=f"a preset: {', '.join(PRESETS)}")
    ap.add_argument("--vram", required=True, help="the budget, with a unit: 12GiB, 8GB, 80GiB")
    ap.add_argument("--rate", default=None, help="override the preset's compression rate, e.g. 2x2x2")
    ap.add_argument("--history", type=float, default=20.0, help="seconds of history before the chunk (default 20)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per chunk (default 20)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv: Optional[list] = None) -> int:
    from pfp._cli import UsageError, check_number, run_cli

    def run() -> int:
        args = _parser().parse_args(argv)
        try:
            budget = parse_bytes(args.vram)
            p = preset(args.config, args.rate)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        check_number("--history", args.history, lo=0, hi=MAX_HISTORY_SECONDS, allow_none=False)
        check_number("--steps", args.steps, lo=1, integer=True, allow_none=False)
        trace = trace_preset(p, args.history)
        plan = choose(trace, budget, args.steps)
        if not plan.fits:
            raise UsageError(plan.too_small(f"--vram {args.vram}", p.name))
        if args.json:
            print(json.dumps(plan.to_json()))
        else:
            print(f"{p.name}, rate {p.rate}, {args.history:g} s of history: {plan.context_tokens} context tokens, "
                  f"{plan.target_tokens} target tokens per chunk; budget {_gib(budget)}")
            print(plan.choices_line())
            print(plan.table())
            print(f"allowance in every peak: {ALLOWANCE_BYTES >> 20} MiB + {ALLOWANCE_FRACTION:.0%}; "
                  f"time lost to the choices ~{plan.seconds_lost_per_chunk:.2f} s per chunk (estimate)")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
