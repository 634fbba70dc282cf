"""The config of a PFP model: everything that shapes its tensors or its data.

A :class:`PFPConfig` fixes the video size and frame rate, the chunk length, the VAE, the text
encoder, the backbone, the compression rate and the context mode, plus the sampler's defaults.
Its ``"vae"``, ``"text"`` and ``"dit"`` entries name a component kind and its settings
(:data:`COMPONENT_KINDS`, checked by :func:`check_component`). :func:`pfp.model.build_model`
makes the model from it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch


def whole_chunks(seconds, chunk_seconds: float, least: int = 1) -> Optional[int]:
    """How many chunks of ``chunk_seconds`` make ``seconds``, when that is a whole number (within
    1e-6 of a chunk) of at least ``least``; None otherwise (not a finite number included). Each
    command words its own refusal; this is the arithmetic they share."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return None
    n = seconds / chunk_seconds
    return int(round(n)) if abs(n - round(n)) <= 1e-6 and round(n) >= least else None


def format_compressor_signature(kinds_and_rates, lr_phase: str) -> str:
    """The one spelling of :meth:`PFPConfig.compressor_signature`, from ``(kind, rate)`` per
    compressor and the low-res phase (:func:`pfp.weights.built_compressor_signature` spells built
    modules the same way)."""
    return " + ".join(f"{kind} {rate}" for kind, rate in kinds_and_rates) + f", lr_phase {lr_phase}"


