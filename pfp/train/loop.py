"""The training loop behind ``python -m pfp.train pretrain|finetune``.

- ``pretrain``: frame retrieval; trains the compressor and, for the built-in tiny model (which has
  no pretrained base), the whole backbone and text encoder. ``--lora-rank R`` trains LoRA adapters
  on the backbone instead (what a real base model wants).
- ``finetune``: next-chunk generation from the compressed history; LoRA on the backbone (rank
  ``--lora-rank``, default 128 for real models; 0 trains the backbone fully), compressor trainable
  unless ``--freeze-compressor``. The text encoder and the shared patch embedding (which belongs to
  the backbone) train only when the backbone trains fully (rank 0), i.e. for the built-in tiny model.

Common: bf16 autocast on CUDA (``--precision``), gradient checkpointing (``--grad-checkpointing``),
safetensors checkpoints with exact resume (``--resume``), a tqdm bar with loss and samples/s, a
``loss.csv`` log, and multi-process data parallelism under ``torchrun`` (DDP; ``--fsdp`` shards the
backbone's blocks with FSDP2's ``fully_shard``). On CPU the processes talk through gloo.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
from torch import nn

from pfp._cli import (RunFailure, UsageError, check_device, check_module, check_number, check_output_file,
                      check_writable_dir, work_started)
from pfp.data.video_folder import CROPS, STORYBOARD_POLICIES
from pfp.config import whole_chunks
from pfp.weights import PFPConfig, PFPModel, build_model, load_state_checked, read_weights, save_weights

from .checkpoint import (CHECKPOINTS, LEGACY_DIRS, load_checkpoint, read_optimizer_state, read_state, recover,
                         resolve_checkpoint, restore_rng_state, save_checkpoint)
from .objectives import ObjectiveConfig, StepPhases, finetune_loss, pretrain_loss

MODES = ("pretrain", "finetune")


@dataclass
class TrainArgs:
    mode: str = "pretrain"
    out: str = "runs/pfp"
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 50
    lr_schedule: str = "constant"        # constant | cosine (to 10% of lr at --steps)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"              # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = False
    lora_rank: Optional[int] = None      # None: 0 for pretrain, 128 for finetune
    lora_alpha: Optional[float] = None   # default: the rank
    freeze_compressor: bool = False
    compressor_lr: Optional[float] = None  # the compressor's own peak learning rate (default: lr)
    freeze_text: bool = False            # keep the text encoder fixed even when the backbone trains fully
    init_new: Optional[str] = None       # --init may lack tensors under this prefix (new, freshly initialised modules)
    init_skip: Optional[str] = None      # --init's tensors under this prefix are ignored (e.g. "compressor.": no pretraining)
    init: Optional[str] = None           # weights to start from (save_weights file or a checkpoint dir)
    config: Optional[str] = None         # PFPConfig JSON or a preset (default: the built-in tiny config)
    model_dir: Optional[str] = None      # a preset's local diffusers pipeline folder
    rate: Optional[str] = None           # with config: another compression rate
    context_mode: Optional[str] = None   # override the config's
    data: str = "synthetic"              # "synthetic" or a folder of videos with JSON storyboards
    clip_seconds: float = 4.0
    num_videos: int = 100000
    sprite_radius: tuple = (0.08, 0.16)  # synthetic data: sprite radius range (units of min(H, W))
    pattern_period: tuple = (0.12, 0.3)  # synthetic data: stripe/checker period range
    shot_seconds: tuple = (1.0, 3.0)     # synthetic data: shot length range in seconds
    save_every: int = 200
    log_every: int = 10
    resume: bool = False
    fsdp: bool = False
    export: Optional[str] = None         # write merged weights (save_weights format) here at the end
    export_dtype: str = "fp32"
    max_retrieve: int = 4
    p_uncond: float = 0.1
    t_shift: float = 1.0                 # training timesteps: shifted logit-normal (>1: noisier)
    p_no_history: float = 0.0
    history_noise: float = 0.0           # finetune: history noised to a level ~ U(0, this) (exposure bias)
    t_weight_power: float = 0.0          # per-sample loss weight max(t, backbone min_t) ** this (objectives.flow_loss)
    t_uniform: float = 0.0               # fraction of training timesteps drawn uniform in (0, 1) instead
    self_history: float = 0.0            # finetune: chance that a history's newest chunk is the model's own estimate
    self_history_t: tuple = (0.2, 0.8)   # ... made in one step from that chunk noised to a level in this range
    threads: Optional[int] = None
    workers: int = 1                     # data processes (0: render clips in the training process)
    max_minutes: Optional[float] = None  # stop (checkpoint, export) after this much wall time
    until: Optional[int] = None          # stop (checkpoint, export) after this step; --steps stays the schedule horizon
    keep_checkpoints: int = 2            # checkpoints kept in OUT/checkpoints (older ones deleted after each save)
    overwrite: bool = False              # start again in an --out that already holds a run (deletes its checkpoints and log)
    skip_nonfinite: int = 0              # steps with a non-finite loss or gradient skipped before the run stops
    bad_data: str = "skip"               # a video folder's unusable files: "skip" (listed) or "error"
    crop: str = "random"                 # a video folder's crops: "random" (zoom and place per clip) or "center"
    max_zoom: float = 1.5                # the largest random zoom of --crop random
    flip: bool = False                   # mirror half the clips of a video folder left to right
    mix_synthetic: float = 0.0           # share of a video folder's clips replaced by synthetic scenes
    storyboards: str = "required"        # a video folder's storyboards: "required" or "optional" (one default shot)
    progress: bool = True
    vram: Optional[str] = None           # device memory budget ("12GiB"): train under the plan that fits it
    plan: bool = False                   # print the memory plan (the plain run's without --vram) and stop
    text_cache: str = "2GiB"             # host memory for prompts' states of a text encoder that does not train ("0": off)
    # the fields the caller set (the CLI fills it), for --resume: the others take the run's values;
    # None: those that differ from their defaults
    given: Optional[frozenset] = None


# ------------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int]:
    import torch.distributed as dist
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def step_generator(seed: int, step: int, rank: int, stream: str = "loss") -> torch.Generator:
    """The randomness of a training step: ``stream="data"`` picks the clips, ``"loss"`` draws
    Omega, mask levels, noise and timesteps. A pure function of its arguments."""
    h = hashlib.blake2b(f"pfp.train:{seed}:{step}:{rank}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------------------
# model set-up
# ------------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Wraps the model so that DDP sees one forward per step (it syncs gradients in backward)."""

    def __init__(self, model: PFPModel, mode: str, objective: ObjectiveConfig, chunk_latent: int,
                 device, autocast_dtype, phases=None, encode_text=None):
        super().__init__()
        self.model, self.mode, self.objective = model, mode, objective
        self.chunk_latent, self.device, self.autocast_dtype = chunk_latent, device, autocast_dtype
        self.phases = phases if phases is not None else StepPhases()   # a memory plan's placement
        self.encode_text = encode_text   # a TextStateCache, or None: the text encoder each step

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else _nullcontext())
        with ctx:
            if self.mode == "pretrain":
                return pretrain_loss(self.model, self.model.backbone, batch, generator, self.objective, self.device,
                                     phases=self.phases, encode_text=self.encode_text)
            return finetune_loss(self.model, self.model.backbone, batch, generator, self.objective,
                                 self.chunk_latent, self.device, phases=self.phases, encode_text=self.encode_text)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def lora_target_modules(backbone: nn.Module):
    """The backbone's LoRA targets: a list of module-name suffixes, or one regular expression (a
    str, which peft matches against whole module names)."""
    names = getattr(backbone, "lora_target_modules", None)
    if isinstance(names, str):
        return names
    if names:
        return list(names)
    return ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.0", "ffn.2"]


