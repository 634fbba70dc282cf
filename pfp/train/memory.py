"""Memory plans for training: which parts are on the device in each phase of a step.

``python -m pfp.train MODE ... --vram 12GiB`` plans and trains under the plan; ``--plan`` prints it
without training. The phases of a step, in the order the losses run them:

- ``text``: the batch's prompts through the text encoder;
- ``encode``: the batch's clips through the VAE (the high-res clip and each compressor's low-res
  one; Wan I2V's condition and image states);
- ``step``: the compressor and the backbone forward and backward, with gradient checkpointing
  (a plan turns it on), then the optimizer.

The trainable parameters (LoRA adapters, the compressor; the whole backbone when it trains), their
gradients and AdamW's two states are resident throughout. Each phase's peak is traced, as the
generation planner's are (:mod:`pfp.memory`): the real modules run on fake tensors, so nothing is
allocated and no GPU is needed; the step's backward included.

Choices (:data:`pfp.offload.TRAIN_PLAN_VALUES`), carried out by :class:`pfp.offload.TrainPlacement`:

- ``text``: ``"gpu"`` or ``"cpu"`` (the encoder never on the device; its states are moved over);
- ``swap``: the frozen transformer off the device while the VAE encodes, the VAE off it while the
  transformer runs; both come back once a step.

fp8 weight storage and block offload are generation-only: both put a block's weights away after
its forward, which the backward (or checkpointing's recompute) still reads.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pfp.memory import PCIE_BYTES_PER_S, Plan, PhaseEstimate, _nbytes, _tracked_peak, _with_allowance
from pfp.offload import TRAIN_PLAN_VALUES, check_train_choices

CPU_TEXT_FLOPS = 5e11   # what a text encoder reaches on a many-core host CPU, roughly (not measured)
TRAIN_PHASES = ("text", "encode", "step")


@dataclass
class TrainTrace:
    """What the training trace found, in bytes."""

    frozen: int            # the frozen weights that run in the step (transformer, compressor's frozen parts)
    trainable: int         # trainable parameters (their gradients are in the step's transient)
    vae: int               # the VAE, and an image encoder beside it
    text: int              # the text encoder
    text_trains: bool      # the text encoder's own weights train (the tiny model): it stays on the device
    text_flops: float      # one batch's prompts through the text encoder (for its time on a CPU)
    transient: dict        # phase -> traced peak of what the phase creates
    batch: int
    target_tokens: int
    context_tokens: int


def _optimizer_bytes(model: nn.Module) -> int:
    """AdamW's two states per trainable parameter, in the parameter's dtype."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def trace_training(model: nn.Module, batch_size: int, clip_chunks: int, size: Optional[tuple] = None) -> TrainTrace:
    """Trace one training step of a built :class:`pfp.weights.PFPModel` (LoRA and trainable flags as
    training sets them) on a batch of ``batch_size`` clips of ``clip_chunks`` chunks, at ``size``
    (default the config's): the finetune step at its longest history (all chunks but the last),
    which bounds the pretrain step's too (that one runs fewer frames through the backbone). Runs the
    real modules on fake tensors (FakeTensorMode), with gradient checkpointing on."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pfp.compressor import Context
    config = model.config
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
    trainable_ids = {id(p) for p in trainable}
    encoders = [model.vae] if isinstance(model.vae, nn.Module) else []
    if getattr(model, "image_encoder", None) is not None:
        encoders.append(model.image_encoder)
    vae_bytes = sum(_nbytes(m) for m in encoders)
    text_bytes = sum(p.numel() * p.element_size() for p in text_params if id(p) not in trainable_ids)
    own = {id(p) for m in encoders for p in m.parameters()} | {id(p) for p in text_params}
    frozen = sum(p.numel() * p.element_size() for p in model.parameters()
                 if id(p) not in trainable_ids and id(p) not in own)
    was_checkpointing = getattr(plain, "gradient_checkpointing", False)
    plain.set_gradient_checkpointing(True)
    transient = {}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            video = torch.zeros(batch_size, 3, frames, h, w)

            def encode():
                with torch.no_grad():
                    latents = model.vae.encode(video)
                    lrs = [model.vae.encode(v) for v in model.low_res_videos(video)]
                return latents, lrs
            transient["encode"] = _tracked_peak(encode)
            texts = []
            transient["text"] = _tracked_peak(lambda: texts.append(model.text_encoder([""] * batch_size)))
            tokens = texts.pop().tokens
            latents, lrs = encode()
            n_hist = (clip_chunks - 1) * lc
            hist = latents[:, :, :n_hist]
            x = latents[:, :, n_hist:n_hist + lc]
            lr_hist = [lr[:, :, : -(-n_hist // c.rate.t)] for lr, c in zip(lrs, model.compressors)]
            text = tokens.to(torch.float32)
            ts = torch.full((batch_size,), 0.5)
            t_start = float(n_hist // plain.patch_size[0])

            positions = _real_positions(model, n_hist, h // s, w // s) if n_hist else None

            def step():
                with torch.enable_grad():
                    ctx = None
                    if n_hist:   # the compressor's tokens (fake), at real positions: the backbone reads them
                        made = model.compress(hist, lr_hist)
                        ctx = Context(made.tokens, positions, features=getattr(made, "features", None))
                    v = backbone(x, ts, text, ctx, t_start=t_start)
                    loss = v.float().square().mean()
                    return torch.autograd.grad(loss, trainable, allow_unused=True)
            transient["step"] = _tracked_peak(step)
            context = sum(math.prod(c.token_grid((n_hist, h // s, w // s))) for c in model.compressors) if n_hist else 0
            target = math.prod(plain.token_grid(lc, h // s, w // s))
    finally:
        plain.set_gradient_checkpointing(was_checkpointing)
    n_text = sum(p.numel() for p in text_params)
    return TrainTrace(frozen=frozen, trainable=sum(p.numel() * p.element_size() for p in trainable)
                      + _optimizer_bytes(model), vae=vae_bytes, text=text_bytes, text_trains=text_trains,
                      text_flops=2.0 * n_text * tokens.shape[1] * batch_size, transient=transient, batch=batch_size,
                      target_tokens=target, context_tokens=context)


def _real_positions(model, latent_frames: int, h: int, w: int) -> torch.Tensor:
    """Every compressor's token positions for ``latent_frames`` latent frames of ``h`` x ``w``, as real
    tensors in time order (the backbone reads a context's frames eagerly)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from pfp.backbones import grid_positions
    with unset_fake_temporarily():
        pos = torch.cat([grid_positions(*c.token_grid((latent_frames, h, w))) for c in model.compressors])
        return pos[torch.sort(pos[:, 0], stable=True).indices]


def estimate_training(trace: TrainTrace, choices: Optional[dict], budget: Optional[int]) -> Plan:
    """Each phase's peak and the step's transfers under one training plan (``budget=None``: fits)."""
    choices = check_train_choices(choices)
    swap = choices["swap"]
    text_gpu = {"text_encoder": trace.text} if choices["text"] == "gpu" else {}
    always = {"trainable+optimizer": trace.trainable, **text_gpu}
    dit, vae = {"transformer": trace.frozen}, {"vae": trace.vae}
    with_vae = {**always, **vae, **({} if swap else dit)}
    with_dit = {**always, **dit, **({} if swap else vae)}

    def phase(name, parts: dict, transient: float, moved: int = 0) -> PhaseEstimate:
        return PhaseEstimate(name, _with_allowance(sum(parts.values()) + transient), sorted(parts), moved)

    phases = [phase("text", with_vae, trace.transient["text"] if choices["text"] == "gpu" else 0),
              phase("encode", with_vae, trace.transient["encode"], trace.vae if swap else 0),
              phase("step", with_dit, trace.transient["step"], trace.frozen if swap else 0)]
    moved = sum(p.bytes_moved for p in phases)
    seconds = moved / PCIE_BYTES_PER_S
    if choices["text"] == "cpu":
        seconds += trace.text_flops / CPU_TEXT_FLOPS
    fits = budget is None or all(p.peak_bytes <= budget for p in phases)
    return Plan(fits, budget, phases, dict(choices), int(moved), round(seconds, 4), trace.context_tokens,
                trace.target_tokens, unit="step")


def all_training_plans(trace: TrainTrace, budget: Optional[int]) -> list:
    combos = [dict(zip(TRAIN_PLAN_VALUES, c)) for c in itertools.product(*TRAIN_PLAN_VALUES.values())]
    if trace.text_trains:   # a text encoder that trains stays where its optimizer states are
        combos = [c for c in combos if c["text"] == "gpu"]
    return [estimate_training(trace, c, budget) for c in combos]


def choose_training(trace: TrainTrace, budget: Optional[int]) -> Plan:
    """The training plan with the least time lost that fits ``budget`` (the plain run without one);
    the smallest-peak plan, with ``fits=False``, when none does."""
    if budget is None:
        return estimate_training(trace, {}, None)
    plans = all_training_plans(trace, budget)
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: (p.seconds_lost_per_chunk, sum(p.choices[k] != v[0] for k, v in
                                                                          TRAIN_PLAN_VALUES.items())))
    return min(plans, key=lambda p: p.peak_bytes)


__all__ = ["TrainTrace", "trace_training", "estimate_training", "choose_training", "all_training_plans",
           "TRAIN_PHASES"]
