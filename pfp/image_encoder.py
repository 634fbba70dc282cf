"""The image encoder of Wan 2.1 image-to-video: a CLIP vision tower from a local folder.

``WanImageToVideoPipeline`` encodes the picture with ``CLIPVisionModel`` (ViT-H/14 in the released
models) and gives the transformer the penultimate layer's hidden states (257 tokens of 1280 for a
224-pixel picture), the same for both guidance branches. :class:`CLIPImageEncoder` does the same
from a local folder (nothing is downloaded): a transformers CLIP vision model folder, or a diffusers
pipeline folder with ``image_encoder/`` (and ``image_processor/``, whose size, mean and std it reads).

Preprocessing is done in torch, as ``CLIPImageProcessor`` does it: resize the shorter side to the
processor's size (bicubic), center-crop the square, normalise by the processor's mean and std.
transformers' own processor resizes with PIL (or torchvision, not a dependency here), so pixels
differ from it by resampling rounding; the states it gives are otherwise the pipeline's.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPImageEncoder(nn.Module):
    """picture ``[3, H, W]`` or ``[B, 3, H, W]`` in [-1, 1] -> states ``[B, N, D]`` (the vision
    tower's penultimate hidden states). Frozen: never trained, left out of saved weights."""

    frozen = True

    def __init__(self, model: nn.Module, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = int(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def preprocess(self, picture: Tensor) -> Tensor:
        x = picture[None] if picture.dim() == 3 else picture
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"picture must be [3, H, W] or [B, 3, H, W] in [-1, 1], got {tuple(picture.shape)}")
        x = (x.float().clamp(-1, 1) + 1) / 2                       # [0, 1], as the processor rescales
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def forward(self, picture: Tensor) -> Tensor:
        pixels = self.preprocess(picture).to(next(self.model.parameters()).dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None) -> "CLIPImageEncoder":
        """A local transformers CLIP vision model folder, or a pipeline folder with image_encoder/
        (its image_processor/preprocessor_config.json gives size, mean and std when present)."""
        from transformers import CLIPVisionModel
        where = os.path.join(path, subfolder) if subfolder else path
        if not subfolder and not os.path.isfile(os.path.join(path, "config.json")):
            where = os.path.join(path, "image_encoder")
        model = CLIPVisionModel.from_pretrained(where, local_files_only=True, torch_dtype=torch_dtype)
        size, mean, std = model.config.image_size, CLIP_MEAN, CLIP_STD
        for folder in (os.path.join(os.path.dirname(where.rstrip("/")), "image_processor"), where):
            cfg_file = os.path.join(folder, "preprocessor_config.json")
            if os.path.isfile(cfg_file):
                with open(cfg_file) as f:
                    pre = json.load(f)
                crop = pre.get("crop_size", size)
                size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
                mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
                break
        return cls(model, size=size, mean=mean, std=std)

    @classmethod
    def from_config(cls, **config) -> "CLIPImageEncoder":
        """A randomly initialised CLIP vision tower from ``CLIPVisionConfig`` keys (tests)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel
        model = CLIPVisionModel(CLIPVisionConfig(**config))
        return cls(model, size=int(model.config.image_size))


__all__ = ["CLIPImageEncoder"]