@dataclass
class PFPConfig:
    """Everything that shapes the model and its data. Sizes are (height, width) in pixels."""

    video_size: tuple = (32, 32)
    fps: float = 8.0
    chunk_frames: int = 4                 # video frames generated per chunk
    rate: str = "2x2x2"                   # compression rate on top of the backbone's token grid
    compressor_hidden: tuple = (32, 64, 128)
    compressor_kind: str = "pfp"          # pfp | only_lr | without_lr | large_patchify (the paper's Table 1)
    # more compressors whose contexts join the first one's (PFP 3.4, e.g. 4x4x2 + 2x2x8): a list of
    # {"rate": "2x2x8", "kind": "pfp" (default), "hidden": [...] (default compressor_hidden)}
    mix_compressors: list = field(default_factory=list)
    context_mode: str = "cached"
    lr_phase: str = "start"               # which frame of each 1/rt interval the low-res branch sees
    vae: dict = field(default_factory=lambda: {"kind": "patch", "spatial_factor": 4, "temporal_factor": 1,
                                               "scale": 2.0})
    text: dict = field(default_factory=lambda: {"kind": "tiny", "dim": 64, "max_length": 24, "num_layers": 1})
    dit: dict = field(default_factory=lambda: {"kind": "tiny", "inner_dim": 128, "depth": 4, "num_heads": 4,
                                               "mlp_ratio": 3.0, "freq_dim": 64})
    # Wan 2.1 I2V's image encoder (a CLIP vision tower from a local folder); "none" for other models
    image_encoder: dict = field(default_factory=lambda: {"kind": "none"})
    sliding_window: int = 0               # newest history latent frames also given uncompressed (PFP 3.4; 0: off)
    cross_attention: bool = False         # every block also cross-attends to the compressor's penultimate features (PFP 3.4)
    sample_shift: float = 3.0             # sampling timestep shift (Wan's flow shift)
    sample_eta: float = 0.0               # sampler stochasticity (pfp.sampler.sample; 0: Euler ODE)
    sample_cfg: float = 2.0               # classifier-free guidance scale (1: off)
    sample_cfg_min_t: float = 0.0         # no guidance at steps with t <= this (0: guidance at every step)
    sample_cfg_2: Optional[float] = None  # two experts: the low-noise expert's guidance (None: sample_cfg)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["video_size"] = list(self.video_size)
        d["compressor_hidden"] = list(self.compressor_hidden)
        d["mix_compressors"] = [dict(m) for m in self.mix_compressors]
        return d

    def branch_configs(self) -> list:
        """One config per compressor: this one, then one per :attr:`mix_compressors` entry (its
        rate, kind and widths in place of this one's). Each gives its compressor's data shapes
        (:meth:`video_spec`: the low-res branch's size and frame rate follow the rate)."""
        from dataclasses import replace
        out = [self]
        for m in self.mix_compressors:
            out.append(replace(self, rate=m["rate"], compressor_kind=m.get("kind", "pfp"),
                               compressor_hidden=tuple(m.get("hidden", self.compressor_hidden)), mix_compressors=[]))
        return out

    def compressor_signature(self) -> str:
        """What makes compressor weights fit this config: each compressor's kind and rate, and the
        phase its low-res branch samples (e.g. ``"pfp 4x4x2 + pfp 2x2x8, lr_phase start"``). Weights
        of another kind often have the same tensors (``pfp`` and ``without_lr``), and those of
        another rate or phase always do, so loading compares this instead of shapes."""
        from pfp.rates import parse_rate
        return format_compressor_signature([(c.compressor_kind, parse_rate(c.rate)) for c in self.branch_configs()],
                                           self.lr_phase)

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
        """Read a config JSON file (or a file whose ``"config"`` key holds one); ValueError naming
        the file if it is not readable JSON of that shape."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"config {path} is not readable JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {path} must hold a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d.get("config", d))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {path}: {str(exc).splitlines()[0]}") from None

    # -- derived -----------------------------------------------------------------------------
    def vae_factors(self) -> tuple[int, int, int]:
        """``(spatial, temporal, latent_channels)`` of the configured VAE, without building it (a
        ``"wan"`` VAE's are read from its config.json)."""
        check_component("vae", self.vae)
        v = self.vae
        if v.get("kind", "patch") == "wan":
            return _wan_vae_factors(v["path"], v.get("subfolder"))
        if v.get("kind") == "hunyuan":
            with open(os.path.join(_component_dir(v["path"], v.get("subfolder"), "vae"), "config.json")) as f:
                c = json.load(f)
            return (int(c.get("spatial_compression_ratio", 8)), int(c.get("temporal_compression_ratio", 4)),
                    int(c.get("latent_channels", 16)))
        s, t = int(v.get("spatial_factor", 4)), int(v.get("temporal_factor", 1))
        return s, t, 3 * s * s * t

    @property
    def vae_spatial(self) -> int:
        return self.vae_factors()[0]

    @property
    def vae_temporal(self) -> int:
        return self.vae_factors()[1]

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_frames / self.fps

    @property
    def chunk_latent_frames(self) -> int:
        """Latent frames per chunk: ``chunk_frames / vae_temporal``."""
        return self.chunk_frames // self.vae_temporal

    def clip_frames(self, num_chunks: int) -> int:
        """Video frames of ``num_chunks`` chunks: ``num_chunks * chunk_frames - (tf - 1)``.

        With a causal VAE of temporal factor tf (Wan: 4) the first latent frame is one video frame
        and every later one tf frames, so the first chunk has ``chunk_frames - (tf - 1)`` frames
        (``1 + tf*(n-1)`` for n latent frames per chunk) and every later one ``chunk_frames``
        (``tf*n``). With tf = 1 every chunk has ``chunk_frames``."""
        return num_chunks * self.chunk_frames - (self.vae_temporal - 1)

    def video_spec(self, frames: int, size: Optional[tuple] = None):
        """The :class:`pfp.data.VideoSpec` for a clip of ``frames`` video frames (HR + LR branch).

        ``frames`` must be valid for the VAE (``1 + tf*k``). The LR branch gets the video at 1/rt
        fps and exactly the frames that make ``ceil(L / rt)`` LR latent frames for the clip's L HR
        latent frames: ``1 + tf*(ceil(L/rt) - 1)`` of them. With ``lr_phase = "start"`` those are
        frames 0, rt, 2rt, ...: LR latent frame j ends on HR video frame ``rt*tf*j``, where HR token
        frame j's causal window ends, so the newest ``rt - 1`` frames of a history reach the context
        only with the next chunk. With ``"end"`` (VAEs with tf = 1 only; ``frames`` a multiple of rt)
        they are frames rt-1, 2rt-1, ...: LR frame j is the last frame of HR token frame j's stride
        window, rt - 1 frames after its causal conv window ends, and the newest frame of a
        history is in the context. ``size``: (H, W), default ``video_size``."""
        from pfp.data import VideoSpec
        from pfp.rates import parse_rate
        from pfp.vae import check_video_frames
        r = parse_rate(self.rate)
        h, w = size or self.video_size
        tf = self.vae_temporal
        latent = check_video_frames(frames, tf, what="the clip")
        lr_frames = 1 + tf * (-(-latent // r.t) - 1)
        if self.lr_phase == "end" and (tf != 1 or frames % r.t):
            raise ValueError(f"config lr_phase 'end' needs a VAE with temporal factor 1 (this one: {tf}) and clips of "
                             f"a multiple of {r.t} frames (rate {self.rate}; got {frames}); use lr_phase 'start'")
        used = self.lr_region((h, w))
        return VideoSpec(hr_size=(h, w), hr_fps=self.fps, hr_frames=frames, lr_size=(used[0] // r.h, used[1] // r.w),
                         lr_fps=self.fps / r.t, lr_frames=lr_frames, lr_phase=self.lr_phase,
                         lr_crop=None if used == (h, w) else used)

    def lr_region(self, size: Optional[tuple] = None) -> tuple:
        """(H, W) pixels of the top-left region of a frame that the low-res branch sees, at 1/rate
        size: the whole frame when that size is a whole number of VAE latents (the compressor then
        reads the rows and columns its grid covers), else the region the grid covers (whole cells
        of ``2 * rate`` latent rows and columns, patch 2), which is."""
        from pfp.rates import parse_rate
        r = parse_rate(self.rate)
        h, w = size or self.video_size
        if h % (r.h * self.vae_spatial) == 0 and w % (r.w * self.vae_spatial) == 0:
            return (h, w)
        cell_h, cell_w = 2 * r.h * self.vae_spatial, 2 * r.w * self.vae_spatial
        return (h // cell_h * cell_h, w // cell_w * cell_w)

    def clip_spec(self, num_chunks: int, size: Optional[tuple] = None):
        """:meth:`video_spec` of ``num_chunks`` whole chunks (:meth:`clip_frames` frames)."""
        return self.video_spec(self.clip_frames(num_chunks), size)

    def check(self) -> None:
        """Raise ValueError when the components, sizes, chunk length and rate do not fit together
        (naming the field and what to use)."""
        from pfp.rates import parse_rate, plan_inputs
        for name in ("vae", "text", "dit", "image_encoder"):
            check_component(name, getattr(self, name))
        if (self.dit.get("kind") == "hunyuan_video") != (self.text.get("kind") == "hunyuan"):
            raise ValueError("config dit of kind 'hunyuan_video' and text of kind 'hunyuan' go together: HunyuanVideo "
                             "reads Llama's states and CLIP's pooled vector, which only the hunyuan text encoder "
                             f"makes (got dit {self.dit.get('kind', 'tiny')!r}, text {self.text.get('kind', 'tiny')!r})")
        from pfp.compressor import COMPRESSOR_KINDS
        if self.compressor_kind not in COMPRESSOR_KINDS:
            raise ValueError(f"config compressor_kind {self.compressor_kind!r} is not valid; choose one of: "
                             f"{', '.join(COMPRESSOR_KINDS)}")
        if self.context_mode not in ("joint", "cached"):
            raise ValueError(f"config context_mode {self.context_mode!r} is not valid; choose one of: joint, cached")
        from pfp.data import LR_PHASES
        if self.lr_phase not in LR_PHASES:
            raise ValueError(f"config lr_phase {self.lr_phase!r} is not valid; choose one of: {', '.join(LR_PHASES)}")
        if not (isinstance(self.sample_eta, (int, float)) and 0.0 <= self.sample_eta <= 1.0):
            raise ValueError(f"config sample_eta {self.sample_eta!r} is not valid; use a number in [0, 1] "
                             "(0: deterministic Euler)")
        if not (isinstance(self.sample_cfg, (int, float)) and math.isfinite(self.sample_cfg)
                and 0.0 <= self.sample_cfg <= 50.0):
            raise ValueError(f"config sample_cfg {self.sample_cfg!r} is not valid; use a number in [0, 50] "
                             "(1: no guidance)")
        if self.sample_cfg_2 is not None and not (isinstance(self.sample_cfg_2, (int, float))
                                                   and math.isfinite(self.sample_cfg_2) and 0.0 <= self.sample_cfg_2 <= 50.0):
            raise ValueError(f"config sample_cfg_2 {self.sample_cfg_2!r} is not valid; use a number in [0, 50] "
                             "(the low-noise expert's guidance; null: sample_cfg)")
        if not (isinstance(self.sample_cfg_min_t, (int, float)) and 0.0 <= self.sample_cfg_min_t <= 1.0):
            raise ValueError(f"config sample_cfg_min_t {self.sample_cfg_min_t!r} is not valid; use a number in [0, 1] "
                             "(0: guidance at every step)")
        if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) \
                or not 0 <= self.sliding_window <= 1024:
            raise ValueError(f"config sliding_window {self.sliding_window!r} is not valid; use an int in [0, 1024] "
                             "(the newest history latent frames given uncompressed beside the context; 0: off)")
        if not isinstance(self.mix_compressors, (list, tuple)):
            raise ValueError(f"config mix_compressors must be a list of {{rate, kind, hidden}} objects, got "
                             f"{type(self.mix_compressors).__name__}")
        for i, m in enumerate(self.mix_compressors):
            where = f"config mix_compressors[{i}]"
            if not isinstance(m, dict) or "rate" not in m or set(m) - {"rate", "kind", "hidden"}:
                raise ValueError(f"{where} must be an object with 'rate' and optionally 'kind' and 'hidden', got {m!r}")
            if m.get("kind", "pfp") not in COMPRESSOR_KINDS:
                raise ValueError(f"{where}: kind {m.get('kind')!r} is not valid; choose one of: "
                                 f"{', '.join(COMPRESSOR_KINDS)}")
            hidden = m.get("hidden", self.compressor_hidden)
            if not isinstance(hidden, (list, tuple)) or not hidden or not all(
                    isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in hidden):
                raise ValueError(f"{where}: hidden must be a list of positive ints, got {hidden!r}")
        if self.mix_compressors:
            for i, branch in enumerate(self.branch_configs()[1:]):
                try:
                    branch.check()
                except ValueError as e:
                    raise ValueError(f"config mix_compressors[{i}] (rate {branch.rate}): {e}") from None
        if not isinstance(self.cross_attention, bool):
            raise ValueError(f"config cross_attention {self.cross_attention!r} is not valid; use true or false")
        if self.cross_attention:
            branches = self.branch_configs()
            plain = [c.compressor_kind for c in branches if c.compressor_kind not in ("pfp", "without_lr")]
            if plain:
                raise ValueError(f"config cross_attention needs compressors with conv stages (kind pfp or without_lr), "
                                 f"got {plain[0]!r}: it attends to their last stage's features")
            widths = sorted({int(c.compressor_hidden[-1]) for c in branches})
            if len(widths) > 1:
                raise ValueError(f"config cross_attention needs one width of the compressors' last stage, got {widths}; "
                                 "give mix_compressors the same last hidden width")
        r = parse_rate(self.rate)
        h, w = self.video_size
        tf = self.vae_temporal
        plan_inputs((w, h), self.fps, self.chunk_seconds, self.rate, vae_spatial=self.vae_spatial,
                    vae_temporal=tf, patch=(1, 2, 2))   # the VAE's and the grid's minimum sizes
        step = r.t * tf
        if self.chunk_frames % step or self.chunk_frames < step:
            why = f"rate {self.rate} compresses time by {r.t}" + (f" and the VAE by {tf}" if tf > 1 else "")
            raise ValueError(f"config chunk_frames={self.chunk_frames} is not a multiple of {step} ({why}); use "
                             f"{max(step, self.chunk_frames // step * step)} or {(self.chunk_frames // step + 1) * step}")
        if self.lr_phase == "end" and tf != 1:
            raise ValueError(f"config lr_phase 'end' needs a VAE with temporal factor 1, and this one has {tf} (its "
                             "latent frames end on every tf-th video frame); use lr_phase 'start'")
        step = 2 * self.vae_spatial   # the DiT's 2x2 patches of the latent
        if h % step or w % step:
            raise ValueError(f"video_size {h}x{w} (HxW) does not fit the DiT's 2x2 patches of a {self.vae_spatial}x "
                             f"VAE's latent: height and width must be multiples of {step}; use "
                             f"{max(step, h // step * step)}x{max(step, w // step * step)}")


# ------------------------------------------------------------------------------------------------
# components: config["vae"], config["text"], config["dit"]
# ------------------------------------------------------------------------------------------------
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# kind -> (required keys, optional keys)
COMPONENT_KINDS = {
    "vae": {
        "patch": ((), ("spatial_factor", "temporal_factor", "shift", "scale")),
        "wan": (("path",), ("subfolder", "dtype")),
        "hunyuan": (("path",), ("subfolder", "dtype", "warmup")),
    },
    "text": {
        "tiny": ((), ("dim", "vocab_size", "max_length", "num_layers", "num_heads")),
        "umt5": (("path",), ("tokenizer_path", "max_length", "dtype", "clean_prompts")),
        "hunyuan": (("path",), ("max_length", "dtype", "crop_start")),
    },
    "dit": {
        "tiny": ((), tuple(f for f in ("inner_dim", "depth", "num_heads", "mlp_ratio", "freq_dim", "patch_size",
                                       "rope_theta", "prediction", "pooled_text", "min_t"))),
        "wan": ((), ("path", "subfolder", "dtype", "config", "mask_text_padding", "boundary", "subfolder_2",
                     "lr_patch_embed")),
        "hunyuan_video": ((), ("path", "subfolder", "dtype", "config", "guidance")),
    },
    "image_encoder": {
        "none": ((), ()),
        "clip": ((), ("path", "subfolder", "dtype", "config")),
    },
}
_PATH_WHAT = {
    ("vae", "wan"): ("a local diffusers AutoencoderKLWan folder (with config.json), or a pipeline folder "
                     "with vae/", "vae"),
    ("text", "umt5"): ("a local folder with a transformers UMT5EncoderModel (config.json) and its tokenizer, "
                       "or a diffusers pipeline folder with text_encoder/ and tokenizer/", "text_encoder"),
    ("dit", "wan"): ("a local diffusers WanTransformer3DModel folder, or a pipeline folder with transformer/",
                     "transformer"),
    ("vae", "hunyuan"): ("a local diffusers AutoencoderKLHunyuanVideo folder (with config.json), or a pipeline "
                         "folder with vae/", "vae"),
    ("text", "hunyuan"): ("a local HunyuanVideo pipeline folder with text_encoder/ (Llama), tokenizer/, "
                          "text_encoder_2/ (CLIP) and tokenizer_2/", "text_encoder"),
    ("dit", "hunyuan_video"): ("a local diffusers HunyuanVideoTransformer3DModel folder, or a pipeline folder "
                               "with transformer/", "transformer"),
    ("image_encoder", "clip"): ("a local transformers CLIPVisionModel folder, or a pipeline folder with "
                                "image_encoder/", "image_encoder"),
}

_PATH_CLASS = {  # config.json key -> accepted values, per (field, kind)
    ("vae", "wan"): ("_class_name", ("AutoencoderKLWan",)),
    ("text", "umt5"): ("model_type", ("umt5",)),
    ("dit", "wan"): ("_class_name", ("WanTransformer3DModel",)),
    ("vae", "hunyuan"): ("_class_name", ("AutoencoderKLHunyuanVideo",)),
    ("text", "hunyuan"): ("model_type", ("llama",)),
    ("dit", "hunyuan_video"): ("_class_name", ("HunyuanVideoTransformer3DModel",)),
    ("image_encoder", "clip"): ("model_type", ("clip_vision_model",)),
}


def check_component(name: str, spec) -> None:
    """Validate ``config[name]`` (``"vae"``, ``"text"``, ``"dit"`` or ``"image_encoder"``): a dict with a valid ``"kind"``,
    its required keys, no unknown keys, and existing local paths. The ValueError names the field
    and the valid choices."""
    kinds = COMPONENT_KINDS[name]
    if not isinstance(spec, dict):
        raise ValueError(f"config {name} must be an object like {{\"kind\": ...}}, got {spec!r}")
    kind = spec.get("kind", next(iter(kinds)))
    if kind not in kinds:
        raise ValueError(f"config {name}.kind {kind!r} is not valid; choose one of: {', '.join(kinds)}")
    required, optional = kinds[kind]
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"config {name} of kind {kind!r} needs {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(spec) - {"kind", *required, *optional})
    if unknown:
        raise ValueError(f"config {name} of kind {kind!r}: unknown key(s) {unknown}; valid keys are "
                         f"{sorted({'kind', *required, *optional})}")
    if "dtype" in spec and spec["dtype"] not in _DTYPES:
        raise ValueError(f"config {name}.dtype {spec['dtype']!r} is not valid; choose one of: {', '.join(_DTYPES)}")
    if "path" in spec:
        what, sub = _PATH_WHAT[(name, kind)]
        path = spec["path"]
        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError(f"config {name}.path {path!r} is not a local directory; it must be {what} "
                             f"(nothing is downloaded)")
        where = os.path.join(path, spec["subfolder"]) if spec.get("subfolder") else path
        if not (os.path.isfile(os.path.join(where, "config.json"))
                or (not spec.get("subfolder") and os.path.isfile(os.path.join(path, sub, "config.json")))):
            raise ValueError(f"config {name}.path {path!r} has no config.json" +
                             (f" (nor {sub}/config.json)" if not spec.get("subfolder") else
                              f" under subfolder {spec['subfolder']!r}") + f"; it must be {what}")
        cfg_file = os.path.join(_component_dir(path, spec.get("subfolder"), sub), "config.json")
        try:
            with open(cfg_file) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"config {name}.path: cannot read {cfg_file} ({e})") from None
        want_key, want = _PATH_CLASS[(name, kind)]
        cfg = cfg if isinstance(cfg, dict) else {}
        if cfg.get(want_key) not in want:
            have = cfg.get("_class_name") or cfg.get("model_type") or (cfg.get("architectures") or ["unknown"])[0]
            raise ValueError(f"config {name}.path {path!r} holds a {have!r} model ({cfg_file}); kind {kind!r} needs "
                             f"{' or '.join(want)}: it must be {what}")
    if name == "image_encoder" and kind == "clip" and ("path" in spec) == ("config" in spec):
        raise ValueError("config image_encoder of kind 'clip' needs exactly one of 'path' (a local CLIP vision "
                         "model folder) or 'config' (CLIPVisionConfig keyword arguments)")
    if name == "dit" and kind == "wan" and ("path" in spec) == ("config" in spec):
        raise ValueError("config dit of kind 'wan' needs exactly one of 'path' (a local diffusers checkpoint) "
                         "or 'config' (WanTransformer3DModel keyword arguments)")
    if name == "dit" and kind == "hunyuan_video":
        if ("path" in spec) == ("config" in spec):
            raise ValueError("config dit of kind 'hunyuan_video' needs exactly one of 'path' (a local diffusers "
                             "checkpoint) or 'config' (HunyuanVideoTransformer3DModel keyword arguments)")
        g = spec.get("guidance", 6.0)
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
            raise ValueError(f"config dit.guidance {g!r} is not valid; use a number >= 0 (the embedded guidance "
                             "scale of a guidance-distilled HunyuanVideo, 6.0 by default)")
    if name == "vae" and kind == "hunyuan":
        w = spec.get("warmup", 2)
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"config vae.warmup {w!r} is not valid; use an int >= 1 (latent frames of the previous "
                             "chunk decoded before each chunk) or null (the whole history)")
    if name == "text" and kind == "hunyuan" and "path" in spec:
        missing = [p for p in ("tokenizer", "text_encoder_2", "tokenizer_2")
                   if not os.path.isdir(os.path.join(spec["path"], p))]
        if missing:
            raise ValueError(f"config text.path {spec['path']!r} lacks {', '.join(missing)}; it must be "
                             f"{_PATH_WHAT[(name, kind)][0]}")
    if name == "dit" and kind == "wan":
        # two experts (Wan 2.2 A14B): "boundary" switches them by timestep
        b = spec.get("boundary")
        if b is not None and not (isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b < 1.0):
            raise ValueError(f"config dit.boundary {b!r} is not valid; use a number in (0, 1), the timestep from "
                             "which the high-noise expert denoises (Wan 2.2 A14B: 0.875 T2V, 0.9 I2V)")
        for key in ("subfolder_2", "lr_patch_embed"):
            if key in spec and b is None:
                raise ValueError(f"config dit.{key} needs dit.boundary (it configures the second expert)")
        if spec.get("lr_patch_embed", "high") not in ("high", "low"):
            raise ValueError(f"config dit.lr_patch_embed {spec['lr_patch_embed']!r} is not valid; choose one of: "
                             "high, low")
        if b is not None and "path" in spec:
            sub2 = spec.get("subfolder_2", "transformer_2")
            cfg2 = os.path.join(spec["path"], sub2, "config.json")
            if not os.path.isfile(cfg2):
                raise ValueError(f"config dit.path {spec['path']!r} has no {sub2}/config.json: two experts "
                                 f"(dit.boundary) need the second expert's folder (dit.subfolder_2)")


def _component_dir(path: str, subfolder: Optional[str], default_sub: str) -> str:
    if subfolder:
        return os.path.join(path, subfolder)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, default_sub, "config.json")):
        return os.path.join(path, default_sub)
    return path


def _wan_vae_factors(path: str, subfolder: Optional[str]) -> tuple[int, int, int]:
    from pfp.vae import WanVAE
    with open(os.path.join(_component_dir(path, subfolder, "vae"), "config.json")) as f:
        return WanVAE.factors_from_config(json.load(f))


__all__ = ["PFPConfig", "check_component", "COMPONENT_KINDS", "whole_chunks"]