def apply_lora(model: PFPModel, rank: int, alpha: Optional[float] = None) -> None:
    """Wrap the backbone's attention and MLP linears with LoRA adapters (peft); only they train."""
    from peft import LoraConfig, get_peft_model
    backbone = model.backbone
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                     target_modules=lora_target_modules(backbone), lora_dropout=0.0, init_lora_weights=True)
    model.backbone = get_peft_model(backbone, cfg)


def merge_lora(model: PFPModel) -> None:
    """Fold LoRA adapters into the backbone's weights (for export)."""
    if hasattr(model.backbone, "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()


def _set_trainable(model: PFPModel, args: TrainArgs, lora: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    # the text encoder trains with a fully trained backbone (the tiny model); with LoRA it stays fixed
    # (a text encoder loaded from its own path, e.g. UMT5, is frozen: it never trains)
    train_text = not lora and not args.freeze_text and not getattr(model.text_encoder, "frozen", False)
    for p in model.text_encoder.parameters():
        p.requires_grad_(train_text)
    if lora:
        for n, p in model.backbone.named_parameters():
            # LoRA adapters, and the cross-attention over the compressor's features (new modules,
            # trained whole as IP-Adapter trains its own)
            if "lora_" in n or ".memory_attn." in n:
                p.requires_grad_(True)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    if not (args.mode == "finetune" and args.freeze_compressor):
        for comp in model.compressors:
            for n, p in comp.named_parameters():
                if not n.startswith("patch_embed."):
                    p.requires_grad_(True)


def _text_cache_bytes(args: TrainArgs) -> Optional[int]:
    """``--text-cache`` in bytes; None for 0 (off)."""
    if str(args.text_cache).strip() == "0":
        return None
    from pfp.memory import parse_bytes
    return parse_bytes(args.text_cache, "--text-cache")


def _text_cache(model: PFPModel, args: TrainArgs):
    """A :class:`pfp.text.TextStateCache` over the model's text encoder when its states are a
    function of the prompt alone (:func:`pfp.text.states_are_fixed`) and ``--text-cache`` is not 0;
    else None. The memory plan reads the same rule off its trace (``TrainTrace.text_fixed``)."""
    from pfp.text import TextStateCache, states_are_fixed
    size = _text_cache_bytes(args)
    if size is None or not states_are_fixed(model.text_encoder):
        return None
    return TextStateCache(model.encode_text, size)


def _plain_backbone(backbone):
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _dataset(args: TrainArgs, config: PFPConfig, progress: bool = False):
    # whole chunks: K * chunk_frames frames, less tf - 1 with a causal VAE (1 + tf*k frames)
    num_chunks = _clip_chunks(args, config)
    spec = config.clip_spec(num_chunks)
    if args.data == "synthetic":
        return _synthetic_videos(args, spec)
    from pfp.data import VideoFolderDataset
    # a random time window and crop per clip, drawn from the step's generator (see _batch)
    try:
        folder = VideoFolderDataset(args.data, spec, clip_start="random", crop=args.crop, max_zoom=args.max_zoom,
                                    flip=args.flip, on_bad=args.bad_data,
                                    storyboards=args.storyboards, progress=progress)
    except ValueError as e:
        msg = str(e).replace("pass on_bad='skip' to skip them", "--bad-data skip skips them")   # the flag's words
        if "missing storyboard" in msg and args.storyboards == "required":
            msg += "; --storyboards optional trains on videos without one (prompt 'a video')"
        if msg == str(e):
            raise
        raise ValueError(msg) from None
    if not args.mix_synthetic:
        return folder
    from pfp.data import MixedVideos
    return MixedVideos(folder, _synthetic_videos(args, spec), args.mix_synthetic)


def _synthetic_videos(args: TrainArgs, spec):
    """The synthetic multi-shot scenes of ``--data synthetic`` and ``--mix-synthetic``, as the flags set them."""
    from pfp.data import SyntheticMultiShotVideos
    return SyntheticMultiShotVideos(args.num_videos, spec, seed=args.seed, sprite_radius=tuple(args.sprite_radius),
                                    pattern_period=tuple(args.pattern_period), shot_seconds=tuple(args.shot_seconds))


def _batch(dataset, generator: torch.Generator, batch_size: int) -> dict:
    from pfp.data import collate, draw_item
    idx = torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist()
    return collate([draw_item(dataset, i, generator) for i in idx])


class _StepBatches(torch.utils.data.IterableDataset):
    """Batch of step s = a pure function of (seed, s, rank), so workers and resumes agree."""

    def __init__(self, dataset, seed: int, rank: int, start: int, stop: int, batch_size: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        # With N loader workers, worker i renders steps start+i, start+i+N, ...; the loader takes
        # one batch from each worker in turn, so the steps still arrive in order.
        info = torch.utils.data.get_worker_info()
        first, every = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + first, self.stop, every):
            yield _batch(self.dataset, step_generator(self.seed, step, self.rank, "data"), self.batch_size)


def _batches(dataset, args: "TrainArgs", rank: int, start: int):
    src = _StepBatches(dataset, args.seed, rank, start, args.steps, args.batch_size)
    if args.workers <= 0:
        return iter(src)
    loader = torch.utils.data.DataLoader(src, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                         persistent_workers=False)
    return iter(loader)


# ------------------------------------------------------------------------------------------------
# schedule and initial weights
# ------------------------------------------------------------------------------------------------
def _lr_at(step: int, args: TrainArgs) -> float:
    if args.warmup > 0 and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_schedule == "cosine":
        span = max(1, args.steps - args.warmup)
        frac = min(1.0, (step - args.warmup) / span)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return args.lr


def _matches(key: str, pattern: str) -> bool:
    """A tensor name under a prefix (``"compressor."``), or matching a glob with ``*``, ``?`` or
    ``[`` (``"backbone.blocks.*.memory_attn.*"``)."""
    import fnmatch
    return fnmatch.fnmatchcase(key, pattern) if any(c in pattern for c in "*?[") else key.startswith(pattern)


def _init_tensors(model: PFPModel, path: str) -> tuple:
    """(path, tensors, the file's config or None) of ``--init``: a weights file (floating tensors
    in fp32), or a checkpoint folder (verified once; its tensors as the model saves them)."""
    if os.path.isdir(path):
        path = resolve_checkpoint(path)                                  # verified here, once
        tensors, st = load_checkpoint(path, restore_rng=False, verify=False)
        if st.get("lora"):
            raise ValueError(f"--init {path}: a LoRA checkpoint; export it first (--export) and init from that file")
        file_cfg = PFPConfig.from_dict(st["config"]) if st.get("config") else None
        return path, {k: v for k, v in tensors.items() if model.is_saved_key(k)}, file_cfg
    tensors, file_cfg = read_weights(path)
    return path, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, file_cfg


def _load_init(model: PFPModel, path: str, new_prefix: Optional[str] = None, skip_prefix: Optional[str] = None) -> None:
    path, tensors, file_cfg = _init_tensors(model, path)
    fresh_compressor = bool(skip_prefix) and _matches("compressor.", skip_prefix)
    if file_cfg is not None and not fresh_compressor:
        # weights of another kind fail to load, but those of another rate or phase often have the
        # same shapes and would load, to be read at other strides
        have, want = file_cfg.compressor_signature(), model.config.compressor_signature()
        if have != want:
            raise ValueError(f"--init {path} holds compressors for {have} but the config asks for {want}; "
                             f"use a config that matches, or --init-skip compressor. to start the compressor afresh")
    own = model.trainable_state_dict()
    if skip_prefix:
        # start these modules afresh: e.g. finetuning without the pretrained compressor (Table 2's
        # "Without Pretrain"), or a compressor of another kind or rate over a trained backbone
        fresh = {k: v.clone() for k, v in own.items() if _matches(k, skip_prefix)}
        if not fresh and not any(_matches(k, skip_prefix) for k in tensors):
            raise ValueError(f"--init-skip {skip_prefix!r} names no tensor of this model or of {path}")
        kept = {k: v for k, v in tensors.items() if not _matches(k, skip_prefix)}
        load_state_checked(model, {**kept, **fresh}, path)
        return
    if new_prefix:
        # modules added since the init file was written keep their fresh initialisation
        fill = {k: v.clone() for k, v in own.items() if _matches(k, new_prefix)}
        if not fill:
            raise ValueError(f"--init-new {new_prefix!r} names no tensor of this model")
        clash = sorted(k for k in fill if k in tensors)
        if clash:
            raise ValueError(f"--init-new {new_prefix!r}: {path} already has {clash[:3]}")
        load_state_checked(model, {**tensors, **fill}, path)
        return
    load_state_checked(model, tensors, path)


# ------------------------------------------------------------------------------------------------
# checks before any work
# ------------------------------------------------------------------------------------------------
def check_train_args(args: TrainArgs) -> None:
    """Every argument, path and optional dependency, checked before anything is built or written:
    :class:`pfp._cli.UsageError` naming the flag and what it takes."""
    if args.mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {args.mode!r}")
    for flag, value, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                            ("--save-every", args.save_every, 1), ("--log-every", args.log_every, 1),
                            ("--keep-checkpoints", args.keep_checkpoints, 1), ("--warmup", args.warmup, 0),
                            ("--num-videos", args.num_videos, 1), ("--max-retrieve", args.max_retrieve, 1),
                            ("--workers", args.workers, 0), ("--skip-nonfinite", args.skip_nonfinite, 0),
                            ("--seed", args.seed, 0)):
        check_number(flag, value, lo=lo, integer=True, allow_none=False)
    if args.seed >= 2 ** 63:
        raise UsageError(f"--seed must be an integer in [0, 2^63), got {args.seed}")
    for flag, value, lo in (("--threads", args.threads, 1), ("--until", args.until, 1),
                            ("--lora-rank", args.lora_rank, 0)):
        check_number(flag, value, lo=lo, integer=True)
    check_number("--lr", args.lr, lo=0, lo_open=True, allow_none=False)
    check_number("--compressor-lr", args.compressor_lr, lo=0, lo_open=True)
    check_number("--lora-alpha", args.lora_alpha, lo=0, lo_open=True)
    check_number("--clip-seconds", args.clip_seconds, lo=0, lo_open=True, hi=3600, allow_none=False)
    check_number("--max-minutes", args.max_minutes, lo=0, lo_open=True)
    check_number("--t-shift", args.t_shift, lo=0, lo_open=True, allow_none=False)
    check_number("--t-weight-power", args.t_weight_power, lo=0, hi=4, allow_none=False)
    for flag, value in (("--weight-decay", args.weight_decay), ("--grad-clip", args.grad_clip)):
        check_number(flag, value, lo=0, allow_none=False)
    for flag, value in (("--p-uncond", args.p_uncond), ("--p-no-history", args.p_no_history),
                        ("--history-noise", args.history_noise), ("--t-uniform", args.t_uniform),
                        ("--self-history", args.self_history)):
        check_number(flag, value, lo=0, hi=1, allow_none=False)
    lo, hi = args.self_history_t
    for v in (lo, hi):
        check_number("--self-history-t", v, lo=0, lo_open=True, hi=1, allow_none=False)
    if not lo <= hi:
        raise UsageError(f"--self-history-t must be LO HI with 0 < LO <= HI <= 1, got {lo} {hi}")
    check_number("--max-zoom", args.max_zoom, lo=1, allow_none=False)
    check_number("--mix-synthetic", args.mix_synthetic, lo=0, hi=1, hi_open=True, allow_none=False)
    for flag, pair in (("--sprite-radius", args.sprite_radius), ("--pattern-period", args.pattern_period)):
        for v in pair:
            check_number(flag, v, lo=0, lo_open=True, hi=1, allow_none=False)
        if not pair[0] <= pair[1]:
            raise UsageError(f"{flag} must be MIN MAX with 0 < MIN <= MAX <= 1 (units of the frame's shorter "
                             f"side), got {pair[0]:g} {pair[1]:g}")
    lo, hi = args.shot_seconds
    for v in (lo, hi):
        check_number("--shot-seconds", v, lo=0, lo_open=True, hi=3600, allow_none=False)
    if not lo <= hi:
        raise UsageError(f"--shot-seconds must be MIN MAX with 0 < MIN <= MAX, got {lo:g} {hi:g}")
    for flag, value, choices in (("--precision", args.precision, ("auto", "bf16", "fp32")),
                                 ("--lr-schedule", args.lr_schedule, ("constant", "cosine")),
                                 ("--export-dtype", args.export_dtype, ("fp32", "bf16")),
                                 ("--bad-data", args.bad_data, ("skip", "error")),
                                 ("--crop", args.crop, CROPS),
                                 ("--storyboards", args.storyboards, STORYBOARD_POLICIES)):
        if value not in choices:
            raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    if args.device != "auto":
        check_device("--device", args.device)
    if args.vram is not None:
        from pfp.memory import parse_bytes
        try:
            parse_bytes(args.vram, "--vram")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--vram plans one device; under torchrun shard the model with --fsdp instead")
    try:
        _text_cache_bytes(args)
    except ValueError as exc:
        raise UsageError(f"{exc} (or 0: no cache)") from None
    if (args.init_new or args.init_skip) and not args.init:
        raise UsageError(f"{'--init-new' if args.init_new else '--init-skip'} needs --init (the weights it applies to)")
    if args.init_new and args.init_skip:
        raise UsageError("give --init-new (tensors --init lacks) or --init-skip (tensors of --init to ignore), not both")
    if args.resume and args.overwrite:
        raise UsageError("give --resume (continue the run in --out) or --overwrite (start it again), not both")
    from pfp.memory import is_preset
    if args.rate is not None and args.config is None:
        raise UsageError("--rate goes with --config (a config file, or a preset such as wan22-ti2v-5b-480p)")
    if args.plan and is_preset(args.config) and args.model_dir is None:
        from pfp.memory import preset
        try:
            preset(args.config, args.rate)   # planned from its architecture: no folder needed
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif is_preset(args.config) or args.model_dir is not None or args.rate is not None:
        from pfp.memory import config_from_arg
        try:
            config_from_arg(args.config or "", args.model_dir, args.rate)   # the folder and rate, up front
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    for flag, path in (("--config", None if is_preset(args.config) else args.config), ("--init", args.init)):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise UsageError(f"--data must be 'synthetic' or a folder of videos, got {args.data!r} (no such folder)")
    # optional dependencies the run will need, asked for now rather than after the model is built
    if args.data != "synthetic":
        check_module("--data", "av", "av")
    if _lora_rank(args) > 0:
        check_module("--lora-rank", "peft", "peft")
    if args.mix_synthetic and args.data == "synthetic":
        raise UsageError("--mix-synthetic mixes synthetic scenes into a video folder's clips: give --data a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; name a folder for the run")
    check_writable_dir("--out", os.path.abspath(args.out), create=True)
    if args.export is not None:
        check_output_file("--export", args.export, (".safetensors",), create_dirs=True)  # e.g. inside --out


def _run_files(out: str) -> list:
    """What a run leaves in its folder (``--out``), of the names this module writes."""
    return [name for name in (CHECKPOINTS, *LEGACY_DIRS, "loss.csv") if os.path.lexists(os.path.join(out, name))]


def _find_resume_point(args: TrainArgs, rank: int, world: int) -> Optional[str]:
    """The checkpoint to resume from (None: start at step 0), after checking what ``--out`` holds.

    A folder that holds a run is continued only with ``--resume``, or started again with
    ``--overwrite`` (its files are removed later, by :func:`_start_run_dir`, once the data and the
    model have been checked); anything else is refused, so a re-run never mixes into an old log or
    replaces its checkpoints. With ``--resume``, rank 0 tidies what a crash left (:func:`recover`)."""
    found, refused = None, None
    if rank == 0:
        existing = _run_files(args.out)
        if existing and not (args.resume or args.overwrite):
            refused = (f"--out {args.out} already holds a run ({', '.join(existing)}); pass --resume to "
                       f"continue it or --overwrite to start it again")
        else:
            if args.resume and os.path.isdir(args.out):
                found, notes = recover(args.out)
                for note in notes:
                    print(f"resume: {note}", file=sys.stderr)
            if args.resume and found is None:
                print(f"resume: no complete checkpoint in {args.out}; starting at step 0", file=sys.stderr)
    if world > 1:   # every rank learns rank 0's answer, a refusal included (else the others hang or crash)
        import torch.distributed as dist
        holder = [(found, refused)]
        dist.broadcast_object_list(holder, src=0)
        found, refused = holder[0]
    if refused is not None:
        raise UsageError(refused)
    return found


# What a resumed run takes from the run it continues. A flag not given takes the run's value; one
# given with another value is refused (those that define the run: its data, model and random
# streams), said and used (those that steer the optimisation from here on, after which the run no
# longer equals one that was never stopped), or used (the run's outputs). --until, --max-minutes,
# --vram, --device, --threads and --workers belong to each invocation and are never taken.
_RESUME_FIXED = ("mode", "seed", "batch_size", "clip_seconds", "data", "num_videos", "sprite_radius",
                 "pattern_period", "shot_seconds", "lora_rank", "lora_alpha", "freeze_compressor", "freeze_text", "init",
                 "init_new", "init_skip", "config", "rate", "context_mode", "fsdp", "mix_synthetic", "storyboards",
                 "bad_data")
_RESUME_STEERING = ("steps", "lr", "weight_decay", "warmup", "lr_schedule", "grad_clip", "compressor_lr", "precision",
                    "max_retrieve", "p_uncond", "t_shift", "p_no_history", "history_noise", "t_weight_power",
                    "t_uniform", "self_history", "self_history_t", "crop", "max_zoom", "flip", "skip_nonfinite")
_RESUME_KEPT = ("export", "export_dtype", "save_every", "log_every", "keep_checkpoints")


def _recorded(args: TrainArgs) -> dict:
    """The run's arguments as its checkpoints record them (all but ``given``)."""
    return {k: v for k, v in asdict(args).items() if k != "given"}


def _plain(value):
    return json.loads(json.dumps(value))   # tuples as lists, as state.json holds them


def _resumed_args(args: TrainArgs, state: dict, rank: int) -> TrainArgs:
    """``args`` for continuing the run whose checkpoint state is ``state`` (see _RESUME_FIXED);
    UsageError for a run-defining flag that differs, or a --steps / --until already reached."""
    recorded = state.get("args") or {}
    defaults = TrainArgs()
    inherit, notes = {}, []
    for name in _RESUME_FIXED + _RESUME_STEERING + _RESUME_KEPT:
        if name not in recorded:
            continue
        given, was = _plain(getattr(args, name)), recorded[name]
        if given == was:
            continue
        flag = "--" + name.replace("_", "-")
        left_out = (name not in args.given if args.given is not None
                    else given == _plain(getattr(defaults, name)))
        if left_out and name != "mode":   # the mode is always given
            inherit[name] = tuple(was) if isinstance(was, list) else was
        elif name in _RESUME_KEPT:
            continue
        elif name in _RESUME_FIXED:
            shown = name if name == "mode" else flag
            raise UsageError(f"{shown} {given} differs from the run being resumed in {args.out} ({was}); "
                             f"resume with the run's own value, or start a new run in another --out")
        else:
            notes.append(f"resume: {flag} {given} differs from the run's {was}; the steps from here on use {given}")
    # equal is fine: a run killed after its last checkpoint finishes (the export) when run again
    step = int(state.get("step", 0))
    steps = inherit.get("steps", args.steps)
    for flag, value in (("--steps", steps), ("--until", args.until)):
        if value is not None and value < step:
            raise UsageError(f"{flag} {value} is before step {step} of the checkpoint in {args.out}: that run "
                             f"went further; give {flag} {step} or more")
    if rank == 0:   # only once every check has passed
        for note in notes:
            print(note, file=sys.stderr)
    return replace(args, **inherit) if inherit else args


def _start_run_dir(args: TrainArgs) -> None:
    """Make ``--out``, first removing the old run's files with ``--overwrite`` (rank 0)."""
    if args.overwrite:
        for name in _run_files(args.out):
            path = os.path.join(args.out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(args.out, exist_ok=True)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def _grad_norm(params: list, clip: float) -> torch.Tensor:
    """The gradients' total norm, clipped to ``clip`` when > 0 (needed either way: a non-finite
    norm means a step that must not be taken)."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


def _check_finite_model(model: nn.Module, what: str, world: int = 1) -> None:
    """Nothing poisoned is written: every parameter must be finite (FSDP: every rank's shard).
    Frozen weights parked in float8 by a training plan (which isfinite does not take) are read
    upcast: e4m3 has no Inf, and its NaN upcasts to NaN."""
    def finite(p) -> bool:
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.to(torch.bfloat16)
        return bool(torch.isfinite(t).all())
    names = [n for n, p in model.named_parameters() if not finite(p)]
    if world > 1:
        import torch.distributed as dist
        gathered = [None] * world
        dist.all_gather_object(gathered, names)
        names = sorted({n for part in gathered for n in part})
    if names:
        raise RunFailure(f"{what}: parameter {names[0]} holds NaN or Inf values; nothing was written "
                         f"(lower --lr or --grad-clip)")


class _LossLog:
    """``loss.csv``: one header, then a row per logged step. On resume it is cut back to the
    checkpoint's step first (rows after it, an unfinished last line, a second header), so the log
    of a resumed run equals an uninterrupted run's in every column but the timings."""

    HEADER = ["step", "loss", "lr", "samples_per_s", "elapsed_s"]

    def __init__(self, path: str, start: int):
        from pfp._io import atomic_target
        rows = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                for row in csv.reader(f):
                    if len(row) == len(self.HEADER) and row[0].isdigit() and int(row[0]) <= start:
                        rows.append(row)
        with atomic_target(path, ".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([self.HEADER, *rows])
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    def write(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def sync(self) -> None:
        """To disk before a checkpoint names a step, so the log never lags a saved checkpoint."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _resolve_config(args: TrainArgs, resume_state: Optional[dict]) -> PFPConfig:
    """The model config: the checkpoint's when resuming, else --config, --init's, or the default."""
    if resume_state is not None:
        config = PFPConfig.from_dict(resume_state["config"])
    elif args.config:
        from pfp.memory import config_from_arg
        config = config_from_arg(args.config, args.model_dir, args.rate)
    elif args.init and os.path.isdir(args.init):   # a run folder or checkpoint: its config
        state = read_state(resolve_checkpoint(args.init))
        config = PFPConfig.from_dict(state["config"]) if state.get("config") else PFPConfig()
    elif args.init:
        config = read_weights(args.init)[1] or PFPConfig()
    else:
        config = PFPConfig()
    if args.context_mode and resume_state is None:
        config.context_mode = args.context_mode
    config.check()
    return config


@dataclass
class FrozenBase:
    """What a LoRA run's checkpoints leave out: the frozen parameters (the base model's weights),
    which a resume rebuilds from the config's model folder and the run's ``--init`` file instead of
    reading gigabytes back (peft saves adapters the same way). ``sha256`` fingerprints them (names,
    dtypes, shapes and bytes, in name order), so a base that changed since is refused, never trained
    on silently."""

    keys: frozenset
    sha256: str
    init: Optional[str]          # the --init file or checkpoint they were read from (absolute), if any
    init_new: Optional[str]
    init_skip: Optional[str]

    def record(self) -> dict:
        return {"params": len(self.keys), "sha256": self.sha256, "init": self.init,
                "init_new": self.init_new, "init_skip": self.init_skip}


def _frozen_params(model: PFPModel) -> dict:
    """The saved-key parameters that do not train, by state-dict name."""
    return {n: p for n, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad and model.is_saved_key(n)}


def _fingerprint(params: dict) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order; the tensors are
    hashed on a thread pool (hashlib lets go of the GIL), ~1 GB/s per core."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> bytes:
        t = params[name].detach()
        digest = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        return digest.digest()
    with ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
        return hashlib.sha256(b"".join(pool.map(one, sorted(params)))).hexdigest()


def _init_of(args: TrainArgs, resume_state: Optional[dict], resume_path: Optional[str]) -> Optional[tuple]:
    """``(path, init_new, init_skip)`` to load before LoRA goes on: the run's ``--init`` on a fresh
    start; on a resume, the one recorded by a checkpoint that left the frozen base out (None for one
    that holds every weight)."""
    if resume_state is None:
        return (args.init, args.init_new, args.init_skip) if args.init else None
    base = resume_state.get("frozen_base")
    if not base or not base.get("init"):
        return None
    if not os.path.exists(base["init"]):
        raise ValueError(f"checkpoint {resume_path} keeps the trained weights only; its frozen base weights came "
                         f"from --init {base['init']}, which no longer exists (restore it there to resume)")
    return base["init"], base.get("init_new"), base.get("init_skip")


def _build_trainee(args: TrainArgs, config: PFPConfig, device, resume_path: Optional[str],
                   resume_state: Optional[dict], move: bool = True
                   ) -> tuple[PFPModel, bool, int, int, Optional[FrozenBase]]:
    """The model with its initial or resumed weights, LoRA and trainable flags, on ``device`` (left
    on the CPU with ``move=False``: a memory plan places it). Returns (model, lora, first step,
    non-finite steps skipped so far, the frozen base its checkpoints leave out: LoRA runs only)."""
    # every RNG a checkpoint records starts from the seed, so a resumed run's states equal an
    # uninterrupted run's (Python's and NumPy's would otherwise start from OS entropy)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed % 2 ** 32)
    model = build_model(config)
    init = _init_of(args, resume_state, resume_path)
    if init is not None:
        _load_init(model, *init)
    rank_lora = _lora_rank(args)
    lora = rank_lora > 0
    if lora:
        apply_lora(model, rank_lora, args.lora_alpha)
    _set_trainable(model, args, lora)
    frozen = None
    # a run resumed from a checkpoint that holds every weight goes on writing such checkpoints: its
    # frozen base came from that checkpoint, not from files a resume could rebuild it from
    whole = resume_state is not None and not resume_state.get("frozen_base")
    if lora and not args.plan and not whole:
        params = _frozen_params(model)
        init_path = os.path.abspath(init[0]) if init is not None else None
        frozen = FrozenBase(frozenset(params), _fingerprint(params), init_path,
                            *(init[1:] if init is not None else (None, None)))
    if args.grad_checkpointing:
        _plain_backbone(model.backbone).set_gradient_checkpointing(True)
    if move:
        model.to(device)
    if resume_state is None:
        return model, lora, 0, 0, frozen
    # the RNG states are restored last, right before the first step (train), so that nothing set
    # up in between (model init, data loader seeds) draws from them
    resume_tensors, st = load_checkpoint(resume_path, restore_rng=False, verify=False)
    recorded = st.get("frozen_base")
    if recorded and (frozen is None or recorded["sha256"] != frozen.sha256):
        raise ValueError(f"checkpoint {resume_path} keeps the trained weights only, and the frozen base weights "
                         f"rebuilt for it (the config's model folder"
                         + (f", --init {recorded['init']}" if recorded.get("init") else "")
                         + ") differ from the ones it was trained on; resume with the same base files")
    missing, unexpected = model.load_state_dict(resume_tensors, strict=False)
    bad = [k for k in missing if model.is_saved_key(k) and not (recorded and k in frozen.keys)]
    if bad or unexpected:
        raise ValueError(f"checkpoint {resume_path} does not fit: missing {bad[:4]}, unexpected {unexpected[:4]}")
    return model, lora, st["step"], st.get("nonfinite_skipped", 0), frozen


def _distribute(loss_module: nn.Module, model: PFPModel, args: TrainArgs, device, world: int) -> nn.Module:
    """What runs a step: the loss module itself, or under torchrun its DDP or FSDP2 form."""
    if world <= 1:
        return loss_module
    if args.fsdp:
        # FSDP2: each block is its own shard group; the backbone calls the blocks themselves, so
        # FSDP gathers a block's parameters around its forward
        from torch.distributed.fsdp import fully_shard
        for blk in _plain_backbone(model.backbone).blocks:
            fully_shard(blk)
        fully_shard(loss_module)
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=True)


def _make_optimizer(model: PFPModel, args: TrainArgs, resume_path: Optional[str], fsdp: bool):
    """AdamW over the trainable parameters, with the checkpoint's state when resuming."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    # With --compressor-lr, two groups: the compressor's own parameters and the rest, so a freshly
    # initialised compressor can take larger steps than a pretrained backbone. Each group's lr_scale
    # multiplies the schedule (_lr_at). The patch embedding is the backbone's, so it is in "the rest".
    # Without it, one group, as runs made before the flag existed have (so they resume).
    groups = [{"params": params, "lr_scale": 1.0}]
    if args.compressor_lr is not None:
        own = {id(p) for c in model.compressors for n, p in c.named_parameters()
               if p.requires_grad and not n.startswith("patch_embed.")}
        groups = [{"params": [p for p in params if id(p) not in own], "lr_scale": 1.0},
                  {"params": [p for p in params if id(p) in own], "lr_scale": args.compressor_lr / args.lr}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    if resume_path is not None:
        opt_state = read_optimizer_state(resume_path)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            if len(opt_state["param_groups"]) != len(groups):
                had = "with" if len(opt_state["param_groups"]) > 1 else "without"
                raise ValueError(f"--resume: the run was started {had} --compressor-lr, which splits the "
                                 f"optimizer's parameters into groups; resume it {had} the flag")
            optimizer.load_state_dict(opt_state)
        for g, mine in zip(optimizer.param_groups, groups):   # this run's flags, not the checkpoint's
            g["lr_scale"] = mine["lr_scale"]
    return optimizer, params


def _forward_backward(runner: nn.Module, optimizer, params: list, batch: dict, gen, args: TrainArgs,
                      device, world: int) -> tuple[float, bool, torch.Tensor]:
    """Loss and gradients of one step; returns (loss averaged over ranks, whether every rank's loss
    and the synced gradients are finite, gradient norm). One host sync per step."""
    # the last step's gradients are freed before this forward (the memory plan counts them only
    # from the backward to the optimizer step)
    optimizer.zero_grad(set_to_none=True)
    loss = runner(batch, gen)
    loss.backward()
    grad_norm = _grad_norm(params, args.grad_clip)
    stats = torch.stack([loss.detach().float(), (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
                         .float()]).cpu()
    if world > 1:
        import torch.distributed as dist
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu() / world
    return float(stats[0]), bool(stats[1] == 1), grad_norm


def _out_of_time(args: TrainArgs, t_start: float, world: int) -> bool:
    """--max-minutes is up (every rank stops at the same step)."""
    if args.max_minutes is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t_start > 60 * args.max_minutes)])
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(flag)
    return bool(flag.item() > 0)


def train(args: TrainArgs) -> dict:
    """Run a training job; returns a summary (final step, last loss, samples/s).

    Phases: check every argument and path; find the checkpoint to resume from; the config; the
    data (every file checked before step 1); the model and optimizer; then the steps, with
    logging, non-finite guards and crash-safe checkpoints; the export."""
    check_train_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    rank, world = _dist_setup(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    autocast_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                      "fp32": None}[args.precision]

    from pfp.memory import is_preset
    if args.plan and is_preset(args.config) and args.model_dir is None:
        return _plan_preset(args)   # the preset's architecture, traced: no folder, no weights, no data
    resume_path = _find_resume_point(args, rank, world)
    resume_state = read_state(resume_path) if resume_path is not None else None
    if resume_state is not None:
        args = _resumed_args(args, resume_state, rank)
    config = _resolve_config(args, resume_state)
    # every file checked before step 1 (--plan only plans: no data is read)
    dataset = None if args.plan else _dataset(args, config, progress=args.progress and rank == 0)
    report = getattr(dataset, "skip_report", lambda: None)()
    if report and rank == 0:
        print(f"data: {report} (--bad-data error refuses them instead)", file=sys.stderr)

    planned = args.vram is not None or args.plan
    model, lora, start, skipped, frozen = _build_trainee(args, config, device, resume_path, resume_state,
                                                         move=not planned)
    placement = None
    if planned:
        plan = _training_plan(model, args, config)
        if args.plan:
            if rank == 0:
                _print_training_plan(plan, args, config)
            return {"step": start, "loss": float("nan"), "samples_per_s": 0.0, "rank": rank, "world": world,
                    "model": model, "plan": plan}
        from pfp.offload import TrainPlacement
        _plain_backbone(model.backbone).set_gradient_checkpointing(True)   # what the plan was traced with
        placement = TrainPlacement(model, device, plan.choices)
    objective = ObjectiveConfig(max_retrieve=args.max_retrieve, p_uncond=args.p_uncond, t_shift=args.t_shift,
                                p_no_history=args.p_no_history, history_noise=args.history_noise,
                                t_weight_power=args.t_weight_power, t_uniform=args.t_uniform,
                                self_history=args.self_history, self_history_t=tuple(args.self_history_t))
    loss_module = _LossModule(model, args.mode, objective, config.chunk_latent_frames, device, autocast_dtype,
                              phases=placement, encode_text=_text_cache(model, args))
    runner = _distribute(loss_module, model, args, device, world)
    optimizer, params = _make_optimizer(model, args, resume_path, world > 1 and args.fsdp)

    if rank == 0:
        _start_run_dir(args)
    log = _LossLog(os.path.join(args.out, "loss.csv"), start) if rank == 0 else None
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start, disable=not (args.progress and rank == 0),
               desc=args.mode, unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    t_start = time.perf_counter()
    window_t, window_n, last_loss, sps = time.perf_counter(), 0, float("nan"), float("nan")
    elapsed_before = (resume_state or {}).get("elapsed_s", 0.0)
    saved_step = start if resume_state is not None else None
    step = start - 1
    try:
        batches = _batches(dataset, args, rank, start)
        if resume_path is not None:
            restore_rng_state(resume_path, resume_state)
        last = args.steps if args.until is None else min(args.steps, args.until)
        work_started()   # every argument, file and the model checked: what fails from here is exit 1
        for step in range(start, last):
            gen = step_generator(args.seed, step, rank)
            batch = next(batches)
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(step, args) * g["lr_scale"]
            last_loss, finite, grad_norm = _forward_backward(runner, optimizer, params, batch, gen, args, device,
                                                             world)
            done = step + 1
            if finite:
                optimizer.step()
            else:
                skipped += 1
                what = "loss" if not math.isfinite(last_loss) else "gradient"
                if skipped > args.skip_nonfinite:
                    kept = f"step {saved_step}" if saved_step is not None else "none yet"
                    raise RunFailure(f"non-finite {what} at step {done} (loss {last_loss}, gradient norm "
                                     f"{float(grad_norm)}): stopped; newest checkpoint: {kept}, nothing after it "
                                     f"was saved; lower --lr, or pass --skip-nonfinite N to skip up to N such steps")
                optimizer.zero_grad(set_to_none=True)
                bar.write(f"warning: non-finite {what} at step {done}: step skipped "
                          f"({skipped} of at most {args.skip_nonfinite})", file=sys.stderr)
            window_n += args.batch_size * world
            if done % args.log_every == 0 or done == last:
                now = time.perf_counter()
                sps = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                if log is not None:
                    log.write([done, f"{last_loss:.6f}", f"{_lr_at(step, args):.3g}", f"{sps:.3f}",
                               f"{elapsed_before + now - t_start:.1f}"])
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{sps:.2f}")
            bar.update(1)
            out_of_time = _out_of_time(args, t_start, world)
            if done % args.save_every == 0 or done == last or out_of_time:
                if log is not None:
                    log.sync()
                # the original weights, where the checkpoint holds frozen ones (not a LoRA run's)
                with placement.native() if placement is not None and frozen is None else _nullcontext():
                    _save(model, optimizer, done, args, config, lora, rank, world,
                          elapsed_before + time.perf_counter() - t_start, skipped, frozen)
                saved_step = done
            if out_of_time:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
        if placement is not None:   # hooks off, the original weights back, also after a failure
            placement.close()
    if args.export and rank == 0:
        _check_finite_model(model, f"--export {args.export}")
        export_weights(model, args.export, args, dtype=torch.bfloat16 if args.export_dtype == "bf16" else None)
    elapsed = time.perf_counter() - t_start
    cache = loss_module.encode_text
    return {"step": step + 1, "loss": last_loss, "samples_per_s": (step + 1 - start) * args.batch_size * world / max(elapsed, 1e-9),
            "rank": rank, "world": world, "model": model,
            "text_cache": None if cache is None else {"prompts": len(cache), "hits": cache.hits, "misses": cache.misses}}


def _clip_chunks(args: TrainArgs, config: PFPConfig) -> int:
    """Chunks per training clip: ``--clip-seconds`` must be a whole number of the config's chunks
    (nothing is rounded away), and finetuning needs two (a history and a target); UsageError
    otherwise, naming the lengths that are."""
    chunk_s = config.chunk_seconds
    least = 2 if args.mode == "finetune" else 1
    whole = whole_chunks(args.clip_seconds, chunk_s, least)
    if whole is None:
        chunks = args.clip_seconds / chunk_s
        need = "at least two chunks (a history and a target)" if args.mode == "finetune" else "whole chunks"
        raise UsageError(f"--clip-seconds {args.clip_seconds:g} is {chunks:.3g} chunks of {chunk_s:g} s "
                         f"({config.chunk_frames} frames at {config.fps:g} fps); {args.mode} takes {need}: "
                         f"e.g. {least * chunk_s:g}, {(least + 1) * chunk_s:g} or {(least + 2) * chunk_s:g}")
    return whole


def _lora_rank(args: TrainArgs) -> int:
    """``--lora-rank``, by default 0 (the backbone trains whole) for pretrain and 128 for finetune."""
    return args.lora_rank if args.lora_rank is not None else (0 if args.mode == "pretrain" else 128)


def _self_history_on(args: TrainArgs) -> bool:
    """Whether the steps decode and re-encode histories (finetune's ``--self-history``)."""
    return args.mode == "finetune" and args.self_history > 0


def _chosen_plan(trace, args: TrainArgs, what: str):
    """The training plan for ``--vram`` (the plain run's estimate for ``--plan`` alone); a budget
    nothing fits is refused with one line naming ``what`` is planned and the smallest budget that
    does."""
    from pfp.memory import parse_bytes
    from pfp.train.memory import choose_training
    cached = _text_cache_bytes(args) is not None and trace.text_fixed   # as _text_cache decides
    plan = choose_training(trace, parse_bytes(args.vram, "--vram") if args.vram is not None else None, cached)
    if not plan.fits:
        raise UsageError(plan.too_small(f"--vram {args.vram}", what))
    return plan


def _training_plan(model: PFPModel, args: TrainArgs, config: PFPConfig):
    """The memory plan, traced on the model as built (on the CPU, with LoRA and trainable flags)."""
    from pfp.train.memory import trace_training
    trace = trace_training(model, args.batch_size, _clip_chunks(args, config), self_history=_self_history_on(args))
    return _chosen_plan(trace, args, f"this training run (--batch-size {args.batch_size}, --clip-seconds "
                                     f"{args.clip_seconds:g})")


def _plan_preset(args: TrainArgs) -> dict:
    """``--plan`` for a preset without ``--model-dir``: its full-size parts traced on fake tensors."""
    from pfp.memory import preset, preset_config
    from pfp.train.memory import trace_training_preset
    p = preset(args.config, args.rate)
    config = preset_config(p, "")
    rank = _lora_rank(args)
    trace = trace_training_preset(p, args.batch_size, _clip_chunks(args, config), rank, args.mode,
                                  self_history=_self_history_on(args))
    plan = _chosen_plan(trace, args, f"{p.name} ({args.mode}, --batch-size {args.batch_size}, --clip-seconds "
                                     f"{args.clip_seconds:g}, LoRA rank {rank})")
    _print_training_plan(plan, args, config)
    return {"step": 0, "loss": float("nan"), "samples_per_s": 0.0, "rank": 0, "world": 1, "model": None, "plan": plan}


def _print_training_plan(plan, args: TrainArgs, config: PFPConfig) -> None:
    from pfp.memory import ALLOWANCE_BYTES, ALLOWANCE_FRACTION
    print(f"{args.mode}: batch {args.batch_size} of {_clip_chunks(args, config)} chunks at "
          f"{config.video_size[0]}x{config.video_size[1]}: {plan.context_tokens} context tokens at the longest "
          f"history, {plan.target_tokens} target tokens" + (f"; budget {args.vram}" if args.vram else
                                                            "; no budget (everything resident)"))
    print(plan.choices_line())
    print(plan.table())
    print(f"allowance in every peak: {ALLOWANCE_BYTES >> 20} MiB + {ALLOWANCE_FRACTION:.0%}; gradient "
          f"checkpointing on; time lost to the choices ~{plan.seconds_lost_per_chunk:.2f} s per step (estimate)")


def _full_state(model: PFPModel, world: int, fsdp: bool, leave_out: frozenset = frozenset()) -> dict:
    if world > 1 and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    return {k: v for k, v in state.items() if model.is_saved_key(k) and k not in leave_out}


def _save(model, optimizer, step, args, config, lora, rank, world, elapsed, skipped,
          frozen: Optional[FrozenBase] = None) -> None:
    """A checkpoint of ``step``; a LoRA run's leaves its frozen base out (:class:`FrozenBase`)."""
    _check_finite_model(model, f"checkpoint of step {step}", world)
    state = _full_state(model, world, args.fsdp, frozen.keys if frozen is not None else frozenset())
    opt = optimizer
    if world > 1 and args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        extra = {"config": config.to_dict(), "args": _recorded(args), "lora": lora,
                 "elapsed_s": elapsed, "nonfinite_skipped": skipped}
        if frozen is not None:
            extra["frozen_base"] = frozen.record()
        save_checkpoint(args.out, state, opt, step, keep=args.keep_checkpoints, extra=extra)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def export_weights(model: PFPModel, path: str, args: Optional[TrainArgs] = None, dtype=None) -> None:
    """Merge LoRA (if any) and write the model in :func:`pfp.weights.save_weights` format."""
    merge_lora(model)
    extra = {"trained_with": _recorded(args)} if args is not None else None
    save_weights(model, path, dtype=dtype, extra=extra)


__all__ = ["TrainArgs", "train", "check_train_args", "apply_lora", "merge_lora", "export_weights", "step_generator", "MODES"]
