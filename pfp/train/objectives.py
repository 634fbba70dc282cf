"""Training objectives: frame retrieval (pretrain) and next-chunk generation (finetune).

Flow matching (rectified flow): ``x_t = (1 - t) x_0 + t * noise``; the backbone predicts the
velocity ``noise - x_0``; the loss is its mean squared error, optionally weighted per sample by
``max(t, min_t) ** t_weight_power``, min_t being the backbone's own floor (0.05 for the tiny DiT;
see :func:`flow_loss`).

Timesteps and mask levels are shifted logit-normal: ``u = sigmoid(N(mean, std))`` then
``t = shift * u / (1 + (shift - 1) * u)``. A shift that trains the noisy, layout-deciding steps
hard leaves almost no samples near t = 0 (shift 5: 0.1% below t = 0.2), where the last sampling steps
draw the fine detail; ``t_uniform`` mixes in a fraction of uniform timesteps to cover them.

Every random choice of a step comes from one ``torch.Generator`` seeded by (seed, step, rank), so a
step is a pure function of its inputs and a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pfp.backbones.rope import frame_positions


@dataclass
class ObjectiveConfig:
    t_mean: float = 0.0          # logit-normal location of the training timesteps
    t_std: float = 1.0
    t_shift: float = 1.0         # >1 favours noisier timesteps
    mask_mean: float = 0.0       # logit-normal noise-as-mask levels of the frames outside Omega
    mask_std: float = 1.0
    mask_shift: float = 3.0      # mostly heavy masks; some frames only lightly noised
    max_retrieve: int = 4        # at most this many token frames in Omega (the paper: up to T/2)
    p_uncond: float = 0.1        # prompt dropped to "" (classifier-free guidance)
    p_no_history: float = 0.0    # finetune: extra chance of a first chunk (no context, text only)
    history_noise: float = 0.0   # finetune: history noised to a level ~ U(0, this) before compression
    t_weight_power: float = 0.0  # per-sample loss weight max(t, backbone min_t) ** this (2: the implied x0's MSE)
    t_uniform: float = 0.0       # fraction of samples whose timestep is uniform in (0, 1) instead
    self_history: float = 0.0    # finetune: chance that a history's newest chunk is the model's own estimate
    self_history_t: tuple = (0.2, 0.8)  # ... made in one step from the real chunk noised to a level in this range


def shifted_logit_normal(shape, generator: torch.Generator, mean: float = 0.0, std: float = 1.0,
                         shift: float = 1.0) -> Tensor:
    u = torch.sigmoid(mean + std * torch.randn(shape, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def training_timesteps(batch: int, generator: torch.Generator, cfg: ObjectiveConfig) -> Tensor:
    """``[batch]`` timesteps: shifted logit-normal, each replaced by a uniform one with probability
    ``cfg.t_uniform``. No random number is drawn for the mixture when it is 0, so older runs reproduce."""
    t = shifted_logit_normal((batch,), generator, cfg.t_mean, cfg.t_std, cfg.t_shift)
    if cfg.t_uniform > 0:
        pick = torch.rand(batch, generator=generator) < cfg.t_uniform
        t = torch.where(pick, torch.rand(batch, generator=generator), t)
    return t


def flow_pair(x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, velocity target) for t broadcast over [B, ...]."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - tb) * x0 + tb * noise, noise - x0


# the t floor of an x0-predicting backbone when it has none of its own (TinyDiTConfig's default)
_DEFAULT_MIN_T = 0.05


def flow_loss(v: Tensor, target: Tensor, t: Tensor, t_weight_power: float = 0.0,
              min_t: float = _DEFAULT_MIN_T) -> Tensor:
    """Velocity MSE; with ``t_weight_power = p > 0`` each sample's mean is weighted by ``max(t, min_t) ** p``.

    v, target: ``[B, ...]``; t: ``[B]``. For a backbone that predicts the clean latent and returns
    ``(x_t - x0) / t``, the velocity error is the x0 error divided by t, so the plain velocity MSE
    weights the x0 error by ``1 / t**2``: the nearly clean steps, which only sharpen, dominate the
    gradient, and the noisy steps that lay out the scene (which sprite goes where, which pattern)
    learn slowly. ``p = 2`` makes the loss the MSE of the implied x0, equal at every noise level;
    ``p = 1`` sits halfway. ``p = 0`` is exactly ``F.mse_loss`` (older runs reproduce bit for bit).
    On the built-in tiny model, p = 1 and 2 scored the same as p = 0 (pfp/weights/default.json, stage 14).
    """
    if t_weight_power == 0:
        return F.mse_loss(v.float(), target.float())
    per_sample = (v.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * t.float().clamp_min(min_t).pow(t_weight_power)).mean()


def _min_t(backbone) -> float:
    """The floor an x0-predicting backbone puts under t when it turns x0 into a velocity; the loss
    weight uses the same floor, so its weight and the backbone's division meet at the same t."""
    return float(getattr(backbone, "min_t", _DEFAULT_MIN_T))


