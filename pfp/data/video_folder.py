"""A folder of real videos, each with a JSON storyboard beside it.

Layout: ``root/**/name.mp4`` (or .webm, .mkv, .mov, .avi) and ``root/**/name.json``, the storyboard
(format in :mod:`pfp.text`) with times in seconds from the start of the video.

Each item is one clip of ``spec.hr_frames`` frames at ``spec.hr_fps``, starting at ``clip_start``:

- frames are sampled at times ``start + i / hr_fps``; each takes the last decoded frame shown at
  that time (so a 30 fps source read at 24 fps skips frames, and a 12 fps source repeats them);
- each frame is scaled to cover ``spec.hr_size`` (keeping the aspect ratio, area filter) and
  center-cropped to it;
- ``"lr"`` is made from ``"hr"`` by :func:`pfp.data.to_low_res`, the same function generation uses;
- the storyboard is re-timed to the clip (:meth:`pfp.text.Storyboard.window`).

Decoding uses PyAV (``pip install av``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from .._io import atomic_target
from ..text import Storyboard, StoryboardError
from . import VideoSpec, to_low_res

__all__ = ["VideoFolderDataset", "VIDEO_EXTENSIONS", "read_clip", "write_video"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
_EPS = 1e-6


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("reading videos needs PyAV: pip install av (or pip install 'pfp[video]')") from e
    return av


def _probe(path: str) -> tuple[float | None, float | None]:
    """``(duration_seconds, native_fps)`` from the container's metadata; None where unknown."""
    av = _import_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise RuntimeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = None
            return duration, fps
    except RuntimeError:
        raise
    except Exception as e:
        raise RuntimeError(f"{path}: cannot open video: {e}") from None


