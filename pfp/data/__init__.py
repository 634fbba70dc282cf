"""Datasets of multi-shot videos with storyboards, and the resampling both branches share.

Every dataset item is a dict:

- ``"hr"``: ``[3, T, H, W]`` float32 in ``[-1, 1]``, ``T = spec.hr_frames`` at ``spec.hr_fps``,
  ``(H, W) = spec.hr_size``;
- ``"lr"``: ``[3, T_lr, h, w]`` float32 in ``[-1, 1]`` at ``spec.lr_fps``, ``(h, w) = spec.lr_size``,
  made from ``"hr"`` by :func:`to_low_res` (exactly what generation does with its own frames);
  ``None`` when the spec has no low-res branch;
- ``"storyboard"``: a :class:`pfp.text.Storyboard` timed from the clip's first frame (0 s);
- ``"hr_fps"``, ``"lr_fps"``: floats; ``"source"``: a str naming where the clip came from;
- dataset-specific extras (the synthetic set adds ``"scene_ids"``, ``"shot_ids"``: ``[T]`` long).

:func:`collate` batches such items (tensors stacked, storyboards and strings kept as lists); pass it
as a DataLoader's ``collate_fn``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "VideoSpec",
    "LR_PHASES",
    "resize_center_crop",
    "lr_frame_indices",
    "to_low_res",
    "to_low_res_part",
    "collate",
    "SyntheticMultiShotVideos",
    "VideoFolderDataset",
    "MixedVideos",
    "write_video",
]


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"VideoSpec: {name} must be an int >= 1, got {value!r}")
    return value


def _size(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"VideoSpec: {name} must be (height, width), got {value!r}")
    return (_pos_int(value[0], f"{name}[0] (height)"), _pos_int(value[1], f"{name}[1] (width)"))


def _fps(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"VideoSpec: {name} must be a positive number of frames per second, got {value!r}")
    return float(value)


LR_PHASES = ("start", "end")


def _lr_source(j: torch.Tensor, hr_fps: float, lr_fps: float, phase: str) -> torch.Tensor:
    """High-res frame index that low-res frame(s) ``j`` show (see ``VideoSpec.lr_phase``)."""
    r = hr_fps / lr_fps
    if phase == "start":
        return torch.floor(j * r + 1e-9).long()
    return torch.ceil((j + 1) * r - 1e-9).long() - 1


def _lr_source_count(hr_frames: int, hr_fps: float, lr_fps: float, phase: str) -> int:
    """How many low-res frames have their source frame inside ``hr_frames`` high-res frames."""
    if phase == "start":
        return 1 + math.floor((hr_frames - 1) * lr_fps / hr_fps + 1e-9)
    return math.floor(hr_frames * lr_fps / hr_fps + 1e-9)


@dataclass(frozen=True)
class VideoSpec:
    """Sizes and rates to feed the model: the high-res clip, and the low-res branch if any.

    Args:
        hr_size: ``(H, W)`` of the high-res video.
        hr_fps: its frame rate.
        hr_frames: its frame count ``T`` (for a causal VAE with temporal factor 4: ``1 + 4k``).
        lr_size: ``(h, w)`` of the low-res video, or None for no low-res branch.
        lr_fps: its frame rate (at most ``hr_fps``); required with ``lr_size``.
        lr_frames: its frame count; default: every low-res frame whose source frame
            (:func:`lr_frame_indices`) lies inside the high-res clip, i.e.
            ``1 + floor((hr_frames - 1) * lr_fps / hr_fps)`` for ``lr_phase="start"`` and
            ``floor(hr_frames * lr_fps / hr_fps)`` for ``"end"``.
        lr_crop: ``(h, w)``: the low-res video shows only this top-left region of each frame (the
            region the compressor's token grid covers when the frame does not divide into it: the
            high-res branch reads the same rows and columns); None: the whole frame.
        lr_phase: which high-res frame of its interval ``[j, j + 1) / lr_fps`` low-res frame ``j``
            shows. ``"start"`` (default): the first, ``floor(j * hr_fps / lr_fps)`` (0, 2, 4, ... at
            half the rate). ``"end"``: the last, ``ceil((j + 1) * hr_fps / lr_fps) - 1`` (1, 3, 5, ...),
            so the newest frame of a history reaches the low-res branch at once.

    Sizes here are ``(height, width)``, like tensor shapes. :meth:`coerce` also accepts a dict, any
    object with these attribute names, or the compressor's what-to-feed plan (:meth:`from_plan`,
    whose sizes are ``(width, height)``).
    """

    hr_size: tuple[int, int]
    hr_fps: float
    hr_frames: int
    lr_size: tuple[int, int] | None = None
    lr_fps: float | None = None
    lr_frames: int | None = None
    lr_phase: str = "start"
    lr_crop: tuple[int, int] | None = None

    def __post_init__(self):
        if self.lr_crop is not None:
            crop = _size(self.lr_crop, "lr_crop")
            if crop[0] > _size(self.hr_size, "hr_size")[0] or crop[1] > _size(self.hr_size, "hr_size")[1]:
                raise ValueError(f"VideoSpec: lr_crop {crop} must fit in hr_size {tuple(self.hr_size)}")
            object.__setattr__(self, "lr_crop", crop)
        if self.lr_phase not in LR_PHASES:
            raise ValueError(f"VideoSpec: lr_phase {self.lr_phase!r} is not valid; choose one of: {', '.join(LR_PHASES)}")
        object.__setattr__(self, "hr_size", _size(self.hr_size, "hr_size"))
        object.__setattr__(self, "hr_fps", _fps(self.hr_fps, "hr_fps"))
        object.__setattr__(self, "hr_frames", _pos_int(self.hr_frames, "hr_frames"))
        if self.lr_size is None:
            if self.lr_fps is not None or self.lr_frames is not None:
                raise ValueError("VideoSpec: lr_fps/lr_frames given without lr_size")
            return
        object.__setattr__(self, "lr_size", _size(self.lr_size, "lr_size"))
        if self.lr_fps is None:
            raise ValueError("VideoSpec: lr_fps is required when lr_size is given")
        lr_fps = _fps(self.lr_fps, "lr_fps")
        if lr_fps > self.hr_fps * (1 + 1e-9):
            raise ValueError(f"VideoSpec: lr_fps ({lr_fps}) must not exceed hr_fps ({self.hr_fps})")
        object.__setattr__(self, "lr_fps", lr_fps)
        max_lr = _lr_source_count(self.hr_frames, self.hr_fps, lr_fps, self.lr_phase)
        if max_lr < 1:
            raise ValueError(f"VideoSpec: {self.hr_frames} high-res frame(s) at {self.hr_fps} fps end before the first "
                             f"low-res frame at {lr_fps} fps with lr_phase='end'; use at least "
                             f"{math.ceil(self.hr_fps / lr_fps - 1e-9)} frames")
        if self.lr_frames is None:
            object.__setattr__(self, "lr_frames", max_lr)
        else:
            n = _pos_int(self.lr_frames, "lr_frames")
            if n > max_lr:
                raise ValueError(
                    f"VideoSpec: lr_frames={n} at {lr_fps} fps runs past the high-res clip "
                    f"({self.hr_frames} frames at {self.hr_fps} fps holds at most {max_lr})")

    @property
    def seconds(self) -> float:
        """Duration covered by the high-res clip: ``hr_frames / hr_fps``."""
        return self.hr_frames / self.hr_fps

    @classmethod
    def from_plan(cls, plan: Any) -> "VideoSpec":
        """From the compressor's what-to-feed plan (``pfp.rates.plan_inputs``), whose video sizes are
        ``(width, height)``: ``hr_video_size``, ``hr_fps``, ``hr_frames``, ``lr_video_size``, ``lr_fps``,
        ``lr_frames``."""
        (w, h), (lw, lh) = plan.hr_video_size, plan.lr_video_size
        return cls(hr_size=(h, w), hr_fps=plan.hr_fps, hr_frames=plan.hr_frames, lr_size=(lh, lw),
                   lr_fps=plan.lr_fps, lr_frames=plan.lr_frames, lr_phase=getattr(plan, "lr_phase", "start"))

    @classmethod
    def coerce(cls, spec: Any) -> "VideoSpec":
        """A VideoSpec from a VideoSpec, a mapping with its field names, a what-to-feed plan
        (:meth:`from_plan`), or an object with the same attribute names."""
        if isinstance(spec, cls):
            return spec
        names = [f.name for f in fields(cls)]
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"VideoSpec: unknown key(s) {unknown}; valid keys are {names}")
            return cls(**spec)
        if all(hasattr(spec, n) for n in ("hr_video_size", "lr_video_size", "hr_fps", "hr_frames")):
            return cls.from_plan(spec)
        if all(hasattr(spec, n) for n in names[:3]):
            return cls(**{n: getattr(spec, n) for n in names if hasattr(spec, n)})
        raise ValueError(f"spec must be a VideoSpec, a dict or an object with attributes {names}; got {spec!r}")


def resize_center_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[..., C, T, H, W]`` frames to cover ``size = (h, w)`` keeping the aspect ratio, then
    center-crop to exactly ``size``. Bilinear with antialiasing (a box-like filter when shrinking).
    Returns float32 (contiguous); a no-op copy when the size already matches."""
    h, w = size
    if video.dim() < 4:
        raise ValueError(f"resize_center_crop: expected [..., C, T, H, W], got {tuple(video.shape)}")
    lead = video.shape[:-4]
    c, t, H, W = video.shape[-4:]
    x = video.reshape(-1, c, t, H, W).float()
    if (H, W) != (h, w):
        scale = max(h / H, w / W)
        rh, rw = max(h, round(H * scale)), max(w, round(W * scale))
        if (rh, rw) != (H, W):
            frames = x.permute(0, 2, 1, 3, 4).reshape(-1, c, H, W)
            frames = F.interpolate(frames, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            x = frames.reshape(-1, t, c, rh, rw).permute(0, 2, 1, 3, 4)
        top, left = (rh - h) // 2, (rw - w) // 2
        x = x[..., top:top + h, left:left + w]
    return x.reshape(*lead, c, t, h, w).contiguous()


def lr_frame_indices(spec: VideoSpec) -> torch.Tensor:
    """High-res frame index for each low-res frame, ``[lr_frames]`` long. With ``spec.lr_phase =
    "start"`` low-res frame ``j`` (at ``j / lr_fps`` s) takes the last high-res frame at or before that
    time, ``floor(j * hr_fps / lr_fps)``; with ``"end"`` the last high-res frame before ``(j + 1) /
    lr_fps`` s, ``ceil((j + 1) * hr_fps / lr_fps) - 1``."""
    if spec.lr_size is None:
        raise ValueError("spec has no low-res branch (lr_size is None)")
    j = torch.arange(spec.lr_frames, dtype=torch.float64)
    idx = _lr_source(j, spec.hr_fps, spec.lr_fps, spec.lr_phase)
    return idx.clamp_(max=spec.hr_frames - 1)


def to_low_res(hr: torch.Tensor, spec: VideoSpec) -> torch.Tensor:
    """The low-res branch's input from high-res frames: ``[..., 3, T, H, W]`` (``T = spec.hr_frames``)
    -> ``[..., 3, spec.lr_frames, *spec.lr_size]``, temporally subsampled by :func:`lr_frame_indices`,
    cropped to ``spec.lr_crop`` and spatially resized by :func:`resize_center_crop`. The one definition both datasets and generation use."""
    spec = VideoSpec.coerce(spec)
    if hr.dim() < 4 or hr.shape[-3] != spec.hr_frames:
        raise ValueError(f"to_low_res: expected [..., 3, {spec.hr_frames}, H, W] high-res frames, "
                         f"got {tuple(hr.shape)}")
    frames = hr.index_select(-3, lr_frame_indices(spec).to(hr.device))
    return resize_center_crop(_lr_region(frames, spec), spec.lr_size)


def _lr_region(frames: torch.Tensor, spec: VideoSpec) -> torch.Tensor:
    """The top-left ``spec.lr_crop`` region of the frames (all of them without one)."""
    if spec.lr_crop is None:
        return frames
    return frames[..., : spec.lr_crop[0], : spec.lr_crop[1]]


def to_low_res_part(hr_part: torch.Tensor, spec: VideoSpec, start: int) -> torch.Tensor:
    """The frames that :func:`to_low_res` of the whole clip takes from its frames
    ``start .. start + n - 1``, given only those frames ``[..., 3, n, H, W]``.

    Returns ``[..., 3, m, *spec.lr_size]`` (``m`` may be 0): the low-res frames whose source index
    (:func:`lr_frame_indices`) falls in the part, resized the same way. Concatenated over the parts
    of a clip it equals ``to_low_res(clip, spec)`` exactly (the resize works frame by frame), so a
    generator that makes a video part by part feeds the low-res branch what training does."""
    spec = VideoSpec.coerce(spec)
    if spec.lr_size is None:
        raise ValueError("spec has no low-res branch (lr_size is None)")
    if hr_part.dim() < 4:
        raise ValueError(f"to_low_res_part: expected [..., 3, n, H, W] frames, got {tuple(hr_part.shape)}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"to_low_res_part: start must be an int >= 0, got {start!r}")
    n = hr_part.shape[-3]
    idx = lr_frame_indices(spec)
    sel = idx[(idx >= start) & (idx < start + n)] - start
    if sel.numel() == 0:
        return hr_part.new_zeros(*hr_part.shape[:-3], 0, *spec.lr_size, dtype=torch.float32)
    return resize_center_crop(_lr_region(hr_part.index_select(-3, sel.to(hr_part.device)), spec), spec.lr_size)


def draw_item(dataset, index: int, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Item ``index`` of ``dataset``, its random draws (window, crop, flip, mixing) taken from
    ``generator`` where the dataset has ``get(index, generator)``, else ``dataset[index]``."""
    get = getattr(dataset, "get", None)
    return get(index, generator) if get is not None else dataset[index]


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked on a new dim 0, numbers into a tensor, everything else
    (storyboards, strings, None) kept as a list."""
    if not items:
        raise ValueError("collate: empty batch")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


from .synthetic import SyntheticMultiShotVideos  # noqa: E402
from .video_folder import VideoFolderDataset, write_video  # noqa: E402
from .mixed import MixedVideos  # noqa: E402
