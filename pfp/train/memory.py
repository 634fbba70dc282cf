"""Memory plans for training: which parts are on the device in each phase of a step.

``python -m pfp.train MODE ... --vram 12GiB`` plans and trains under the plan; ``--plan`` prints it
without training. The phases of a step, in the order the losses run them:

- ``text``: the batch's prompts through the text encoder;
- ``encode``: the batch's clips through the VAE (the high-res clip and each compressor's low-res
  one; Wan I2V's condition and image states);
- ``step``: the compressor and the backbone forward and backward, with gradient checkpointing
  (a plan turns it on), then the optimizer.

The trainable parameters (LoRA adapters, the compressor; the whole backbone when it trains) and
AdamW's two states are resident throughout. Their gradients live from the backward to the end of
the optimizer step (the loop frees them before the next step's forward), so the step's peak is the
larger of the backward's (activations and the gradients so far) and the optimizer's (every
gradient and AdamW's foreach temporaries, as on CUDA). With ``--self-history`` the encode phase
also holds the history's VAE decode and the low-res videos' re-encode. Each phase's peak is traced, as the
generation planner's are (:mod:`pfp.memory`): the real modules run on fake tensors, so nothing is
allocated and no GPU is needed; the step's backward included.

Choices (:data:`pfp.offload.TRAIN_PLAN_VALUES`), carried out by :class:`pfp.offload.TrainPlacement`:

- ``weights``: ``"native"`` or ``"fp8"`` (the blocks' frozen linear weights stored in float8 e4m3,
  upcast one block at a time as it runs, LoRA adapters untouched: QLoRA's idea with fp8);
- ``offload``: ``"block"`` keeps the blocks' frozen weights on the host, one block at a time on the
  device (two in the backward: checkpointing's recompute keeps a block until the next one comes);
- ``text``: ``"gpu"`` or ``"cpu"`` (the encoder never on the device; its states are moved over);
- ``swap``: the frozen transformer off the device while the VAE encodes, the VAE off it while the
  transformer runs; both come back once a step;
- ``encode``: ``"whole"`` or ``"tiled"`` (a VAE with ``tiled_encoding()``, HunyuanVAE: diffusers'
  tiled encode, whose peak is one tile's; approximate, since its GroupNorms then see one tile).

fp8 storage and block offload work only with gradient checkpointing, which a plan turns on: without
it a block's forward would save its weights for the backward.
"""
from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pfp.memory import (DEVICE_FLOPS, HBM_BYTES_PER_S, PCIE_BYTES_PER_S, Plan, PhaseEstimate, _nbytes, _tracked_peak,
                         _with_allowance)
from pfp.offload import TRAIN_PLAN_VALUES, check_train_choices
from pfp.text import states_are_fixed

CPU_TEXT_FLOPS = 5e11   # what a text encoder reaches on a many-core host CPU, roughly (not measured)
TRAIN_PHASES = ("text", "encode", "step")


@dataclass
class TrainTrace:
    """What the training trace found, in bytes."""

    frozen: int            # the frozen weights that run in the step (transformer, compressor's frozen parts)
    blocks: int            # of which the blocks' (what block offload moves)
    block_linear: int      # of which the blocks' linear weights (what fp8 stores in one byte each)
    block_linear_fp8: int  # those weights' bytes in fp8
    largest_block: int     # one block's frozen weights, native
    trainable: int         # trainable parameters (their gradients are in the step's transient)
    vae: int               # the VAE, and an image encoder beside it
    text: int              # the text encoder
    text_trains: bool      # the text encoder's own weights train (the tiny model): it stays on the device
    text_fixed: bool       # its states depend on the prompt alone (pfp.text.states_are_fixed): cacheable
    text_flops: float      # one batch's prompts through the text encoder (for its time on a CPU)
    transient: dict        # phase -> traced peak of what the phase creates
    batch: int
    target_tokens: int
    context_tokens: int
    encode_tiled: Optional[int] = None   # the encode's traced peak through the VAE's tiled_encoding(); None: it has none
    encode_tiled_extra_flops: float = 0.0   # what the tiles' overlaps add to the encode's FLOPs

    def encode_peak(self, tiled: bool) -> int:
        """What the encode phase creates at its peak: the clips' encode (tiled or whole), or with
        ``--self-history`` the history's decode and re-encode, whichever is larger."""
        encode = self.encode_tiled if tiled else self.transient["encode"]
        return max(encode, self.transient.get("self_history", 0))


