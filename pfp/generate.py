"""Autoregressive multi-shot video generation: ``python -m pfp.generate``.

Chunk by chunk:

1. the sampler denoises the next chunk's latents, conditioned on the prompt active at the chunk's
   start (the storyboard's latest shot whose start <= t) and on the compressed history;
2. the chunk is decoded by the VAE, through a stream that carries the VAE's causal state, so a
   causal temporal VAE (Wan's: 1 + 4k frames) gives the same frames as decoding the whole latent;
3. the chunk joins the history: its latents feed the high-res branch, and its frames, taken at
   low resolution and low fps and re-encoded by the VAE (causally, streamed), feed the low-res
   branch, exactly as in training (:func:`pfp.data.to_low_res` of the whole video);
4. ``CompressorStream.append`` compresses only that chunk; in ``"cached"`` context mode the
   backbone then computes the per-layer K/V of only the new context tokens.

Nothing earlier is recomputed. With no arguments the built-in tiny model generates the built-in
storyboard on the CPU. Bad input exits with status 2 and one line on stderr; the mp4 is written to
a temporary file and renamed, so a failed run leaves no partial video.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from pfp.compressor import _empty_context, mix_contexts
from pfp.config import whole_chunks
from pfp._cli import (Parser, RunFailure, UsageError, check_device, check_module, check_output_file, run_cli,
                      work_started)

BUILTIN_STORYBOARD = [
    {"start": 0.0, "end": 1.5, "prompt": "a red circle and a yellow square on a blue background"},
    {"start": 1.5, "end": 3.0, "prompt": "a white triangle on a green and black striped background"},
    {"start": 3.0, "end": 4.0, "prompt": "a red circle and a yellow square on a blue background"},
]


InputError = UsageError  # bad user input: one line, exit status 2 (the name this module always raised)


@dataclass
class GenerationResult:
    video: torch.Tensor                       # [3, T, H, W] float in [-1, 1]
    latents: torch.Tensor                     # [1, C, T', h, w] every generated chunk
    lr_latents: torch.Tensor                  # [1, C, T_lr, h', w'] what the low-res branch was fed
    context: object                           # the stream's final Context
    prompts: list
    timings: list = field(default_factory=list)   # per chunk: compress / denoise / decode seconds (and,
                                                  # on CUDA, each phase's peak allocated bytes)
    context_cache: object = None              # final ContextKV (cached mode)
    plan: Optional[dict] = None               # the memory plan's choices that ran (None: all on the device)
    bytes_moved: int = 0                      # host-to-device bytes the plan's moves cost
    mix_lr_latents: list = field(default_factory=list)  # config.mix_compressors: what each one's low-res branch was fed


def chunk_plan(config, seconds: float) -> int:
    """Number of chunks for ``seconds`` of video (``seconds / chunk_seconds``, whole); InputError
    saying what to use otherwise.

    With a causal VAE of temporal factor tf > 1 (Wan: 4) the first latent frame decodes to one
    frame, so K chunks make ``K * chunk_frames - (tf - 1)`` frames (:meth:`PFPConfig.clip_frames`):
    the video covers ``seconds`` from its first frame's start to its last frame's end, less
    ``(tf - 1) / fps``. The message names the frame counts too."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise InputError(f"--seconds must be a positive number, got {seconds}")
    frames = seconds * config.fps
    per = config.chunk_frames
    tf = config.vae_temporal
    n = frames / per
    chunks = whole_chunks(seconds, config.chunk_seconds)
    if chunks is None:
        lo_n, hi_n = max(1, math.floor(n + 1e-6)), max(1, math.ceil(n - 1e-6))
        lo, hi = lo_n * per / config.fps, hi_n * per / config.fps
        choices = f"{lo:g}" if lo == hi else f"{lo:g} or {hi:g}"
        if tf == 1:
            raise InputError(f"--seconds {seconds:g} gives {frames:g} frames at {config.fps:g} fps, but this model "
                             f"generates chunks of {per} frames ({per / config.fps:g} s); use --seconds {choices}")
        fr = f"{config.clip_frames(lo_n)}" if lo == hi else f"{config.clip_frames(lo_n)} or {config.clip_frames(hi_n)}"
        raise InputError(f"--seconds {seconds:g} is not a whole number of chunks: this model generates chunks of "
                         f"{per} frames ({per / config.fps:g} s at {config.fps:g} fps), and its causal VAE (temporal "
                         f"factor {tf}, 1 + {tf}*k frames) makes the first chunk {per - (tf - 1)} frames; use "
                         f"--seconds {choices} ({fr} frames)")
    return chunks


def _clock(device: torch.device) -> float:
    """Host time after the device's queued work: CUDA runs asynchronously, so the per-phase timings
    (one sync per phase per chunk, none inside the sampler's steps) wait for it first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak(device: torch.device) -> Optional[int]:
    """On CUDA, the most memory allocated since the last call (then reset), so each phase of a chunk
    gets its own peak; None elsewhere."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(peak)


