"""Flow-matching Euler sampler with classifier-free guidance.

Convention (rectified flow, as Wan): ``x_t = (1 - t) * x_0 + t * noise``, the model predicts the
velocity ``noise - x_0``, and sampling integrates from t = 1 (noise) to t = 0 (data):
``x_{t'} = x_t + (t' - t) * v``. The timestep grid is shifted towards the noisy end by
``t -> shift * t / (1 + (shift - 1) * t)`` (Wan's sampling shift).

``eta`` in [0, 1] makes the steps stochastic: from the step's clean estimate ``x0 = x_t - t v`` and
noise estimate ``eps = x_t + (1 - t) v`` the next point is ``(1 - t') x0 + t' (sqrt(1 - eta^2) eps
+ eta z)`` with fresh Gaussian ``z``. ``eta = 0`` is exactly the Euler step above; ``eta = 1``
re-noises the estimate completely at every step (as DDPM-style ancestral samplers do), which
forgets the errors an imperfect model makes at high noise instead of integrating them.

With ``cfg != 1`` each step runs the conditional and the unconditional branch as one batch of 2B.
``cfg_min_t`` limits guidance to the noisy steps (a guidance interval, as Kynkäänniemi et al. 2024
propose): steps at ``t <= cfg_min_t`` run the conditional branch alone, batch B. Guidance lays out
the prompted objects at high noise; near t = 0 it only exaggerates the model's errors (on the
built-in model it rounds the sprites' edges off).
In ``"cached"`` context mode the context K/V are computed once per chunk, before the first step,
and serve every step and both branches (batch-1 broadcast, no copy). A backbone with two experts
(:class:`pfp.backbones.experts.ExpertPair`, Wan 2.2 A14B) runs each step on the expert its
timestep selects (``t >= boundary``: the high-noise one), each with its own context K/V.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    return shift * t / (1 + (shift - 1) * t)


def timestep_schedule(steps: int, shift: float = 3.0, device=None) -> Tensor:
    """``[steps + 1]`` decreasing timesteps from 1 to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


def _pad_text(a: Tensor, ma: Optional[Tensor], length: int):
    if ma is None:
        ma = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
    if a.shape[1] == length:
        return a, ma
    pad = length - a.shape[1]
    a = torch.cat([a, a.new_zeros(a.shape[0], pad, a.shape[2])], dim=1)
    ma = torch.cat([ma, ma.new_zeros(ma.shape[0], pad)], dim=1)
    return a, ma


def pair_text(cond: Tensor, uncond: Tensor, cond_mask: Optional[Tensor] = None,
              uncond_mask: Optional[Tensor] = None, batch: int = 1):
    """Stack conditional and unconditional text states ``[B, L, D]`` into one ``[2B, L, D]`` batch."""
    length = max(cond.shape[1], uncond.shape[1])
    c, mc = _pad_text(cond.expand(batch, -1, -1), None if cond_mask is None else cond_mask.expand(batch, -1), length)
    u, mu = _pad_text(uncond.expand(batch, -1, -1), None if uncond_mask is None else uncond_mask.expand(batch, -1), length)
    mask = torch.cat([mc, mu])
    return torch.cat([c, u]), (None if bool(mask.all()) else mask)