def trace_training(model: nn.Module, batch_size: int, clip_chunks: int, size: Optional[tuple] = None,
                   self_history: bool = False) -> TrainTrace:
    """Trace one training step of a built :class:`pfp.weights.PFPModel` (LoRA and trainable flags as
    training sets them) on a batch of ``batch_size`` clips of ``clip_chunks`` chunks, at ``size``
    (default the config's): the finetune step at its longest history (all chunks but the last),
    which bounds the pretrain step's too (that one runs fewer frames through the backbone). Runs the
    real modules on fake tensors (FakeTensorMode), with gradient checkpointing on; the optimizer
    step runs AdamW (foreach, as on CUDA) on fake copies of the trainable parameters.
    ``self_history``: the finetune loss's ``--self-history`` (the history decoded and its low-res
    videos re-encoded in the encode phase)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils.flop_counter import FlopCounterMode

    from pfp.compressor import Context
    from pfp.train.objectives import _compress, i2v_inputs
    from pfp.window import window_context, window_layout
    config = model.config
    window = config.sliding_window   # finetune_loss joins the history's newest frames to the context
    h, w = size or config.video_size
    s = config.vae_spatial
    lc = config.chunk_latent_frames
    frames = config.clip_frames(clip_chunks)
    backbone = model.backbone
    plain = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter is frozen")
    text_params = list(model.text_encoder.parameters())
    text_trains = any(p.requires_grad for p in text_params)
    text_fixed = states_are_fixed(model.text_encoder)
    trainable_ids = {id(p) for p in trainable}
    encoders = [model.vae] if isinstance(model.vae, nn.Module) else []
    if getattr(model, "image_encoder", None) is not None:
        encoders.append(model.image_encoder)
    vae_bytes = sum(_nbytes(m) for m in encoders)
    text_bytes = sum(p.numel() * p.element_size() for p in text_params if id(p) not in trainable_ids)
    own = {id(p) for m in encoders for p in m.parameters()} | {id(p) for p in text_params}
    frozen = sum(p.numel() * p.element_size() for p in model.parameters()
                 if id(p) not in trainable_ids and id(p) not in own)
    blocks = list(plain.blocks)
    frozen_of = [[t for t in list(b.parameters()) + list(b.buffers()) if id(t) not in trainable_ids] for b in blocks]
    block_bytes = [sum(t.numel() * t.element_size() for t in ts) for ts in frozen_of]
    linear = [m.weight for b in blocks for m in b.modules()
              if isinstance(m, nn.Linear) and id(m.weight) not in trainable_ids]
    was_checkpointing = getattr(plain, "gradient_checkpointing", False)
    plain.set_gradient_checkpointing(True)
    transient = {}
    tiled, extra_flops = None, 0.0
    # a model built under a fake mode (trace_training_preset) is traced in that mode
    fake_mode = detect_fake_mode(list(model.parameters())) or FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with fake_mode:
            video = torch.zeros(batch_size, 3, frames, h, w)

            outputs = []   # what each traced phase makes, kept for the step

            def encode(keep: bool = True):
                with torch.no_grad():
                    made = (model.vae.encode(video), [model.vae.encode(v) for v in model.low_res_videos(video)],
                            # Wan I2V: the first frame's condition latents and image states, as a first chunk
                            i2v_inputs(model, plain, {"hr": video}, lc, True, video.device))
                if keep:
                    outputs.append(made)
            tiles = hasattr(model.vae, "tiled_encoding")
            # FLOPs are counted only to price the tiled encode's overlaps against the whole one
            whole_flops = FlopCounterMode(display=False)
            with whole_flops if tiles else nullcontext():
                transient["encode"] = _tracked_peak(encode)
            if tiles:
                tiled_flops = FlopCounterMode(display=False)
                with model.vae.tiled_encoding(), tiled_flops:
                    tiled = _tracked_peak(lambda: encode(keep=False))
                extra_flops = max(0, tiled_flops.get_total_flops() - whole_flops.get_total_flops())
            transient["text"] = _tracked_peak(lambda: outputs.append(model.text_encoder([""] * batch_size)))
            (latents, lrs, extra), tokens = outputs[0], outputs[1].tokens
            n_hist = (clip_chunks - 1) * lc
            hist = latents[:, :, :n_hist]
            x = latents[:, :, n_hist:n_hist + lc]
            lr_hist = [lr[:, :, : -(-n_hist // c.rate.t)] for lr, c in zip(lrs, model.compressors)]
            text = tokens.to(torch.float32)
            ts = torch.full((batch_size,), 0.5)
            t_start = float(n_hist // plain.patch_size[0])

            positions = _real_positions(model, n_hist, h // s, w // s) if n_hist else None
            win_frames = min(window, n_hist) // plain.patch_size[0] * plain.patch_size[0]   # window_context's

            def step():
                with torch.enable_grad():
                    ctx = None
                    if n_hist:   # the compressor's tokens (fake), at real positions: the backbone reads them
                        made = _compress(model, hist, lr_hist)   # as the losses call it
                        ctx = Context(made.tokens, positions, features=getattr(made, "features", None))
                        if win_frames:   # and the history's newest frames, uncompressed, as finetune_loss joins them
                            win = window_context(plain, hist, window)   # through the patch embedding (fake)
                            # pfp.window.with_window would sort the joined order keys, which fake
                            # tensors cannot; the window's come after every compressed token anyway
                            with unset_fake_temporarily():   # the layout real: the backbone reads it eagerly
                                layout, order = window_layout(win_frames, n_hist, plain.patch_size, h // s, w // s)
                                positions_all = torch.cat([ctx.positions, layout])
                                order_all = torch.cat([ctx.order_keys(), order])
                            ctx = Context(torch.cat([ctx.tokens, win.tokens.to(ctx.tokens.dtype)], dim=1), positions_all,
                                          None, order_all, ctx.features)
                    v = backbone(x, ts, text, ctx, t_start=t_start, **extra)
                    loss = v.float().square().mean()
                    return torch.autograd.grad(loss, trainable, allow_unused=True)
            transient["step"] = _tracked_peak(step)
            transient["optimizer"] = optimizer_step_peak([(tuple(p.shape), p.dtype) for p in trainable])
            if self_history and n_hist:
                # decoded whole while the clip's latents are held, then each low-res video encoded
                held = sum(t.numel() * t.element_size() for t in [latents, *lrs])
                video_frames = frames

                def redo_history():
                    with torch.no_grad():
                        decoded = model.vae.decode(hist.float())
                        for branch, lr in zip(model.config.branch_configs(), lr_hist):
                            spec = branch.video_spec(video_frames)
                            model.vae.encode(decoded.new_zeros(batch_size, 3, model.vae.video_frames(lr.shape[2]),
                                                               *spec.lr_size))
                transient["self_history"] = held + _tracked_peak(redo_history)
            context = sum(math.prod(c.token_grid((n_hist, h // s, w // s))) for c in model.compressors) if n_hist else 0
            if win_frames:   # the window's tokens: its whole patches of the history's newest frames
                context += math.prod(plain.token_grid(win_frames, h // s, w // s))
            target = math.prod(plain.token_grid(lc, h // s, w // s))
    finally:
        plain.set_gradient_checkpointing(was_checkpointing)
    n_text = sum(p.numel() for p in text_params)
    return TrainTrace(frozen=frozen, blocks=sum(block_bytes),
                      block_linear=sum(w.numel() * w.element_size() for w in linear),
                      block_linear_fp8=sum(w.numel() for w in linear), largest_block=max(block_bytes, default=0),
                      # the parameters and AdamW's two states, each in the parameter's dtype
                      trainable=3 * sum(p.numel() * p.element_size() for p in trainable), vae=vae_bytes, text=text_bytes, text_trains=text_trains,
                      text_fixed=text_fixed,
                      text_flops=2.0 * n_text * tokens.shape[1] * batch_size, transient=transient, batch=batch_size,
                      target_tokens=target, context_tokens=context, encode_tiled=tiled,
                      encode_tiled_extra_flops=float(extra_flops))


def optimizer_step_peak(params: list) -> int:
    """Bytes an AdamW step over parameters of these ``(shape, dtype)`` creates at its peak, their
    gradients included: traced on fake copies (call it under a FakeTensorMode) after a first step,
    so its states exist as they do in training (they are counted as resident). foreach, as torch
    picks on CUDA: one temporary per parameter group for the whole update."""
    copies = [torch.empty(shape, dtype=dtype, requires_grad=True) for shape, dtype in params]
    if not copies:
        return 0
    for p in copies:
        p.grad = torch.empty_like(p)
    optimizer = torch.optim.AdamW(copies, lr=1e-4, foreach=True)
    optimizer.step()
    return sum(p.numel() * p.element_size() for p in copies) + _tracked_peak(optimizer.step)


class _TracedText(nn.Module):
    """A preset's text encoder for tracing (:attr:`pfp.memory.PresetParts.encode_text`: its models on
    token ids, no tokenizer needed), returning :class:`pfp.text.TextTokens` in the layout its
    backbone reads."""

    frozen = True

    def __init__(self, run, modules: list, dim: int):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.run, self.dim = run, dim

    def forward(self, prompts):
        from pfp.text import TextTokens
        states = self.run(len(prompts))
        return TextTokens(states, torch.ones(states.shape[:2], dtype=torch.bool))


def _preset_folder(p, root: str) -> None:
    """The config.json files a preset's config checks for (no weights): enough to build its config."""
    import json
    import os
    files = {"transformer": {"_class_name": "HunyuanVideoTransformer3DModel" if p.family == "hunyuan_video"
                             else "WanTransformer3DModel", **p.transformer},
             "vae": {"_class_name": "AutoencoderKLHunyuanVideo" if p.family == "hunyuan_video" else "AutoencoderKLWan",
                     **p.vae},
             "text_encoder": {"model_type": "llama" if p.family == "hunyuan_video" else "umt5"}}
    if p.experts == 2:
        files["transformer_2"] = files["transformer"]
    if p.image_encoder is not None:
        files["image_encoder"] = {"model_type": "clip_vision_model"}
    for sub in ("tokenizer", "tokenizer_2", "text_encoder_2", *files):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for sub, cfg in files.items():
        with open(os.path.join(root, sub, "config.json"), "w") as f:
            json.dump(cfg, f, default=list)