def _given_chunks(history: Optional[torch.Tensor], lat_shape: tuple, n_chunks: int, device) -> tuple:
    """(history on ``device`` in fp32, how many whole chunks it holds); (None, 0) without one.
    InputError unless it is ``[1, C, k*n, h, w]`` latents of 0 < k < n_chunks chunks."""
    if history is None:
        return None, 0
    n = lat_shape[2]
    if (not isinstance(history, torch.Tensor) or history.dim() != 5 or history.shape[0] != 1
            or tuple(history.shape[1:2] + history.shape[3:]) != (lat_shape[1], *lat_shape[3:])
            or history.shape[2] % n or not 0 < history.shape[2] // n < n_chunks):
        raise InputError(f"history must be [1, {lat_shape[1]}, k*{n}, {lat_shape[3]}, {lat_shape[4]}] latents of "
                         f"0 < k < {n_chunks} whole chunks, got "
                         f"{tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__}")
    return history.to(device=device, dtype=torch.float32), history.shape[2] // n


@torch.no_grad()
def generate(model, storyboard, seconds: float, *, seed: int = 0, steps: int = 20, cfg: Optional[float] = None,
             cfg_min_t: Optional[float] = None, shift: Optional[float] = None, eta: Optional[float] = None, device="cpu",
             size: Optional[tuple] = None, progress: bool = True, history: Optional[torch.Tensor] = None,
             memory_budget=None, plan=None, cfg_2: Optional[float] = None,
             image: Optional[torch.Tensor] = None, sequence_parallel=None, memory: bool = True) -> GenerationResult:
    """Generate ``seconds`` of video for a :class:`pfp.text.Storyboard` with a :class:`pfp.weights.PFPModel`.

    Each chunk is ``config.chunk_latent_frames`` (n) latent frames ``[1, C, n, H/s, W/s]``. The VAE
    decodes them through a :func:`pfp.vae.decode_stream` that carries its causal state across
    chunks, so the video equals one decode of all the latents: ``1 + tf*(n-1)`` frames from the
    first chunk and ``tf*n`` from each later one (tf = the VAE's temporal factor; ``n`` frames
    each when tf = 1). The low-res branch takes, from each chunk's frames, those that
    :func:`pfp.data.to_low_res` takes from the whole video (:meth:`PFPConfig.clip_spec`), resized the
    same way, and re-encodes them through an :func:`pfp.vae.encode_stream` (frames of an unfinished
    causal group wait for the next chunk), so the LR latents equal training's
    ``vae.encode(to_low_res(video))``. Returns a :class:`GenerationResult` (video ``[3, T, H, W]``).

    history: optional ``[1, C, k*n, H/s, W/s]`` latents of a real video's first ``k`` chunks (e.g.
    ``vae.encode`` of its frames): those chunks are taken as given instead of sampled (decoded,
    compressed and cached exactly like sampled ones), and generation continues after them, so the
    result shows what the model remembers of that history. ``k`` must be < the number of chunks.

    cfg, cfg_min_t, shift, eta, cfg_2: the sampler's settings (:func:`pfp.sampler.sample`); None takes
    the model config's ``sample_cfg``, ``sample_cfg_min_t``, ``sample_shift``, ``sample_eta`` and
    ``sample_cfg_2`` (the low-noise expert's guidance, with two experts).

    image: optional ``[3, H, W]`` frame in [-1, 1] at the video's size: image-to-video. With a
    backbone that reads a condition beside the latent (Wan 2.1 I2V), as ``WanImageToVideoPipeline``
    does: the first chunk's condition is the picture's (:func:`pfp.i2v.wan_i2v_condition`), every
    later chunk's says that no frame is given (mask 0, the latent of blank frames), so they follow
    the compressed memory; the picture's image-encoder states feed every chunk's image
    cross-attention. Such a backbone needs ``image``. Otherwise as Wan 2.2 TI2V does it: the
    picture's VAE latent is the first chunk's first latent frame, held there while the rest is
    denoised (:func:`pfp.sampler.sample`'s ``first_frame``), so the video starts from it.

    sequence_parallel: a :class:`pfp.parallel.SequenceParallel` (every rank of its group calls
    generate with the same arguments): each denoising step's target tokens are split over the
    ranks, with an all-to-all over heads around self-attention, and each rank caches only its heads
    of the context K/V. Every rank returns the same video and latents; each result's
    ``context_cache`` holds that rank's heads only.

    memory: False gives the backbone none of the compressors' tokens (their streams still run on
    every chunk; a sliding window, if the config has one, still applies). The caption-only
    reference for what the memory adds: ``pfp.eval consistency --no-memory`` scores it.

    memory_budget: a device memory budget (bytes, or a size such as ``"12GiB"``): :mod:`pfp.memory`
    traces this model (no weights read, nothing allocated) and picks the fastest plan that keeps
    every phase of a chunk within it; ValueError naming the smallest budget that fits when none
    does. plan: a :class:`pfp.memory.Plan`, its ``choices`` dict (``{"offload": "block", ...}``) or a
    :class:`pfp.offload.Placement` of this model, carried out as given. Either runs the model through a :class:`pfp.offload.Placement`: parts move
    on and off the device between phases, and at the end every part is back on the host (CPU);
    without them the whole model moves to ``device`` and stays there. The result's ``plan`` is the
    choices that ran and ``bytes_moved`` the host-to-device bytes they cost.
    """
    from pfp.offload import Placement

    config = model.config
    device = torch.device(device)
    n_chunks = chunk_plan(config, seconds)
    h, w = check_size(config, size) if size is not None else tuple(config.video_size)
    if memory_budget is not None and plan is None:
        from pfp.memory import parse_bytes, plan_model
        budget = memory_budget if isinstance(memory_budget, int) else parse_bytes(memory_budget, "memory_budget")
        plan = plan_model(model, budget, seconds=seconds, size=(h, w), steps=steps, cfg=cfg, cfg_2=cfg_2)
        if not plan.fits:
            raise InputError(plan.too_small(f"memory_budget {memory_budget}", "this model"))
    choices = None if plan is None else dict(getattr(plan, "choices", plan))
    backbone, vae = model.backbone, model.vae
    s = vae.spatial_factor
    lat_shape = (1, backbone.latent_channels, config.chunk_latent_frames, h // s, w // s)
    # every input is checked before anything moves or a hook goes on
    history, n_given = _given_chunks(history, lat_shape, n_chunks, device)
    wants_condition = getattr(backbone, "condition_channels", 0) > 0
    if wants_condition and image is None:
        raise InputError("this model is image-to-video (its backbone reads a condition beside the latent, as "
                         "Wan I2V does): give image= (--image PIC)")
    if image is not None:
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != (3, h, w):
            raise InputError(f"image must be a [3, {h}, {w}] frame in [-1, 1] (the video's size), got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
        if n_given:
            raise InputError("give image or history, not both: both set the video's start")
    _check_heads_split(sequence_parallel, backbone)
    if isinstance(plan, Placement) and (plan.model is not model or plan.device != device):
        raise ValueError("plan: a Placement must be of this model and for this device")
    model.eval()
    if isinstance(plan, Placement):
        placement = plan
    else:
        placement = Placement(model, device, choices) if choices is not None else None
    if placement is None:
        model.to(device)
    try:
        return _generate_placed(model, storyboard, n_chunks, (h, w), lat_shape, history, n_given, image,
                                placement, choices, steps=steps, cfg=cfg, cfg_min_t=cfg_min_t, cfg_2=cfg_2,
                                shift=shift, eta=eta, seed=seed, device=device, progress=progress,
                                sequence_parallel=sequence_parallel, memory=memory)
    finally:
        if placement is not None:
            placement.close()


def _generate_placed(model, storyboard, n_chunks, size, lat_shape, history, n_given, image, placement, choices, *,
                     steps, cfg, cfg_min_t, cfg_2, shift, eta, seed, device, progress, sequence_parallel, memory):
    """generate()'s run, its inputs checked and the model placed."""
    from tqdm import tqdm

    from pfp.data import to_low_res_part
    from pfp.sampler import sample
    from pfp.vae import decode_stream, encode_stream
    from pfp.window import window_context, with_window

    work_started()   # what fails from here is a failure while generating (exit 1), not bad input
    config = model.config
    h, w = size
    backbone, compressor, vae = model.backbone, model.compressor, model.vae
    kv_choice = placement.choices["kv"] if placement is not None else "native"
    kv_storage = "fp8" if kv_choice == "fp8" else "native"   # "buffer": native K/V, read through buffers
    # the whole video, as training would feed it: one low-res input per compressor (config.mix_compressors)
    specs = [c.clip_spec(n_chunks, (h, w)) for c in config.branch_configs()]
    shift = config.sample_shift if shift is None else shift
    eta = config.sample_eta if eta is None else eta
    cfg = config.sample_cfg if cfg is None else cfg
    cfg_min_t = config.sample_cfg_min_t if cfg_min_t is None else cfg_min_t
    cfg_2 = config.sample_cfg_2 if cfg_2 is None else cfg_2
    generator = torch.Generator().manual_seed(int(seed))
    streams = [c.stream(1, keep_features=config.cross_attention) for c in model.compressors]
    if placement is not None and placement.choices["decode"] != "whole":   # decode's peak follows the tile
        from pfp.memory import TILE_OVERLAP
        from pfp.offload import DECODE_TILES
        from pfp.vae import tiled_decode_stream
        decoder = tiled_decode_stream(vae, DECODE_TILES[placement.choices["decode"]], TILE_OVERLAP)
    else:
        decoder = decode_stream(vae)
    lr_encoders = [encode_stream(vae) for _ in streams]
    cache = None
    window = config.sliding_window   # newest latent frames given uncompressed beside the context (pfp.window)
    recent = None                    # those frames, [1, C, <= window, h, w]
    context = None                   # what the next chunk is conditioned on
    chunk_seconds = config.chunk_frames / config.fps
    # every prompt is encoded once, up front, so the text encoder can leave the device after
    text_cache: dict = {}
    with placement.text() if placement is not None else nullcontext():
        for prompt in ["", *(storyboard.prompt_at(k * chunk_seconds) for k in range(n_chunks))]:
            if prompt not in text_cache:
                states, mask = model.encode_text([prompt])
                text_cache[prompt] = (states.to(device), None if mask is None else mask.to(device))
    uncond, uncond_mask = text_cache[""]
    first_frame = None
    conditions = image_states = None   # Wan 2.1 I2V: (first chunk's, later chunks') condition; CLIP states
    wants_condition = getattr(backbone, "condition_channels", 0) > 0
    if image is not None:
        picture = image.to(device=device, dtype=torch.float32).clamp(-1, 1)
        with placement.decode() if placement is not None else nullcontext():   # the VAE's phase
            if wants_condition:
                from pfp.i2v import wan_i2v_condition
                clip_frames = vae.video_frames(lat_shape[2])
                conditions = (wan_i2v_condition(vae, picture[None], clip_frames),
                              wan_i2v_condition(vae, picture[None], clip_frames, given=False))
            else:
                first_frame = vae.encode(picture[None, :, None])
        if getattr(backbone, "takes_image", False):
            image_states = model.encode_image(picture)
    in_transformer = placement.transformer if placement is not None else nullcontext
    in_decode = placement.decode if placement is not None else nullcontext
    prompts, timings, videos, latents, lr_latents = [], [], [], [], [[] for _ in streams]
    frames_done = 0
    bar = tqdm(total=n_chunks * steps, disable=not progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    if sequence_parallel is not None:
        backbone.set_sequence_parallel(sequence_parallel)
    buffers_before = getattr(backbone, "context_kv_buffers", False)
    if kv_choice == "buffer":
        backbone.use_context_kv_buffers(True)
    import pfp_kernels
    frozen = ExitStack()   # the weights do not change while generating: the conv kernels hash each once
    frozen.enter_context(pfp_kernels.frozen_weights())
    try:
        for k in range(n_chunks):
            prompt = storyboard.prompt_at(k * chunk_seconds)
            prompts.append(prompt)
            bar.set_description(f"chunk {k + 1}/{n_chunks}")
            text, text_mask = text_cache[prompt]
            t0 = _clock(device)
            _peak(device)
            if k < n_given:
                x = history[:, :, k * lat_shape[2]:(k + 1) * lat_shape[2]]
                bar.update(steps)
            else:
                with in_transformer():
                    x = sample(backbone, lat_shape, text, context, uncond_text=uncond, text_mask=text_mask,
                               uncond_text_mask=uncond_mask, steps=steps, cfg=cfg, cfg_min_t=cfg_min_t,
                               shift=shift, eta=eta, generator=generator, t_start=float(k * lat_shape[2]),
                               device=device, on_step=lambda i: bar.update(1), cfg_2=cfg_2,
                               first_frame=first_frame if k == 0 else None,
                               condition=None if conditions is None else conditions[min(k, 1)],
                               image=image_states)
                if hasattr(context, "release_buffers"):   # its [context ; target] buffers served this chunk's steps
                    context.release_buffers()
                if not bool(torch.isfinite(x).all()):  # one host sync per chunk
                    raise RunFailure(f"chunk {k + 1}: the sampler produced NaN or Inf latents; no video was "
                                     f"written (check the weights, or lower --cfg / --shift)")
            t1 = _clock(device)
            peaks = {"denoise": _peak(device)}
            with in_decode():
                frames = decoder.decode(x).clamp(-1, 1)                       # [1, 3, F, H, W]
                t2 = _clock(device)
                peaks["decode"] = _peak(device)
                # low res, low fps, re-encoded causally: for each compressor at its own rate
                lrs = [enc.encode(to_low_res_part(frames, sp, start=frames_done)) for enc, sp in zip(lr_encoders, specs)]
            frames_done += frames.shape[2]
            with in_transformer():
                # only this chunk is compressed, in the compressor's dtype (the sampler's latents are fp32)
                new = mix_contexts([st.append(x.to(compressor.dtype), lr.to(compressor.dtype))
                                    for st, lr in zip(streams, lrs)])
                if not memory:
                    new = _without_tokens(new)
                if window and backbone.context_mode == "cached" and context is not None and context is not cache:
                    context.release_buffers()   # the last chunk's windowed cache: its buffers go first
                    context = None              # and its K/V once the history's are extended below
                if backbone.context_mode == "cached":                        # K/V of the new tokens only
                    cache = backbone.cache_context(new, cache, kv_storage=kv_storage)
                if backbone.context_mode == "cached":
                    context = cache
                else:
                    context = _stream_context(streams) if memory else new   # new: emptied above
                if window:   # rebuilt each chunk over the compressed history; `cache` never holds it
                    recent = x if recent is None else torch.cat([recent, x], dim=2)[:, :, -window:]
                    win = window_context(backbone, recent, window, history_frames=(k + 1) * lat_shape[2])
                    if backbone.context_mode == "cached":
                        context = backbone.cache_context(win, cache, kv_storage=kv_storage)
                        if cache is not None:   # one copy of the history's K/V: the windowed cache's head
                            cache = cache.viewed_in(context)
                    else:
                        context = with_window(context, win)
            t3 = _clock(device)
            peaks["compress"] = _peak(device)   # with the low-res re-encode: the VAE encoder's peak
            row = {"chunk": k, "denoise_s": t1 - t0, "decode_s": t2 - t1, "compress_s": t3 - t2,
                   "context_tokens": sum(st.num_tokens for st in streams)}
            if device.type == "cuda":  # each phase's peak of allocated device memory
                row.update({f"{name}_peak_bytes": v for name, v in peaks.items()})
            timings.append(row)
            videos.append(frames[0].float().cpu())
            latents.append(x.cpu())
            for kept, lr in zip(lr_latents, lrs):
                kept.append(lr.cpu())
    finally:
        frozen.close()
        bar.close()
        if sequence_parallel is not None:
            backbone.set_sequence_parallel(None)
        if kv_choice == "buffer":
            backbone.use_context_kv_buffers(buffers_before)
    lr_all = [torch.cat(kept, dim=2) for kept in lr_latents]
    return GenerationResult(torch.cat(videos, dim=1), torch.cat(latents, dim=2), lr_all[0],
                            _stream_context(streams), prompts, timings, cache, choices,
                            placement.bytes_moved if placement is not None else 0, lr_all[1:])


def _without_tokens(context):
    """An empty context of ``context``'s batch, width, dtype and device (``memory=False``)."""
    t = context.tokens
    return _empty_context(t.shape[0], t.shape[2], t.dtype, t.device)


def _stream_context(streams):
    """Every token the compressor streams emitted so far, as one context (merged by arrival)."""
    return mix_contexts([st.context for st in streams])


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _to_uint8(video: torch.Tensor, upscale: int) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> [T, H*u, W*u, 3] uint8."""
    v = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    if upscale > 1:
        v = v.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return v.contiguous()


def write_mp4(video: torch.Tensor, path: str, fps: float, upscale: int = 1) -> None:
    """Write ``[3, T, H, W]`` frames in [-1, 1] as H.264 mp4, nearest-neighbour upscaled; atomic
    (:func:`pfp.data.video_folder.write_video` writes a temporary file and renames it)."""
    from pfp.data.video_folder import write_video
    if upscale > 1:
        video = video.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    write_video(path, video, fps, crf=12)


def write_contact_sheet(video: torch.Tensor, path: str, frames_per_row: int, upscale: int = 1,
                        labels: Optional[list] = None, lead: int = 0) -> None:
    """A PNG grid of every frame: one row per ``frames_per_row`` frames (one chunk per row).
    ``lead`` blank cells come first (a causal VAE's first chunk is ``tf - 1`` frames short)."""
    from PIL import Image

    from pfp._io import atomic_target
    v = _to_uint8(video, upscale)
    t, h, w, _ = v.shape
    rows = math.ceil((t + lead) / frames_per_row)
    gap = 2
    sheet = torch.full((rows * (h + gap) - gap, frames_per_row * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for i in range(t):
        r, c = divmod(i + lead, frames_per_row)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = v[i]
    with atomic_target(path, ".png") as tmp:
        Image.fromarray(sheet.numpy()).save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _parser() -> Parser:
    p = Parser(prog="python -m pfp.generate", description=(
        "Generate a multi-shot video chunk by chunk from a storyboard. With no arguments the built-in "
        "tiny model renders the built-in storyboard on the CPU."))
    p.add_argument("--storyboard", help="JSON file: a list of {start, end, prompt} in seconds")
    p.add_argument("--prompt", help="one prompt for the whole video (instead of --storyboard)")
    p.add_argument("--seconds", type=float, default=None,
                   help="length (default: the storyboard's end, or 2 s with --prompt)")
    p.add_argument("--out", default="pfp_video.mp4", help="output mp4 (default %(default)s)")
    p.add_argument("--contact-sheet", default=None, help="also write a PNG of every frame (one row per chunk)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=16, help="denoising steps per chunk (1-1000, default %(default)s)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale, 1 = off, 0-50 (default: the model's)")
    p.add_argument("--cfg-2", type=float, default=None,
                   help="two experts (Wan 2.2 A14B): the low-noise expert's guidance, 0-50 (default: the model's "
                        "sample_cfg_2, else --cfg)")
    p.add_argument("--cfg-min-t", type=float, default=None,
                   help="no guidance at steps with t <= this, in [0, 1], 0 = guidance at every step "
                        "(default: the model's)")
    p.add_argument("--shift", type=float, default=None, help="sampling timestep shift (default: the model's)")
    p.add_argument("--eta", type=float, default=None,
                   help="sampler stochasticity in [0, 1], 0 = deterministic Euler (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors from pfp.train --export), a "
                   "training checkpoint folder, or a training run folder (its newest complete checkpoint); "
                   "default: the built-in model")
    from pfp.memory import PRESETS
    p.add_argument("--config", default=None, help="a model config JSON, or a preset of a real model "
                   f"({', '.join(PRESETS)}) with --model-dir; "
                   "--checkpoint then holds that config's trained weights (without it: the pretrained "
                   "model with an untrained compressor)")
    p.add_argument("--model-dir", default=None, help="a preset's local diffusers pipeline folder (transformer/, "
                   "vae/, text_encoder/, tokenizer/); nothing is downloaded")
    p.add_argument("--rate", default=None, help="with --config: another compression rate, e.g. 2x2x2")
    p.add_argument("--context-mode", choices=["joint", "cached"], default=None,
                   help="must match the checkpoint's (it is recorded there)")
    p.add_argument("--size", default=None, help="HxW in pixels (default: the model's training size)")
    p.add_argument("--upscale", type=int, default=None, help="nearest-neighbour upscale of the written video "
                   "(default: to at least 128 px)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for models under 20 M parameters, else torch's default)")
    p.add_argument("--image", default=None, help="a picture (PNG, JPEG, ...) the video starts from: "
                   "image-to-video, as Wan 2.2 TI2V does it (center-cropped and resized to the video's size)")
    p.add_argument("--vram", default=None, help="device memory budget with a unit, e.g. 12GiB: the memory "
                   "planner (python -m pfp.memory) picks where each part lives so every phase fits")
    p.add_argument("--plan", action="store_true", help="print the memory plan (with --vram: the one chosen; "
                   "without: everything resident) and exit without generating")
    p.add_argument("--timings", default=None, help="write per-chunk compress/denoise/decode seconds (CSV)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(ns) -> None:
    """The sampling flags' ranges (they need no model)."""
    if ns.storyboard and ns.prompt:
        raise InputError("give --storyboard or --prompt, not both")
    if not 1 <= ns.steps <= 1000:
        raise InputError(f"--steps must be in 1..1000, got {ns.steps}")
    if ns.cfg is not None and not (math.isfinite(ns.cfg) and 0 <= ns.cfg <= 50):
        raise InputError(f"--cfg must be in [0, 50], got {ns.cfg}")
    if ns.cfg_2 is not None and not (math.isfinite(ns.cfg_2) and 0 <= ns.cfg_2 <= 50):
        raise InputError(f"--cfg-2 must be in [0, 50], got {ns.cfg_2}")
    if ns.cfg_min_t is not None and not 0.0 <= ns.cfg_min_t <= 1.0:
        raise InputError(f"--cfg-min-t must be in [0, 1] (0: guidance at every step), got {ns.cfg_min_t}")
    if ns.shift is not None and not (math.isfinite(ns.shift) and 0 < ns.shift <= 100):
        raise InputError(f"--shift must be in (0, 100], got {ns.shift}")
    if ns.eta is not None and not 0.0 <= ns.eta <= 1.0:
        raise InputError(f"--eta must be in [0, 1] (0: deterministic Euler), got {ns.eta}")
    if ns.seed < 0 or ns.seed >= 2 ** 63:
        raise InputError(f"--seed must be in 0..2^63-1, got {ns.seed}")
    if ns.upscale is not None and not 1 <= ns.upscale <= 32:
        raise InputError(f"--upscale must be in 1..32, got {ns.upscale}")
    if ns.threads is not None and ns.threads < 1:
        raise InputError(f"--threads must be >= 1, got {ns.threads}")


def _check_outputs(ns) -> None:
    """Every file the run writes at its end, and what writing it needs, checked before it starts."""
    check_output_file("--out", ns.out, (".mp4",))
    check_module("--out", "av", "av")
    if ns.contact_sheet is not None:
        check_output_file("--contact-sheet", ns.contact_sheet, (".png",))
        check_module("--contact-sheet", "PIL", "pillow")
    if ns.timings is not None:
        check_output_file("--timings", ns.timings)
    outputs = [os.path.abspath(p) for p in (ns.out, ns.contact_sheet, ns.timings) if p is not None]
    if len(set(outputs)) < len(outputs):
        raise InputError("--out, --contact-sheet and --timings must name different files")


def _check_length(config, seconds: float, size: tuple, upscale: int) -> None:
    """Refuse, up front, a video whose frames would not fit in memory: the whole video is kept as
    float32 frames, and upscaled once more while it is written."""
    n_chunks = chunk_plan(config, seconds)
    h, w = size
    per_frame = 3 * h * w * 4 * (1 + upscale * upscale)
    frames = config.clip_frames(n_chunks)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit we can state
        return
    budget = memory // 2
    if frames * per_frame > budget:
        fit = max(1, budget // (per_frame * config.chunk_frames)) * config.chunk_frames / config.fps
        raise InputError(f"--seconds {seconds:g} would make {frames} frames of {h}x{w} (x{upscale} when written), "
                         f"about {frames * per_frame / 2 ** 30:.1f} GiB in memory; half this machine's "
                         f"{memory / 2 ** 30:.0f} GiB holds at most --seconds {fit:g}")


def _open_image(path: str):
    """The picture at ``path`` as RGB; InputError naming it when it is missing or not a picture."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise InputError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--image {path} is not a picture PIL can read ({exc})") from None


def _load_image(path: str, size: tuple) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1]: the picture center-cropped to the video's aspect, then resized."""
    from PIL import Image
    im = _open_image(path)
    h, w = size
    scale = max(w / im.width, h / im.height)
    cw, ch = round(w / scale), round(h / scale)
    left, top = (im.width - cw) // 2, (im.height - ch) // 2
    im = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.LANCZOS)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).float() / 127.5 - 1


def _device(name: str) -> torch.device:
    check_device("--device", name)
    return torch.device(name)


def _check_heads_split(sp, backbone) -> None:
    """InputError unless the backbone's heads split evenly over ``sp``'s ranks (None: one process).
    set_sequence_parallel checks it again once the work has started, where it would be exit 1."""
    if sp is None:
        return
    try:
        sp.heads(backbone.num_heads)
    except ValueError as exc:
        raise InputError(f"{exc}; run on a number of ranks that divides it (torchrun --nproc_per_node)") from None


def _parse_size(text: str, config) -> tuple:
    import re
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise InputError(f"--size must be HxW in pixels, e.g. 32x32, got {text!r}")
    return check_size(config, (int(m.group(1)), int(m.group(2))), "--size")


def check_size(config, size, what: str = "size") -> tuple:
    """``(h, w)`` when a video of ``size`` pixels fits the model: multiples of its VAE factor times
    the DiT's 2x2 patches, and at least one cell of every compressor's grid (``mix_compressors``
    included); InputError naming ``what`` and the nearest sizes that fit otherwise."""
    from pfp.rates import parse_rate
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise InputError(f"{what} must be (height, width) in pixels, got {size!r}")
    h, w = size
    step = 2 * config.vae_spatial                                  # the DiT's 2x2 patches of the latent
    rates = [parse_rate(c.rate) for c in config.branch_configs()]
    mh = max(2 * r.h for r in rates) * config.vae_spatial          # one cell of each compressor's grid
    mw = max(2 * r.w for r in rates) * config.vae_spatial
    if h < mh or w < mw or h % step or w % step:
        def near(v, least):
            lo, hi = max(least, v // step * step), max(least, -(-v // step) * step)
            return f"{lo}" if lo == hi else f"{lo} or {hi}"
        named = " and ".join(str(r) for r in rates)
        raise InputError(f"{what} {h}x{w} does not fit this model: with its {config.vae_spatial}x VAE and 2x2 "
                         f"patches, height and width must be multiples of {step}, and at least {mh}x{mw} (one cell "
                         f"of rate {named}'s grid); use {near(h, mh)}x{near(w, mw)}")
    return h, w


def _load_model(ns):
    if ns.config is None:
        if ns.model_dir is not None or ns.rate is not None:
            raise InputError(f"{'--model-dir' if ns.model_dir is not None else '--rate'} goes with --config (a "
                             f"config file, or a preset such as wan22-ti2v-5b-480p)")
        return load_model(ns.checkpoint, ns.context_mode)
    from pfp.memory import config_from_arg
    from pfp.weights import build_model, load_weights
    try:
        config = config_from_arg(ns.config, ns.model_dir, ns.rate)
        if ns.context_mode:
            config.context_mode = ns.context_mode
        config.check()
        if ns.checkpoint is not None:
            if not os.path.isfile(ns.checkpoint):
                raise ValueError(f"--checkpoint {ns.checkpoint}: with --config it must be a weights file "
                                 f"(.safetensors from pfp.train --export) of that config")
            return load_weights(ns.checkpoint, config=config)
        return build_model(config).eval()
    except ValueError as exc:
        raise InputError(str(exc)) from None


def load_model(path: Optional[str] = None, context_mode: Optional[str] = None, flag: str = "--checkpoint"):
    """The model of a weights file (:func:`pfp.weights.save_weights`, e.g. ``pfp.train --export``),
    a training checkpoint folder, or a run folder (its newest complete checkpoint); the built-in
    model when ``path`` is None. Checked up front: a missing path, a damaged checkpoint, weights of
    another config, LoRA adapters or another context mode each raise InputError naming ``flag``."""
    from pfp.weights import DEFAULT_WEIGHTS, PFPConfig, build_model, load_state_checked, load_weights, read_weights
    named = path is not None   # the user's path: its faults name the flag; the built-in file's do not
    if path is None:
        if not os.path.isfile(DEFAULT_WEIGHTS):
            raise InputError(f"the built-in weights {DEFAULT_WEIGHTS} are missing; reinstall pfp or pass --checkpoint")
        path = DEFAULT_WEIGHTS
    if not os.path.exists(path):
        raise InputError(f"{flag} {path} does not exist")
    if os.path.isdir(path):  # a training checkpoint folder, or a run folder: its newest complete one
        from pfp.train.checkpoint import load_checkpoint, resolve_checkpoint
        path = resolve_checkpoint(path)                     # checked against its manifest
        tensors, st = load_checkpoint(path, restore_rng=False, verify=False)
        if st.get("lora"):
            raise InputError(f"{flag} {path} holds LoRA adapters; export merged weights with "
                             f"`python -m pfp.train ... --export FILE.safetensors` and pass that file")
        config = PFPConfig.from_dict(st["config"])
        if context_mode and context_mode != config.context_mode:
            raise InputError(f"--context-mode {context_mode} does not match the checkpoint's "
                             f"{config.context_mode!r} (each mode needs its own training)")
        model = build_model(config)
        try:
            load_state_checked(model, tensors, path)
        except ValueError as e:
            raise InputError(f"{flag}: {e}") from None
        return model.eval()
    try:
        _, file_cfg = read_weights(path)
        if file_cfg is None:
            # weights without a config: assume the built-in config; mismatches are named below
            file_cfg = PFPConfig.load(os.path.join(os.path.dirname(DEFAULT_WEIGHTS), "default.json")) \
                if os.path.isfile(os.path.join(os.path.dirname(DEFAULT_WEIGHTS), "default.json")) else PFPConfig()
        return load_weights(path, config=file_cfg, context_mode=context_mode)
    except ValueError as e:
        message = str(e)
        raise InputError(message if message.startswith("--") or not named else f"{flag}: {message}") from None


def main(argv=None) -> int:
    from pfp.parallel import leave_process_group
    status = run_cli(lambda: _main(argv))
    leave_process_group(status == 0)   # under torchrun: every rank done before any leaves
    return status


def _main(argv) -> int:
    ns = _parser().parse_args(argv)
    if ns.threads is not None and ns.threads < 1:
        raise InputError(f"--threads must be >= 1, got {ns.threads}")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = _device(ns.device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))   # this rank's GPU
    from pfp.parallel import init_from_env
    sp = init_from_env(device)   # under torchrun with several ranks: sequence-parallel over them
    budget = None
    if ns.vram is not None:
        from pfp.memory import parse_bytes
        try:
            budget = parse_bytes(ns.vram, "--vram")
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if not ns.plan:
        _check_outputs(ns)
    if ns.image is not None:
        check_module("--image", "PIL", "pillow")
        _open_image(ns.image)   # readable, before any work
    from pfp.text import Storyboard
    if ns.storyboard and ns.prompt:
        raise InputError("give --storyboard or --prompt, not both")
    if ns.storyboard is not None:
        if not os.path.isfile(ns.storyboard):
            raise InputError(f"--storyboard {ns.storyboard}: no such file")
        storyboard = Storyboard.load(ns.storyboard)
    elif ns.prompt is not None:
        if not ns.prompt.strip():
            raise InputError("--prompt is empty")
        storyboard = Storyboard.single(ns.prompt, ns.seconds if ns.seconds and ns.seconds > 0 else 2.0)
    else:
        storyboard = Storyboard.from_list(BUILTIN_STORYBOARD)
    _check_args(ns)   # before any model is read
    from pfp.memory import is_preset
    if ns.plan and is_preset(ns.config) and ns.model_dir is None:
        return _plan_preset(ns, storyboard, budget)   # the preset's architecture: no folder, no weights
    model = _load_model(ns)
    config = model.config
    _check_heads_split(sp, model.backbone)   # before any planning, as generate() does before its work
    if ns.threads is None and device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 20_000_000:
        # a small model's ops are too small to split: one thread is faster, and far faster when
        # other processes share the cores (OpenMP threads then wait on each other)
        torch.set_num_threads(1)
    size = _parse_size(ns.size, config) if ns.size else tuple(config.video_size)
    seconds = ns.seconds if ns.seconds is not None else (
        storyboard.duration if ns.prompt is None else 2.0)
    upscale = ns.upscale or max(1, math.ceil(128 / min(size)))
    _check_length(config, seconds, size, upscale)
    plan = None
    if budget is not None or ns.plan:
        from pfp.memory import plan_model
        plan = plan_model(model, budget, seconds, size, ns.steps, ns.cfg, ns.cfg_2)  # no budget: the plain run's
        if not plan.fits:
            raise InputError(plan.too_small(f"--vram {ns.vram}", "this model"))
        if ns.plan:
            _print_plan(plan, seconds, size, ns.vram)
            return 0
    image = _load_image(ns.image, size) if ns.image is not None else None
    t0 = time.perf_counter()
    result = generate(model, storyboard, seconds, image=image, seed=ns.seed, steps=ns.steps, cfg=ns.cfg, cfg_2=ns.cfg_2,
                      cfg_min_t=ns.cfg_min_t, shift=ns.shift, eta=ns.eta, device=device, size=size,
                      progress=not ns.quiet and (sp is None or sp.rank == 0), plan=plan, sequence_parallel=sp)
    if sp is not None and sp.rank != 0:   # every rank holds the same video; rank 0 writes it
        return 0
    write_mp4(result.video, ns.out, config.fps, upscale)
    if ns.contact_sheet:
        write_contact_sheet(result.video, ns.contact_sheet, config.chunk_frames, upscale,
                            lead=config.vae_temporal - 1)
    total = time.perf_counter() - t0
    if ns.timings:
        _write_timings(result.timings, ns.timings)
    den = sum(t["denoise_s"] for t in result.timings)
    dec = sum(t["decode_s"] for t in result.timings)
    com = sum(t["compress_s"] for t in result.timings)
    print(f"wrote {ns.out}: {result.video.shape[1]} frames, {size[0]}x{size[1]} (x{upscale}) at "
          f"{config.fps:g} fps, {len(result.timings)} chunks in {total:.1f} s "
          f"(denoise {den:.1f} s, decode {dec:.2f} s, compress {com:.2f} s)")
    return 0


def _print_plan(plan, seconds: float, size: tuple, vram: Optional[str]) -> None:
    print(f"{seconds:g} s at {size[0]}x{size[1]}: {plan.context_tokens} context tokens at the longest "
          f"history, {plan.target_tokens} target tokens per chunk"
          + (f"; budget {vram}" if vram is not None else "; no budget (everything resident)"))
    print(plan.choices_line())
    print(plan.table())


def _plan_preset(ns, storyboard, budget: Optional[int]) -> int:
    """``--plan`` for a preset without its folder: traced from the preset's architecture (the
    planner needs no weights), at the preset's size and the storyboard's length."""
    from pfp.memory import plan_trace, preset, preset_config, trace_preset
    try:
        p = preset(ns.config, ns.rate)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    seconds = ns.seconds if ns.seconds is not None else (storyboard.duration if ns.prompt is None else 2.0)
    chunk = p.chunk_frames / p.fps
    if whole_chunks(seconds, chunk) is None:
        raise InputError(f"--seconds {seconds:g}: {p.name} generates chunks of {chunk:g} s; use a whole number "
                         f"of them, e.g. --seconds {chunk:g} or {2 * chunk:g}")
    cfg = preset_config(p, "").sample_cfg if ns.cfg is None else ns.cfg
    trace = trace_preset(p, max(0.0, seconds - chunk), cfg_batch=1 if cfg == 1 else 2)
    plan = plan_trace(trace, budget, ns.steps)
    if not plan.fits:
        raise InputError(plan.too_small(f"--vram {ns.vram}", p.name))
    _print_plan(plan, seconds, p.video_size, ns.vram)
    return 0


def _write_timings(timings: list, path: str) -> None:
    import csv

    from pfp._io import atomic_target
    with atomic_target(path, ".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(timings[0]))
            wr.writeheader()
            wr.writerows(timings)


if __name__ == "__main__":
    sys.exit(main())