def random_omega(num_frames: int, batch: int, max_keep: int, generator: torch.Generator) -> Tensor:
    """``[B, k]`` sorted frame indices: a fresh random set per sample, k random in 1..max_keep.

    Never a fixed pattern (the paper: a fixed choice such as first/last frames lets the compressor
    cheat by keeping only those). k is shared by the batch so that targets stack.
    """
    hi = max(1, min(max_keep, num_frames // 2 if num_frames > 1 else 1))
    k = int(torch.randint(1, hi + 1, (1,), generator=generator))
    idx = torch.stack([torch.randperm(num_frames, generator=generator)[:k] for _ in range(batch)])
    return idx.sort(dim=1).values


def _prompts(storyboards, times: Sequence[float], p_uncond: float, generator: torch.Generator) -> list:
    drop = torch.rand(len(storyboards), generator=generator) < p_uncond
    return ["" if d else sb.prompt_at(t) for sb, t, d in zip(storyboards, times, drop.tolist())]


def _latent_time(model, batch: dict, frame) -> float:
    """Seconds into the clip at HR latent frame ``frame`` (the storyboard's clock)."""
    fps = float(batch["hr_fps"][0]) if torch.is_tensor(batch["hr_fps"]) else float(batch["hr_fps"])
    return frame * getattr(model.vae, "temporal_factor", 1) / fps


def _lr_prefix(lr: Tensor, hr_frames: int, rt: int) -> Tensor:
    """The LR latent frames that cover the first ``hr_frames`` HR latent frames (LR frame i spans
    HR frames ``rt*i .. rt*i + rt - 1``)."""
    return lr[:, :, : -(-hr_frames // rt)]


class StepPhases:
    """Where a training step is (for a memory plan, :class:`pfp.offload.TrainPlacement`): the losses
    run the VAE's work inside ``encode()`` and the compressor's and backbone's inside ``step()``,
    so a plan can keep only one of them on the device. These defaults do nothing."""

    def encode(self):
        return nullcontext()

    def step(self):
        return nullcontext()


_NO_PHASES = StepPhases()


def _encode_text(model, prompts, device, encode_text=None) -> tuple[Tensor, Tensor]:
    """The prompts' states and mask on ``device``, from ``encode_text`` (e.g. a
    :class:`pfp.text.TextStateCache`) or the model's text encoder, which may run elsewhere (a plan's
    ``text="cpu"``)."""
    states, mask = (model.encode_text if encode_text is None else encode_text)(prompts)
    return states.to(device), mask.to(device)


def encode_clip(model, batch: dict, device, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """HR and LR latents of a collated batch (``"hr"`` ``[B, 3, T, H, W]``, ``"lr"`` low-res video)."""
    vae = model.vae
    hr = vae.encode(batch["hr"].to(device=device, dtype=dtype))
    lr = vae.encode(batch["lr"].to(device=device, dtype=dtype))
    return hr, lr


def encode_low_res(model, batch: dict, lr: Tensor, device, dtype=torch.float32) -> list:
    """The LR latents of every compressor (:attr:`pfp.model.PFPModel.compressors`): ``lr`` (the
    batch's own, the first compressor's), then each mixed compressor's, made from the batch's HR
    video at its rate."""
    if not len(model.mix):
        return [lr]
    videos = model.low_res_videos(batch["hr"].to(device=device, dtype=dtype), batch["lr"])
    return [lr] + [model.vae.encode(v.to(device=device, dtype=dtype)) for v in videos[1:]]


@torch.no_grad()
def i2v_inputs(model, backbone, batch: dict, latent_frames: int, given: bool, device) -> dict:
    """What a Wan I2V backbone reads beside the latent, for a training target of ``latent_frames``
    latent frames: ``{"condition": ..., "image": ...}`` as generation gives them, or ``{}`` for
    other backbones. The picture is each clip's first frame; ``given`` says whether the target
    starts the clip and so is conditioned on that frame, as a video's first chunk is, or is given
    no frame, as every later chunk and every retrieved frame."""
    base = model.backbone   # the backbone itself (``backbone`` may be a DDP/FSDP wrapper of it)
    wants_condition = getattr(base, "condition_channels", 0) > 0
    takes_image = getattr(base, "takes_image", False)
    if not (wants_condition or takes_image):
        return {}
    from pfp.i2v import wan_i2v_condition
    picture = batch["hr"][:, :, 0].to(device=device, dtype=torch.float32).clamp(-1, 1)   # [B, 3, H, W]
    out = {}
    if wants_condition:
        out["condition"] = wan_i2v_condition(model.vae, picture, model.vae.video_frames(latent_frames),
                                             given=bool(given))
    if takes_image:
        out["image"] = model.encode_image(picture)
    return out


def _compress(model, hr: Tensor, lrs):
    """The context of every compressor (``lrs``: one LR latent each), its inputs in the compressors'
    own dtype (they are built in the backbone's patch-embedding dtype: bf16 for a bf16 Wan). The
    compressors run outside autocast: their pfp_kernels convs take the parameters' dtype, while
    autocast would turn only the shared patch embedding (an nn.Conv3d) to bf16. The backbone,
    under autocast, casts the context tokens where it uses them."""
    dtype = model.compressor.dtype
    with torch.autocast(device_type=hr.device.type, enabled=False):
        return model.compress(hr.to(dtype), [lr.to(dtype) for lr in lrs])


def _with_window(model, backbone, ctx, hist: Tensor, dtype):
    """The compressed history joined with its newest ``config.sliding_window`` latent frames,
    uncompressed (:mod:`pfp.window`); outside autocast, like the compressor."""
    from pfp.window import window_context, with_window
    with torch.autocast(device_type=hist.device.type, enabled=False):
        return with_window(ctx, window_context(backbone, hist.to(dtype), model.config.sliding_window))


def low_res_levels(level: Tensor, rt: int, tl: int) -> Tensor:
    """The noise-as-mask levels ``[B, tl]`` of the low-res latent frames, from the HR frames' levels
    ``[B, T]``: low-res frame j covers HR frames ``j*rt .. j*rt+rt-1`` (those past T count as fully
    masked) and takes the least masked of them."""
    b, t = level.shape
    return F.pad(level, (0, tl * rt - t), value=1.0).view(b, tl, rt).min(dim=2).values


def pretrain_loss(model, backbone, batch: dict, generator: torch.Generator, cfg: ObjectiveConfig,
                  device, compute_dtype=torch.float32, phases: StepPhases = _NO_PHASES, encode_text=None) -> Tensor:
    """Frame retrieval (PFP 2.1 / 3.1). ``encode_text``: where the prompts' states come from (a
    :class:`pfp.text.TextStateCache`; default the model's text encoder).

    1. Omega: random latent frames of the clip, different for every sample and step.
    2. Noise-as-mask: every other frame is noised to a shifted-logit-normal level, in both branches
       (a low-res frame stays clean only if its span holds a frame of Omega).
    3. The masked history is compressed to a Context.
    4. The frames of Omega, noised to a random t and placed at their own times by RoPE, are
       denoised conditioned on the context: flow-matching loss on them.
    """
    with phases.encode():
        hr, lr = encode_clip(model, batch, device)
        lrs = encode_low_res(model, batch, lr, device)
    b, c, t, h, w = hr.shape
    omega = random_omega(t, b, cfg.max_retrieve, generator)                       # [B, k]
    with phases.encode():   # what a Wan I2V backbone reads beside the latent (the VAE makes it)
        extra = i2v_inputs(model, backbone, batch, omega.shape[1], False, device)   # retrieved frames: none given
    keep = torch.zeros(b, t, dtype=torch.bool).scatter_(1, omega, True)
    level = shifted_logit_normal((b, t), generator, cfg.mask_mean, cfg.mask_std, cfg.mask_shift)
    level = torch.where(keep, torch.zeros_like(level), level)
    hr_noise = torch.randn(hr.shape, generator=generator).to(hr)
    lr_masked = []
    for i, (comp, lr) in enumerate(zip(model.compressors, lrs)):
        tl = lr.shape[2]
        lr_level = low_res_levels(level, comp.rate.t, tl)
        lr_noise = torch.randn(lr.shape, generator=generator).to(lr)
        llv = lr_level.to(lr).view(b, 1, tl, 1, 1)
        lr_masked.append((1 - llv) * lr + llv * lr_noise)
    lv = level.to(hr).view(b, 1, t, 1, 1)
    hr_masked = (1 - lv) * hr + lv * hr_noise

    x0 = torch.gather(hr, 2, omega.to(hr.device).view(b, 1, -1, 1, 1).expand(b, c, -1, h, w))
    ts = training_timesteps(b, generator, cfg).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    xt, target = flow_pair(x0, ts, noise)
    ph, pw = backbone.patch_size[1:]
    positions = torch.stack([frame_positions(o.float(), h // ph, w // pw) for o in omega]).to(device)
    prompts = _prompts(batch["storyboard"], [_latent_time(model, batch, float(o[0])) for o in omega], cfg.p_uncond,
                       generator)
    text, text_mask = _encode_text(model, prompts, device, encode_text)
    with phases.step():
        ctx = _compress(model, hr_masked, lr_masked)
        v = backbone(xt, ts, text, ctx, positions=positions, text_mask=text_mask, **extra)
        return flow_loss(v, target, ts, cfg.t_weight_power, _min_t(backbone))


def finetune_loss(model, backbone, batch: dict, generator: torch.Generator, cfg: ObjectiveConfig,
                  chunk_latent_frames: int, device, compute_dtype=torch.float32,
                  phases: StepPhases = _NO_PHASES, encode_text=None) -> Tensor:
    """Next-chunk generation from the compressed history (PFP 3.3); ``encode_text`` as in :func:`pretrain_loss`.

    The clip is cut after a random number n >= 0 of whole chunks: the first n chunks are the history
    (compressed, both branches), chunk n is the target, placed right after the history by RoPE.
    n = 0 trains the first chunk of a video, which has no context.

    With ``cfg.history_noise = s > 0`` the history latents of each sample (both branches, one level
    per sample) become ``(1 - u) x + u * noise`` with ``u ~ U(0, s)`` before compression. At
    generation time the history is the model's own earlier chunks, never as clean as the real clips
    it trains on; a history that is sometimes imperfect teaches the model to follow its gist instead
    of copying every error forward (exposure bias). No random number is drawn when s = 0, so older
    runs reproduce bit for bit.

    With ``cfg.self_history = p > 0`` each sample's newest history chunk is, with probability p,
    replaced by the model's own estimate of it (:func:`_self_history`), before any history noise:
    the errors the model really makes, where Gaussian noise is only a stand-in for them.
    """
    with phases.encode():
        hr, lr = encode_clip(model, batch, device)
        lrs = encode_low_res(model, batch, lr, device)
    b, c, t, h, w = hr.shape
    lc = chunk_latent_frames
    n_max = t // lc - 1
    if n_max < 0:
        raise ValueError(f"clips of {t} latent frames are shorter than one chunk ({lc}); use longer clips")
    n = int(torch.randint(0, n_max + 1, (1,), generator=generator))
    if cfg.p_no_history > 0 and float(torch.rand((), generator=generator)) < cfg.p_no_history:
        n = 0
    x0 = hr[:, :, n * lc:(n + 1) * lc]
    with phases.encode():   # chunk 0 starts from the clip's first frame (Wan I2V)
        extra = i2v_inputs(model, backbone, batch, lc, n == 0, device)
    hist = lr_hist = None
    if n > 0:
        hist = hr[:, :, : n * lc]
        lr_hist = [_lr_prefix(lr, n * lc, comp.rate.t) for comp, lr in zip(model.compressors, lrs)]
        if cfg.self_history > 0:
            hist, lr_hist = _self_history(model, backbone, hist, lr_hist, lrs, batch, lc, generator, cfg,
                                          compute_dtype, device, phases, encode_text)
        if cfg.history_noise > 0:
            u = cfg.history_noise * torch.rand(b, generator=generator)
            hist = flow_pair(hist, u, torch.randn(hist.shape, generator=generator).to(hist))[0]
            lr_hist = [flow_pair(x, u, torch.randn(x.shape, generator=generator).to(x))[0] for x in lr_hist]
    ts = training_timesteps(b, generator, cfg).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    xt, target = flow_pair(x0, ts, noise)
    prompts = _prompts(batch["storyboard"], [_latent_time(model, batch, n * lc)] * b, cfg.p_uncond, generator)
    text, text_mask = _encode_text(model, prompts, device, encode_text)
    with phases.step():
        ctx = None
        if n > 0:
            ctx = _compress(model, hist, lr_hist)
            if model.config.sliding_window:
                ctx = _with_window(model, backbone, ctx, hist, compute_dtype)
        v = backbone(xt, ts, text, ctx, t_start=float(n * lc // backbone.patch_size[0]), text_mask=text_mask,
                     **extra)
        return flow_loss(v, target, ts, cfg.t_weight_power, _min_t(backbone))


def _self_history(model, backbone, hist: Tensor, lr_hist: list, lrs: list, batch: dict, lc: int,
                  generator: torch.Generator, cfg: ObjectiveConfig, compute_dtype, device,
                  phases: StepPhases = _NO_PHASES, encode_text=None) -> tuple[Tensor, list]:
    """The history ``hist`` (whole chunks of ``lc`` latent frames; ``lr_hist``: its LR latents per
    compressor, the starts of the clip's ``lrs``) where for a random subset of the samples (each with probability
    ``cfg.self_history``) the newest chunk is the model's own one-step clean estimate of it: the
    real chunk noised to a level ``u ~ U(cfg.self_history_t)``, denoised once given its own real
    history and prompt, without gradients.

    Training on the real next chunk after such a history teaches the model to correct the errors
    of its own chunks rather than carry them forward (scheduled sampling). A one-step estimate
    costs one forward pass, where sampling a chunk takes a forward per step; its errors (blurred
    shapes, washed-out colours) are the ones a sampled chunk has, larger the higher ``u``.

    The LR branch sees the estimate as at generation: decoded, cut down by
    :func:`pfp.data.to_low_res_part` and re-encoded."""
    from pfp.data import to_low_res_part
    b, j = hist.shape[0], hist.shape[2] // lc - 1          # j: the newest chunk
    pick = torch.rand(b, generator=generator) < cfg.self_history
    lo, hi = cfg.self_history_t
    u = lo + (hi - lo) * torch.rand(b, generator=generator)
    noise = torch.randn((b, hist.shape[1], lc, *hist.shape[3:]), generator=generator)
    if not bool(pick.any()):
        return hist, lr_hist
    real = hist[:, :, j * lc:]
    with torch.no_grad():
        with phases.encode():
            extra = i2v_inputs(model, backbone, batch, lc, j == 0, hist.device)
        ts = u.to(hist.device)
        xu = flow_pair(real, ts, noise.to(real))[0]
        when = _latent_time(model, batch, j * lc)
        text, text_mask = _encode_text(model, [sb.prompt_at(when) for sb in batch["storyboard"]], device, encode_text)
        with phases.step():
            ctx = _compress(model, hist[:, :, : j * lc], [_lr_prefix(lr, j * lc, comp.rate.t) for comp, lr
                                                          in zip(model.compressors, lrs)]) if j > 0 else None
            if j > 0 and model.config.sliding_window:
                ctx = _with_window(model, backbone, ctx, hist[:, :, : j * lc], compute_dtype)
            v = backbone(xu, ts, text, ctx, t_start=float(j * lc // backbone.patch_size[0]), text_mask=text_mask,
                         **extra)
        estimate = (xu.float() - ts.view(b, 1, 1, 1, 1) * v.float()).to(real.dtype)
        sel = pick.to(hist.device).view(b, 1, 1, 1, 1)
        hist = torch.cat([hist[:, :, : j * lc], torch.where(sel, estimate, real)], dim=2)
        out = []
        with phases.encode():
            frames = model.vae.decode(hist.float()).clamp(-1, 1)
            for branch, old in zip(model.config.branch_configs(), lr_hist):
                spec = branch.video_spec(batch["hr"].shape[2])
                lr_video = to_low_res_part(frames, spec, start=0)
                # the frames the history's LR latents come from: with a causal VAE (1 + tf*k frames)
                # the first m latent frames are those of the first 1 + tf*(m - 1) video frames
                lr_video = lr_video[:, :, : model.vae.video_frames(old.shape[2])]
                lr_new = model.vae.encode(lr_video).to(old.dtype)
                if lr_new.shape != old.shape:
                    raise RuntimeError(f"self-history: the re-encoded LR history has shape {tuple(lr_new.shape)}, "
                                       f"the clip's {tuple(old.shape)}")
                out.append(torch.where(sel, lr_new, old))
    return hist, out


__all__ = ["ObjectiveConfig", "shifted_logit_normal", "training_timesteps", "flow_pair", "flow_loss", "random_omega",
           "pretrain_loss", "finetune_loss", "encode_clip", "StepPhases"]