def trace_training_preset(p, batch_size: int = 1, clip_chunks: int = 2, lora_rank: int = 128,
                          mode: str = "finetune", dtype: torch.dtype = torch.bfloat16,
                          self_history: bool = False) -> TrainTrace:
    """:func:`trace_training` for a preset of :mod:`pfp.memory` (its full-size parts in ``dtype``,
    built on fake tensors: no folder, no weights), trained as ``pfp.train MODE --lora-rank R`` trains
    it: LoRA on the backbone (``lora_rank`` 0: the backbone trains whole), the compressor in fp32;
    ``self_history`` as there."""
    import tempfile

    from torch._subclasses.fake_tensor import FakeTensorMode

    from pfp.memory import preset_config, preset_parts
    from pfp.model import PFPModel
    from pfp.train.loop import TrainArgs, _set_trainable
    with tempfile.TemporaryDirectory() as root:
        _preset_folder(p, root)
        config = preset_config(p, root)
        if p.image_encoder is not None:   # the folder has its config, not its weights: built from the keys
            config.image_encoder = {"kind": "clip", "config": dict(p.image_encoder)}
        config.check()
        previous = torch.get_default_dtype()
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.set_default_dtype(dtype)
            try:
                parts = preset_parts(p)
            finally:
                torch.set_default_dtype(previous)
            backbone = parts.backbone
            text = _TracedText(parts.encode_text, parts.encoders, parts.text_dim)
            model = PFPModel(config, backbone=backbone, vae=parts.vae, text_encoder=text)
            if model.image_encoder is not None:   # again in the preset's dtype, as it is stored
                from pfp.image_encoder import CLIPImageEncoder
                torch.set_default_dtype(dtype)
                try:
                    model.image_encoder = CLIPImageEncoder.from_config(**p.image_encoder)
                finally:
                    torch.set_default_dtype(previous)
            # peft cannot wrap fake parameters (its .to() on them fails), so the adapters are counted,
            # not built: their weights, gradients and AdamW states in fp32 (peft's adapter dtype);
            # their rank-r activations are left out (a rounding error beside the blocks')
            _set_trainable(model, TrainArgs(mode=mode), lora_rank > 0)
            trace = trace_training(model, batch_size, clip_chunks, self_history=self_history)
            if lora_rank:
                shapes = _lora_shapes(backbone, lora_rank)
                adapters = sum(4 * math.prod(s) for s in shapes)
                trace.trainable += 3 * adapters
                trace.transient["step"] += adapters
                trace.transient["optimizer"] = optimizer_step_peak(
                    [(tuple(q.shape), q.dtype) for q in model.parameters() if q.requires_grad]
                    + [(s, torch.float32) for s in shapes])
    return trace