@torch.no_grad()
def sample(backbone, shape, text: Tensor, context=None, *, uncond_text: Optional[Tensor] = None,
           text_mask: Optional[Tensor] = None, uncond_text_mask: Optional[Tensor] = None,
           steps: int = 20, cfg: float = 1.0, cfg_min_t: float = 0.0, shift: float = 3.0, eta: float = 0.0,
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None, t_start: float = 0.0,
           device=None, dtype=None, on_step: Optional[Callable[[int], None]] = None,
           cfg_2: Optional[float] = None, first_frame: Optional[Tensor] = None,
           condition: Optional[Tensor] = None, image: Optional[Tensor] = None) -> Tensor:
    """Denoise one chunk of latents ``shape = [B, C, T, H, W]``.

    text: ``[B or 1, L, text_dim]``; uncond_text: the unconditional (empty-prompt) states, needed
    when ``cfg != 1``. cfg_min_t in [0, 1]: steps at ``t <= cfg_min_t`` are unguided. context: a
    ``pfp.Context`` (batch 1 or B; B > 1 only without guidance), in cached mode also a
    ``ContextKV`` (then nothing is recomputed here), or None for the first chunk.
    t_start: token-grid time of the chunk's first frame (its RoPE position after the history).
    The initial noise (and with ``eta > 0`` each step's fresh noise) comes from ``generator`` or a
    CPU generator seeded with ``seed``.
    on_step(i) is called after each step (progress bars).
    cfg_2: with two experts, the guidance of the low-noise expert's steps (WanPipeline's
    ``guidance_scale_2``); None: ``cfg`` for every step.
    first_frame: ``[B or 1, C, 1, H, W]`` a clean latent that the chunk's first latent frame is held
    to (image-to-video, as Wan 2.2 TI2V does it: diffusers' ``WanImageToVideoPipeline`` with
    ``expand_timesteps``): the model sees it in place of that frame at every step, its tokens at
    timestep 0 and the others at t, and the result's first frame is it. Needs a patch of 1 frame.
    condition, image: what a Wan 2.1 I2V backbone reads beside the noisy latent (its forward's
    ``condition=`` and ``image=``; :func:`pfp.i2v.wan_i2v_condition` builds the condition as
    ``WanImageToVideoPipeline`` does), the same for both guidance branches, at every step.
    """
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be in [0, 1] (0: deterministic Euler), got {eta!r}")
    if not (isinstance(cfg_min_t, (int, float)) and 0.0 <= cfg_min_t <= 1.0):
        raise ValueError(f"cfg_min_t must be in [0, 1] (0: guidance at every step), got {cfg_min_t!r}")
    device = torch.device(device) if device is not None else text.device
    dtype = dtype or torch.float32
    route = getattr(backbone, "route", None)  # two experts (Wan 2.2 A14B): each step's own
    ts = timestep_schedule(steps, shift, device=device)
    t_host = ts[:-1].tolist()  # read once, on the host: reading t inside the loop would sync at every step
    scales = [cfg_2 if cfg_2 is not None and route is not None and backbone.expert_at(t) == "low" else cfg
              for t in t_host]
    if any(c != 1.0 for c in scales) and uncond_text is None:
        raise ValueError("cfg != 1 needs uncond_text (the empty prompt's text states)")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    x = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    b = shape[0]
    held = None
    if first_frame is not None:
        want = (shape[1], 1, *shape[3:])
        if not isinstance(first_frame, Tensor) or first_frame.dim() != 5 or tuple(first_frame.shape[1:]) != want \
                or first_frame.shape[0] not in (1, b):
            raise ValueError(f"first_frame must be [1 or {b}, {want[0]}, 1, {want[2]}, {want[3]}] latents, got "
                             f"{tuple(first_frame.shape) if isinstance(first_frame, Tensor) else type(first_frame).__name__}")
        if backbone.patch_size[0] != 1:
            raise ValueError(f"first_frame needs a backbone whose patch spans 1 frame, got {backbone.patch_size}")
        held = first_frame.to(device=device, dtype=dtype).expand(b, -1, -1, -1, -1)

    def with_first(z: Tensor) -> Tensor:
        return z if held is None else torch.cat([held.to(z.dtype), z[:, :, 1:]], dim=2)

    def step_t(t: Tensor, n: int) -> Tensor:  # [n], or [n, T'] with the held frame's tokens clean
        if held is None:
            return t.expand(n)
        return torch.cat([t.new_zeros(n, 1), t.expand(n, shape[2] - 1)], dim=1)
    from pfp.backbones.experts import ExpertKV
    from pfp.backbones.wan_style import ContextKV
    if backbone.context_mode == "cached" and not isinstance(context, (ContextKV, ExpertKV)):
        ctx = backbone.cache_context(context)
    else:
        ctx = context
    txt, mask = text.expand(b, -1, -1), (None if text_mask is None else text_mask.expand(b, -1))
    if any(c != 1.0 for c in scales):
        pair, pair_mask = pair_text(text, uncond_text, text_mask, uncond_text_mask, batch=b)
    guided = [scales[i] != 1.0 and t > cfg_min_t for i, t in enumerate(t_host)]
    if any(guided) and _context_batch(ctx) > 1:
        # the guided batch is [cond ; uncond] over one shared history; per-sample ones would need
        # the context doubled too
        raise ValueError(f"context: a batch of {_context_batch(ctx)} histories takes no guidance; sample "
                         f"each history alone, or pass cfg=1")
    extra, extra_pair = {}, {}  # the backbone's condition / image, for b and for the guided 2b batch
    for name, value in (("condition", condition), ("image", image)):
        if value is not None:
            value = value.to(device)
            extra[name] = value
            extra_pair[name] = value if value.shape[0] == 1 else torch.cat([value, value])
    for i in range(steps):
        t = ts[i]
        net, c = route(t_host[i], ctx) if route is not None else (backbone, ctx)
        xin = with_first(x)
        if guided[i]:
            v = net(torch.cat([xin, xin]), step_t(t, 2 * b), pair, c, t_start=t_start, text_mask=pair_mask,
                    **extra_pair)
            v_cond, v_uncond = v.float().chunk(2)
            v = v_uncond + scales[i] * (v_cond - v_uncond)
        else:
            v = net(xin, step_t(t, b), txt, c, t_start=t_start, text_mask=mask, **extra).float()
        if eta == 0.0:
            x = (x.float() + (ts[i + 1] - t) * v).to(dtype)
        else:
            t_next = ts[i + 1]
            x0, eps = x.float() - t * v, x.float() + (1 - t) * v
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=device)
            x = ((1 - t_next) * x0 + t_next * ((1 - eta ** 2) ** 0.5 * eps + eta * z)).to(dtype)
        if on_step is not None:
            on_step(i)
    return with_first(x)


def _context_batch(ctx) -> int:
    """How many histories a Context, ContextKV or ExpertKV holds (1: one shared by the batch)."""
    if ctx is None:
        return 1
    if hasattr(ctx, "of"):   # ExpertKV: each held expert's ContextKV
        held = [kv for kv in (ctx.of("high"), ctx.of("low")) if kv is not None]
        return held[0].batch_size if held else 1
    return int(getattr(ctx, "batch_size", 1))


__all__ = ["sample", "timestep_schedule", "shift_timesteps", "pair_text"]
