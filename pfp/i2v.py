"""Wan 2.1 image-to-video conditioning: what ``WanImageToVideoPipeline`` (without
``expand_timesteps``) feeds its transformer beside the noisy latent.

A Wan 2.1 I2V transformer reads ``[latent ; condition]``, 16 + 20 channels, and cross-attends to the
image encoder's states beside the text (:class:`pfp.backbones.WanBackbone` takes them as
``condition=`` and ``image=``). The condition is ``[mask ; image latent]``:

- the image latent is the VAE's encoding of the video ``[image, zeros, ..., zeros]`` (the image as
  its first frame), normalised as every latent is;
- the mask has one channel per frame folded into a latent frame (the VAE's temporal factor, 4): all
  ones on the first latent frame, which holds the image, and zeros after it.

Wan 2.2 TI2V conditions differently (the first latent frame held clean: ``pfp.sampler.sample``'s
``first_frame``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def wan_i2v_condition(vae, image: Tensor, num_frames: int, given: bool = True) -> Tensor:
    """The ``[B, temporal_factor + C, T', H', W']`` condition of a ``num_frames``-frame clip that
    starts from ``image``; with ``given=False``, that of a clip given no frame (mask 0, the latent of
    blank frames), which generation uses for the chunks after the first.

    vae: a :class:`pfp.vae.WanVAE` (or any VAE with ``encode`` and ``temporal_factor``).
    image: ``[B, 3, H, W]`` in [-1, 1] at the video's size.
    num_frames: the clip's frame count (``1 + temporal_factor * k``).
    """
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got {got}")
    t_lat = vae.latent_frames(num_frames)
    b, _, h, w = image.shape
    first = image[:, :, None] if given else image.new_zeros(b, 3, 1, h, w)
    video = torch.cat([first, image.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)
    latent = vae.encode(video)
    mask = latent.new_zeros(b, vae.temporal_factor, t_lat, *latent.shape[3:])
    if given:
        mask[:, :, 0] = 1.0   # the first latent frame folds the image's frame (repeated); the rest, none
    return torch.cat([mask, latent], dim=1)


__all__ = ["wan_i2v_condition"]