def read_clip(path: str, *, start: float, fps: float, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Decode ``num_frames`` frames at ``fps`` from ``start`` seconds, each scaled to cover
    ``size = (H, W)`` and center-cropped: ``[3, num_frames, H, W]`` float32 in ``[-1, 1]``.
    Raises RuntimeError naming the file if it cannot be decoded or is too short."""
    av = _import_av()
    h, w = size
    picked: list[Any] = [None] * num_frames  # numpy HxWx3 uint8 per target
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise RuntimeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            frame_period = 1.0 / float(rate) if rate else 0.0
            # times count from the stream's first timestamp (mp4 edit lists, webm offsets)
            base = float(stream.start_time * stream.time_base) if stream.start_time is not None \
                and stream.time_base is not None else 0.0
            targets = [base + start + i / fps for i in range(num_frames)]
            if start > 0 and stream.time_base is not None:
                container.seek(int((base + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
            idx = 0
            prev, prev_time = None, None
            cover = None
            cached = (None, None)  # (frame, its pixels): a frame often fills several targets

            def pixels(frame):
                nonlocal cover, cached
                if cached[0] is frame:
                    return cached[1]
                if cover is None:
                    scale = max(h / frame.height, w / frame.width)
                    cover = (max(h, round(frame.height * scale)), max(w, round(frame.width * scale)))
                arr = frame.reformat(width=cover[1], height=cover[0], format="rgb24",
                                     interpolation="AREA").to_ndarray()
                top, left = (cover[0] - h) // 2, (cover[1] - w) // 2
                cached = (frame, arr[top:top + h, left:left + w])
                return cached[1]

            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    continue
                # targets before this frame's time show the previous frame (or this one, when a
                # seek landed just after the target, or the stream starts late)
                while idx < num_frames and targets[idx] < t - _EPS:
                    picked[idx] = pixels(prev if prev is not None else frame)
                    idx += 1
                prev, prev_time = frame, t
                if idx >= num_frames:
                    break
            # the last decoded frame stays on screen for one frame period
            if prev is not None:
                while idx < num_frames and targets[idx] < prev_time + frame_period - _EPS:
                    picked[idx] = pixels(prev)
                    idx += 1
    except RuntimeError:
        raise
    except Exception as e:
        raise RuntimeError(f"{path}: cannot decode video: {e}") from None
    if prev is None:
        raise RuntimeError(f"{path}: no decodable video frames")
    if idx < num_frames:
        need = (num_frames - 1) / fps
        have = prev_time + frame_period - base
        raise RuntimeError(
            f"{path}: video too short: a clip of {num_frames} frames at {fps:g} fps from {start:g} s needs "
            f"frames up to {start + need:.3f} s, but the video ends at {have:.3f} s")
    import numpy as np

    arr = torch.from_numpy(np.stack(picked))  # [T, H, W, 3] uint8
    return arr.permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


class VideoFolderDataset(Dataset):
    """Clips of real videos with their storyboards, at the sizes and rates the model needs.

    Args:
        root: folder searched recursively for :data:`VIDEO_EXTENSIONS`; each video needs a storyboard
            ``<same stem>.json`` beside it.
        spec: a :class:`pfp.data.VideoSpec` (or dict / object with its fields): high-res size, fps
            and frame count, and the low-res branch's size and fps if used.
        clip_start: ``"first"`` (clip starts at 0 s), ``"random"`` (uniform over the start times that
            fit, from torch's global RNG, which DataLoader workers seed per worker), or a number of seconds.

    Construction lists the videos and loads every storyboard, so missing or malformed storyboards fail
    at once with the file named. Unreadable and too-short videos fail when their item is read, with
    the file named (a RuntimeError).

    Items (see :mod:`pfp.data`): ``hr``, ``lr``, ``storyboard``, ``hr_fps``, ``lr_fps``, ``source``
    (the video path), ``start_seconds`` (the clip's start in the video).
    """

    def __init__(self, root: str | os.PathLike, spec: Any, *, clip_start: str | float = "first"):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"VideoFolderDataset: root {root!r} is not a directory")
        self.root = root
        self.spec = VideoSpec.coerce(spec)
        if isinstance(clip_start, str):
            if clip_start not in ("first", "random"):
                raise ValueError(f"clip_start must be 'first', 'random' or seconds >= 0, got {clip_start!r}")
        elif isinstance(clip_start, bool) or not isinstance(clip_start, (int, float)) \
                or not math.isfinite(clip_start) or clip_start < 0:
            raise ValueError(f"clip_start must be 'first', 'random' or seconds >= 0, got {clip_start!r}")
        self.clip_start = clip_start
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                    paths.append(os.path.join(dirpath, name))
        if not paths:
            raise ValueError(f"VideoFolderDataset: no videos ({', '.join(VIDEO_EXTENSIONS)}) under {root!r}")
        self.paths = paths
        self.storyboards = []
        for p in paths:
            sb_path = os.path.splitext(p)[0] + ".json"
            if not os.path.isfile(sb_path):
                raise ValueError(f"{p}: missing storyboard {sb_path} (a JSON list of {{start, end, prompt}})")
            try:
                self.storyboards.append(Storyboard.load(sb_path))
            except StoryboardError as e:
                raise StoryboardError(str(e)) from None
        self._probe_cache: dict[int, tuple[float | None, float | None]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _start(self, index: int) -> float:
        if not isinstance(self.clip_start, str):
            return float(self.clip_start)
        if self.clip_start == "first":
            return 0.0
        if index not in self._probe_cache:
            self._probe_cache[index] = _probe(self.paths[index])
        duration, native_fps = self._probe_cache[index]
        if duration is None:
            return 0.0  # unknown length: only the start is known to exist
        span = duration - (self.spec.hr_frames - 1) / self.spec.hr_fps - (1.0 / native_fps if native_fps else 0.0)
        if span < 0:
            return 0.0  # read_clip reports it as too short
        return float(torch.rand(()).item()) * span

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, int) or not -len(self) <= index < len(self):
            raise IndexError(f"index {index!r} out of range for {len(self)} videos")
        index %= len(self)
        path = self.paths[index]
        start = self._start(index)
        spec = self.spec
        hr = read_clip(path, start=start, fps=spec.hr_fps, num_frames=spec.hr_frames, size=spec.hr_size)
        return {
            "hr": hr,
            "lr": to_low_res(hr, spec) if spec.lr_size is not None else None,
            "storyboard": self.storyboards[index].window(start, start + spec.seconds),
            "hr_fps": spec.hr_fps,
            "lr_fps": spec.lr_fps,
            "source": path,
            "start_seconds": start,
        }


def write_video(path: str | os.PathLike, video: torch.Tensor, fps: float, *, crf: int = 18) -> None:
    """Write ``video`` ``[3, T, H, W]`` float in ``[-1, 1]`` (H, W even) to ``path`` with PyAV:
    H.264 (yuv420p) for .mp4/.mkv/.mov, VP9 for .webm. ``crf``: quality, lower is better (0-51).

    Atomic: the file is written under a temporary name in the same folder and renamed at the end,
    so a failure never leaves a partial video at ``path``."""
    from fractions import Fraction

    import numpy as np

    av = _import_av()
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    codecs = {".mp4": ("mp4", "libx264"), ".mkv": ("matroska", "libx264"), ".mov": ("mov", "libx264"),
              ".webm": ("webm", "libvpx-vp9")}
    if ext not in codecs:
        raise ValueError(f"write_video: path must end in one of {sorted(codecs)}, got {path!r}")
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3 or video.shape[1] < 1:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"write_video: video must be [3, T, H, W] with T >= 1, got {shape}")
    h, w = video.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"write_video: height and width must be even for yuv420p, got {h}x{w}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"write_video: fps must be a positive number, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"write_video: crf must be an int in [0, 51], got {crf!r}")
    fmt, codec = codecs[ext]
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # [T, H, W, 3]
    with atomic_target(path, ext) as tmp:
        with av.open(tmp, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf), "b": "0"}
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