def _lora_shapes(backbone: nn.Module, rank: int) -> list:
    """The shapes of rank-``rank`` LoRA adapters (A ``[r, in]``, B ``[out, r]``, fp32 in peft) on the
    backbone's LoRA targets (as peft matches them: a regular expression over whole names, or name
    suffixes)."""
    import re

    from pfp.train.loop import lora_target_modules
    targets = lora_target_modules(backbone)

    def hit(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)
    return [s for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and hit(n)
            for s in ((rank, m.in_features), (m.out_features, rank))]


def _real_positions(model, latent_frames: int, h: int, w: int) -> torch.Tensor:
    """Every compressor's token positions for ``latent_frames`` latent frames of ``h`` x ``w``, as real
    tensors in time order (the backbone reads a context's frames eagerly)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from pfp.backbones import grid_positions
    with unset_fake_temporarily():
        pos = torch.cat([grid_positions(*c.token_grid((latent_frames, h, w))) for c in model.compressors])
        return pos[torch.sort(pos[:, 0], stable=True).indices]


def estimate_training(trace: TrainTrace, choices: Optional[dict], budget: Optional[int],
                      text_cached: bool = False) -> Plan:
    """Each phase's peak and the step's transfers under one training plan (``budget=None``: fits).
    ``text_cached``: prompts' states come from a :class:`pfp.text.TextStateCache`, so a text encoder
    on the CPU runs once per distinct prompt, not every step, and costs no time per step here."""
    choices = check_train_choices(choices)
    swap = choices["swap"]
    fp8, offload = choices["weights"] == "fp8", choices["offload"] == "block"
    text_gpu = {"text_encoder": trace.text} if choices["text"] == "gpu" else {}
    always = {"trainable+optimizer": trace.trainable, **text_gpu}
    # The blocks' frozen weights (TrainPlacement): offloaded, all of them live on the host; in fp8
    # alone, their linear weights stay on the device in fp8 and the rest of the block (norms,
    # biases) goes with the other frozen parts; else they are frozen parts like any other. In the
    # step at most two blocks are loaded in native form (one running, one that a backward left).
    stored_blocks = trace.blocks - (trace.block_linear - trace.block_linear_fp8 if fp8 else 0)
    if offload:
        on_device, with_rest = 0, 0
    elif fp8:
        on_device, with_rest = stored_blocks, trace.blocks - trace.block_linear
    else:
        on_device, with_rest = trace.blocks, trace.blocks
    loaded = 2 * trace.largest_block if (fp8 or offload) else 0
    rest = trace.frozen - trace.blocks
    swapped = rest + with_rest       # what swap moves: the frozen parts not kept by the blocks' hooks
    name = "transformer" + ("(fp8)" if fp8 else "") + ("(offloaded)" if offload else "")
    dit, vae = {name: rest + on_device}, {"vae": trace.vae}
    stays = {name: on_device - with_rest} if on_device > with_rest else {}   # fp8: its stored linears
    with_vae = {**always, **vae, **(stays if swap else dit)}
    with_dit = {**always, **dit, **({} if swap else vae)}

    def phase(name, parts: dict, transient: float, moved: int = 0) -> PhaseEstimate:
        return PhaseEstimate(name, _with_allowance(sum(parts.values()) + transient), sorted(parts), moved)

    # offload: the forward and checkpointing's recompute each bring every block in once. With
    # --self-history a step goes encode, step (the estimate's forward), encode (its decode), step:
    # swapping then brings each side in twice (charged every step, as if a sample were always picked)
    swaps = 2 if "self_history" in trace.transient else 1
    step_moved = (swaps * swapped if swap else 0) + (2 * stored_blocks if offload else 0)
    tiled = choices["encode"] == "tiled"
    if tiled and trace.encode_tiled is None:
        raise ValueError("encode='tiled' needs a VAE with tiled_encoding() (HunyuanVAE); the traced one has none")
    phases = [phase("text", with_vae, trace.transient["text"] if choices["text"] == "gpu" else 0),
              phase("encode", with_vae, trace.encode_peak(tiled), swaps * trace.vae if swap else 0),
              # the forward and backward, or the optimizer after it (the blocks' hooks have parked
              # every block by then), whichever creates more
              phase("step", with_dit, max(trace.transient["step"] + loaded, trace.transient.get("optimizer", 0)),
                    step_moved)]
    moved = sum(p.bytes_moved for p in phases)
    seconds = moved / PCIE_BYTES_PER_S
    if fp8:   # each block upcast twice a step (forward, recompute): fp8 read, native written and read
        seconds += 2 * (trace.block_linear_fp8 + 2 * trace.block_linear) / HBM_BYTES_PER_S
    if choices["text"] == "cpu" and not text_cached:
        seconds += trace.text_flops / CPU_TEXT_FLOPS
    if tiled:   # the tiles' overlaps encoded twice or more
        seconds += trace.encode_tiled_extra_flops / DEVICE_FLOPS
    fits = budget is None or all(p.peak_bytes <= budget for p in phases)
    return Plan(fits, budget, phases, dict(choices), int(moved), round(seconds, 4), trace.context_tokens,
                trace.target_tokens, unit="step")


def all_training_plans(trace: TrainTrace, budget: Optional[int], text_cached: bool = False) -> list:
    combos = [dict(zip(TRAIN_PLAN_VALUES, c)) for c in itertools.product(*TRAIN_PLAN_VALUES.values())]
    if trace.text_trains:   # a text encoder that trains stays where its optimizer states are
        combos = [c for c in combos if c["text"] == "gpu"]
    if trace.blocks == 0:   # the blocks train (no LoRA): nothing of theirs is frozen to store or move
        combos = [c for c in combos if c["weights"] == "native" and c["offload"] == "none"]
    if trace.encode_tiled is None:   # a VAE that cannot tile its encode
        combos = [c for c in combos if c["encode"] == "whole"]
    return [estimate_training(trace, c, budget, text_cached) for c in combos]


def choose_training(trace: TrainTrace, budget: Optional[int], text_cached: bool = False) -> Plan:
    """The training plan with the least time lost that fits ``budget`` (the plain run without one);
    the smallest-peak plan, with ``fits=False``, when none does. ``text_cached`` as in
    :func:`estimate_training`."""
    if budget is None:
        return estimate_training(trace, {}, None, text_cached)
    plans = all_training_plans(trace, budget, text_cached)
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: (p.seconds_lost_per_chunk, sum(p.choices[k] != v[0] for k, v in
                                                                          TRAIN_PLAN_VALUES.items())))
    return min(plans, key=lambda p: p.peak_bytes)


__all__ = ["TrainTrace", "trace_training", "trace_training_preset", "estimate_training", "choose_training", "all_training_plans",
           "optimizer_step_peak", "TRAIN_PHASES"]
