"""A folder of real videos, each with a JSON storyboard beside it (or, where asked, without).

Layout: ``root/**/name.mp4`` (or any of :data:`VIDEO_EXTENSIONS`) and ``root/**/name.json``, the
storyboard (format in :mod:`pfp.text`) with times in seconds from the start of the video. With
``storyboards="optional"`` a video without one gets a single shot of ``default_prompt``.

Each item is one clip of ``spec.hr_frames`` frames at ``spec.hr_fps``, starting at ``clip_start``:

- frames are sampled at times ``start + i / hr_fps``; each takes the last decoded frame shown at
  that time (so a 30 fps source read at 24 fps skips frames, and a 12 fps source repeats them);
- each frame is scaled to cover ``spec.hr_size`` (keeping the aspect ratio, area filter) and
  center-cropped to it; with ``crop="random"`` each clip is scaled by a further random zoom and
  cropped at a random place instead (the same for all its frames); with ``flip=True`` half the
  clips, at random, are mirrored left to right;
- ``"lr"`` is made from ``"hr"`` by :func:`pfp.data.to_low_res`, the same function generation uses;
- the storyboard is re-timed to the clip (:meth:`pfp.text.Storyboard.window`).

Every video is decoded once when the dataset is built, so a corrupt, too short or storyboard-less
video is skipped (or reported) then, not found halfway through training.

Decoding uses PyAV (``pip install av``).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, NamedTuple, Optional

import torch
from torch.utils.data import Dataset

from .._io import atomic_target
from ..text import Storyboard, StoryboardError
from . import VideoSpec, to_low_res

__all__ = ["VideoFolderDataset", "VIDEO_EXTENSIONS", "read_clip", "write_video"]

# the containers of video files that PyAV's FFmpeg opens (a file of another kind with one of these
# names, e.g. TypeScript's .ts, is listed as unreadable, not skipped unseen)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".mpg", ".mpeg", ".m4v", ".ogv", ".flv", ".wmv",
                    ".3gp", ".ts", ".mts", ".m2ts")
_EPS = 1e-6


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("reading videos needs PyAV: pip install av (or pip install 'pfp[video]')") from e
    return av


class _BadVideo(RuntimeError):
    """A video the dataset cannot use: the message is ``"{path}: {reason}"``, ``reason`` one line;
    ``short``, a few words for summaries, defaults to the reason up to its first colon."""

    def __init__(self, path: str, reason: str, short: str | None = None):
        super().__init__(f"{path}: {reason}")
        self.reason = reason
        self.short = short or reason.split(":", 1)[0]


class _VideoScan(NamedTuple):
    duration: float  # seconds from the stream's start to the end of the last frame's display
    native_fps: float | None  # None where the container gives no rate
    frames: int  # frames that decoded with a timestamp


def _one_line(error: BaseException) -> str:
    """The first line of an exception's text: FFmpeg's own message without the file name PyAV
    appends (the callers name the file), else ``str(error)``, else the exception's type."""
    text = getattr(error, "strerror", None) or str(error)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _scan(path: str) -> _VideoScan:
    """Decode every frame of ``path``'s first video stream once and measure how long it is.

    Frames are decoded but not converted to pixels, so this costs about one decode of the file.
    Decoding everything, not just reading the header, is what catches a file whose header is fine
    but whose data is corrupt or cut short (a cut-short file measures shorter than its metadata).
    The duration follows :func:`read_clip`: the last frame's time plus one frame period, counted
    from the stream's first timestamp. Raises a RuntimeError naming the file (:class:`_BadVideo`)."""
    av = _import_av()
    try:
        container = av.open(path)
    except Exception as e:
        raise _BadVideo(path, f"cannot open: {_one_line(e)}") from None
    frames, last_time = 0, None
    with container:
        if not container.streams.video:
            raise _BadVideo(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        base = float(stream.start_time * stream.time_base) if stream.start_time is not None \
            and stream.time_base is not None else 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue  # read_clip cannot place it either
                frames += 1
                last_time = frame.time if last_time is None else max(last_time, frame.time)
        except Exception as e:
            raise _BadVideo(path, f"cannot decode: {_one_line(e)} (after {frames} frames)") from None
    if last_time is None:
        raise _BadVideo(path, "cannot decode: no video frames")
    native_fps = float(rate) if rate else None
    frame_period = 1.0 / native_fps if native_fps else 0.0
    return _VideoScan(last_time + frame_period - base, native_fps, frames)


# How far before a clip's start read_clip seeks, in seconds, try by try; None: from the file's start.
_SEEK_BACKOFF = (0.0, 1.0, 4.0, 16.0, None)
# In MPEG program and transport streams the first frames decoded after a seek carry the wrong
# timestamps (one frame late, then a repeat: measured on mpeg1 .mpg files), so read_clip seeks at
# least this many seconds before the clip and reaches it once the timestamps are right again.
_MPEG_STREAM_FORMATS = frozenset({"mpeg", "mpegts", "mpegvideo", "vob"})
_MPEG_SEEK_MARGIN = 1.0


def _decode_targets(container, path: str, start: float, fps: float, num_frames: int, size: tuple[int, int],
                    crop, seek_to: float):
    """read_clip's decode: (picked pixels per target, targets filled, last frame's time, the
    stream's start time, frame period), or None when the seek to ``seek_to`` seconds (> 0) landed
    after the first target."""
    h, w = size
    zoom, crop_y, crop_x = (1.0, 0.5, 0.5) if crop is None else crop
    picked: list[Any] = [None] * num_frames  # numpy HxWx3 uint8 per target
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
    seek = seek_to > 0 and stream.time_base is not None
    if seek:
        container.seek(int((base + seek_to) / stream.time_base), stream=stream, backward=True, any_frame=False)
    idx = 0
    prev, prev_time = None, None
    cover = None
    cached = (None, None)  # (frame, its pixels): a frame often fills several targets

    def pixels(frame):
        nonlocal cover, cached
        if cached[0] is frame:
            return cached[1]
        if cover is None:
            scale = max(h / frame.height, w / frame.width) * zoom
            cover = (max(h, round(frame.height * scale)), max(w, round(frame.width * scale)))
        arr = frame.reformat(width=cover[1], height=cover[0], format="rgb24", interpolation="AREA").to_ndarray()
        if crop is None:   # exactly the centre, as before crops could move
            top, left = (cover[0] - h) // 2, (cover[1] - w) // 2
        else:
            top, left = round(crop_y * (cover[0] - h)), round(crop_x * (cover[1] - w))
        cached = (frame, arr[top:top + h, left:left + w])
        return cached[1]

    for frame in container.decode(stream):
        t = frame.time
        if t is None:
            continue
        if seek and prev is None and t > targets[0] + _EPS:
            return None  # the seek overshot: the first target's frame lies before this one
        # targets before this frame's time show the previous frame (or this one, when the stream
        # starts after the first target)
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
    return picked, idx, prev_time, base, frame_period


def read_clip(path: str, *, start: float, fps: float, num_frames: int, size: tuple[int, int],
              crop: Optional[tuple[float, float, float]] = None) -> torch.Tensor:
    """Decode ``num_frames`` frames at ``fps`` from ``start`` seconds, each scaled to cover
    ``size = (H, W)`` and cropped to it: ``[3, num_frames, H, W]`` float32 in ``[-1, 1]``.

    ``crop = (zoom, y, x)`` scales by ``zoom >= 1`` more than the cover scale and crops at fractions
    ``y, x`` in ``[0, 1]`` of the room left (0: top/left edge, 1: bottom/right); None is
    ``(1, 0.5, 0.5)``, the centre at the cover scale. Raises RuntimeError naming the file if it
    cannot be decoded or is too short."""
    av = _import_av()
    zoom, crop_y, crop_x = (1.0, 0.5, 0.5) if crop is None else crop
    if not (zoom >= 1.0 and 0.0 <= crop_y <= 1.0 and 0.0 <= crop_x <= 1.0):
        raise ValueError(f"read_clip: crop must be (zoom >= 1, y in [0, 1], x in [0, 1]), got {crop!r}")
    # Seek to the clip's start; where the seek lands after it (MPEG program streams do: a seek to
    # 1.04 s gave 1.1 s first), seek again further back, and in the end decode from the start.
    for back in _SEEK_BACKOFF:
        try:
            with av.open(path) as container:
                if back is not None and container.format.name in _MPEG_STREAM_FORMATS:
                    back = max(back, _MPEG_SEEK_MARGIN)
                seek_to = max(start - back, 0.0) if back is not None else 0.0
                decoded = _decode_targets(container, path, start, fps, num_frames, size, crop, seek_to)
        except RuntimeError:
            raise
        except Exception as e:
            raise RuntimeError(f"{path}: cannot decode video: {e}") from None
        if decoded is not None or seek_to <= 0:
            break
    picked, idx, prev_time, base, frame_period = decoded
    if prev_time is None:
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


class _Unusable(NamedTuple):
    """One video left out of the dataset, and why."""
    path: str
    reason: str  # one line, for errors and :attr:`VideoFolderDataset.skipped`
    short: str  # a few words, for :meth:`VideoFolderDataset.skip_report`


_ON_BAD = ("skip", "error")
CROPS = ("center", "random")
STORYBOARD_POLICIES = ("required", "optional")
_LISTED_IN_ERRORS = 3  # unusable videos named in full in an error message, before "+N more"
_LISTED_IN_REPORT = 4  # named briefly in skip_report()


class VideoFolderDataset(Dataset):
    """Clips of real videos with their storyboards, at the sizes and rates the model needs.

    Args:
        root: folder searched recursively for :data:`VIDEO_EXTENSIONS`; each video needs a storyboard
            ``<same stem>.json`` beside it.
        spec: a :class:`pfp.data.VideoSpec` (or dict / object with its fields): high-res size, fps
            and frame count, and the low-res branch's size and fps if used.
        clip_start: ``"first"`` (clip starts at 0 s), ``"random"`` (uniform over the start times that
            fit, from torch's global RNG, which DataLoader workers seed per worker), or a number of seconds.
        on_bad: what to do with unusable videos: ``"skip"`` them (listed in :attr:`skipped`, summed
            up by :meth:`skip_report`) or raise an ``"error"`` (a ValueError naming them).
        progress: show a tqdm bar (on stderr) while the videos are checked.
        crop: ``"center"`` (each frame scaled to cover ``spec.hr_size``, the middle kept) or
            ``"random"`` (per clip: a further zoom uniform in ``[1, max_zoom]`` and a uniform place).
        max_zoom: the largest random zoom (>= 1; 1 moves the crop only).
        flip: mirror each clip left to right with probability 1/2 (all its frames alike). Off by
            default: prompts that name a side ("on the left") no longer match a mirrored clip.
        storyboards: ``"required"`` (a video without ``<stem>.json`` is unusable) or ``"optional"``
            (it gets one shot of ``default_prompt``; for uses that ignore text, e.g. frame retrieval).
        default_prompt: that shot's prompt.

    Construction checks every video once, before any item is read, so bad data shows up when the
    dataset is built and never halfway through training. A video is unusable when its storyboard is
    missing or malformed, when it does not open or its frames do not all decode (the whole stream is
    decoded), or when it is too short for one clip of ``spec.hr_frames`` frames at ``spec.hr_fps``
    from the first start ``clip_start`` allows (measured from the decoded frames, the same way
    :func:`read_clip` measures; a single-frame video is too short for any clip of more than one
    frame). If no usable video is left, construction fails with a ValueError either way.

    Attributes:
        paths, storyboards: the usable videos and their storyboards, in sorted path order.
        skipped: ``(path, reason)`` for each video left out with ``on_bad="skip"``; ``reason`` is one
            line, e.g. ``"cannot decode: Invalid data found when processing input (after 3 frames)"``,
            ``"too short: 0.500 s, a clip of 10 frames at 10 fps needs more than 0.900 s"``,
            ``"missing storyboard <path>.json ..."``, ``"bad storyboard: <path>.json: ..."``.

    Items (see :mod:`pfp.data`): ``hr``, ``lr``, ``storyboard``, ``hr_fps``, ``lr_fps``, ``source``
    (the video path), ``start_seconds`` (the clip's start in the video), ``crop`` (``(zoom, y, x)``,
    see :func:`read_clip`), ``flipped`` (whether the clip was mirrored). ``dataset[i]`` draws random
    starts, crops and flips from torch's global RNG; :meth:`get` takes a generator instead, so a
    training step's batch can be a pure function of its seed.
    """

    def __init__(self, root: str | os.PathLike, spec: Any, *, clip_start: str | float = "first",
                 on_bad: str = "skip", progress: bool = False, crop: str = "center", max_zoom: float = 1.5,
                 flip: bool = False, storyboards: str = "required", default_prompt: str = "a video"):
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
        if not isinstance(on_bad, str) or on_bad not in _ON_BAD:
            raise ValueError(f"on_bad must be one of {', '.join(map(repr, _ON_BAD))}, got {on_bad!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(map(repr, CROPS))}, got {crop!r}")
        if isinstance(max_zoom, bool) or not isinstance(max_zoom, (int, float)) or not 1.0 <= max_zoom < math.inf:
            raise ValueError(f"max_zoom must be a finite number >= 1, got {max_zoom!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be True or False, got {flip!r}")
        if storyboards not in STORYBOARD_POLICIES:
            raise ValueError(f"storyboards must be one of {', '.join(map(repr, STORYBOARD_POLICIES))}, "
                             f"got {storyboards!r}")
        if not isinstance(default_prompt, str) or not default_prompt.strip():
            raise ValueError(f"default_prompt must be a non-empty string, got {default_prompt!r}")
        self.crop, self.max_zoom, self.flip = crop, float(max_zoom), flip
        self.storyboard_policy, self.default_prompt = storyboards, default_prompt
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                    paths.append(os.path.join(dirpath, name))
        if not paths:
            raise ValueError(f"VideoFolderDataset: no videos ({', '.join(VIDEO_EXTENSIONS)}) under {root!r}")
        self._num_found = len(paths)

        from tqdm import tqdm

        self.paths: list[str] = []
        self.storyboards: list[Storyboard] = []
        self._scans: list[_VideoScan] = []  # measured once here; _start picks random starts from them
        unusable: list[_Unusable] = []
        for path in tqdm(paths, desc="checking videos", unit="video", disable=not progress,
                         file=sys.stderr, dynamic_ncols=True):
            try:
                storyboard, scan = self._check(path)
            except _BadVideo as e:
                unusable.append(_Unusable(path, e.reason, e.short))
                continue
            self.paths.append(path)
            self.storyboards.append(storyboard)
            self._scans.append(scan)
        self._unusable = unusable
        self.skipped: list[tuple[str, str]] = [(u.path, u.reason) for u in unusable]

        if not self.paths:
            raise ValueError(f"VideoFolderDataset: no usable video under {root!r} ({len(paths)} found, all unusable): "
                             f"{self._list_unusable()}")
        if unusable and on_bad == "error":
            are = "is" if len(unusable) == 1 else "are"
            raise ValueError(f"VideoFolderDataset: {len(unusable)} of {len(paths)} videos under {root!r} {are} "
                             f"unusable: {self._list_unusable()}; pass on_bad='skip' to skip them")

    def _first_start(self) -> float:
        """The earliest start ``clip_start`` can pick: every usable video must fit a clip from here."""
        return float(self.clip_start) if not isinstance(self.clip_start, str) else 0.0

    def _check(self, path: str) -> tuple[Storyboard, _VideoScan]:
        """The storyboard and measurements of one video; raises _BadVideo if it is unusable, with
        every reason at once (a fault of the storyboard and one of the video both), since fixing
        one alone would not make the video usable."""
        storyboard_path = os.path.splitext(path)[0] + ".json"
        storyboard, story_fault = None, None
        if os.path.isfile(storyboard_path):
            try:
                storyboard = Storyboard.load(storyboard_path)  # its errors start with storyboard_path
            except StoryboardError as e:
                story_fault = _BadVideo(path, f"bad storyboard: {_one_line(e)}")
        elif self.storyboard_policy == "required":
            story_fault = _BadVideo(path, f"missing storyboard {storyboard_path} (a JSON list of {{start, end, prompt}})",
                                    "missing storyboard")
        try:
            scan = self._check_video(path)
        except _BadVideo as e:
            if story_fault is None:
                raise
            raise _BadVideo(path, f"{e.reason}; and {story_fault.reason}", f"{e.short}, {story_fault.short}") from None
        if story_fault is not None:
            raise story_fault
        if storyboard is None:
            storyboard = Storyboard.single(self.default_prompt, scan.duration)
        return storyboard, scan

    def _check_video(self, path: str) -> _VideoScan:
        """The video's measurements; raises _BadVideo if it cannot be read or is too short."""
        scan = _scan(path)
        spec, start = self.spec, self._first_start()
        if spec.hr_frames > 1 and scan.frames == 1:
            # one frame is a still image: its display time is only the container's nominal rate
            raise _BadVideo(path, f"too short: a single frame, a clip needs {spec.hr_frames} frames",
                            "too short: a single frame")
        # read_clip's rule: the clip's last frame time must fall before the video ends
        last_frame_time = start + (spec.hr_frames - 1) / spec.hr_fps
        if not last_frame_time < scan.duration - _EPS:
            from_start = f" from {start:g} s" if start else ""
            raise _BadVideo(
                path, f"too short: {scan.duration:.3f} s, a clip of {spec.hr_frames} frames at {spec.hr_fps:g} fps"
                f"{from_start} needs more than {last_frame_time:.3f} s",
                f"too short: {scan.duration:.2f} s, needs > {last_frame_time:.2f} s")
        return scan

    def _name(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _list_unusable(self) -> str:
        """``"a.mp4: reason; b.mp4: reason; +N more"``: the first few in full, for error messages."""
        listed = [f"{self._name(u.path)}: {u.reason}" for u in self._unusable[:_LISTED_IN_ERRORS]]
        more = len(self._unusable) - _LISTED_IN_ERRORS
        return "; ".join(listed + ([f"+{more} more"] if more > 0 else []))

    def skip_report(self) -> Optional[str]:
        """None if no video was skipped, else one line naming the first few skipped and why, e.g.
        ``"skipped 2 of 5 videos: a.mp4 (cannot decode), b.mp4 (too short: 0.50 s, needs > 0.90 s)"``."""
        if not self._unusable:
            return None
        listed = [f"{self._name(u.path)} ({u.short})" for u in self._unusable[:_LISTED_IN_REPORT]]
        more = len(self._unusable) - _LISTED_IN_REPORT
        return (f"skipped {len(self._unusable)} of {self._num_found} videos: "
                + ", ".join(listed + ([f"+{more} more"] if more > 0 else [])))

    def __len__(self) -> int:
        return len(self.paths)

    def _start(self, index: int, generator: Optional[torch.Generator]) -> float:
        if self.clip_start != "random":
            return self._first_start()
        # the measured duration from construction: every start in [0, span) fits read_clip's rule
        duration = self._scans[index].duration
        span = duration - (self.spec.hr_frames - 1) / self.spec.hr_fps - 2 * _EPS
        return float(torch.rand((), generator=generator).item()) * max(span, 0.0)

    def _crop(self, generator: Optional[torch.Generator]) -> Optional[tuple[float, float, float]]:
        if self.crop == "center":
            return None
        zoom, y, x = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        return (1.0 + zoom * (self.max_zoom - 1.0), y, x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def spread_starts(self, index: int, n: int) -> list[float]:
        """``n`` clip starts spread evenly over video ``index``: the first at the earliest start
        ``clip_start`` allows, the last where a clip just fits (for evaluating several clips per
        video)."""
        first = self._first_start()
        span = self._scans[index].duration - (self.spec.hr_frames - 1) / self.spec.hr_fps - 2 * _EPS - first
        return [first + max(span, 0.0) * k / max(n - 1, 1) for k in range(n)]

    def get(self, index: int, generator: Optional[torch.Generator] = None, *,
            start: Optional[float] = None) -> dict[str, Any]:
        """Item ``index``; its random start and crop (if any) come from ``generator`` (None: torch's
        global RNG). ``start``: this start in seconds instead of ``clip_start``'s."""
        if isinstance(index, bool) or not isinstance(index, int) or not -len(self) <= index < len(self):
            raise IndexError(f"index {index!r} out of range for {len(self)} videos")
        index %= len(self)
        path = self.paths[index]
        start = self._start(index, generator) if start is None else float(start)
        crop = self._crop(generator)
        # drawn after the crop, and only with flip on, so runs without flips keep their random streams
        flipped = self.flip and bool(torch.rand((), generator=generator).item() < 0.5)
        spec = self.spec
        hr = read_clip(path, start=start, fps=spec.hr_fps, num_frames=spec.hr_frames, size=spec.hr_size, crop=crop)
        if flipped:
            hr = hr.flip(-1)
        return {
            "hr": hr,
            "lr": to_low_res(hr, spec) if spec.lr_size is not None else None,
            "storyboard": self.storyboards[index].window(start, start + spec.seconds),
            "hr_fps": spec.hr_fps,
            "lr_fps": spec.lr_fps,
            "source": path,
            "start_seconds": start,
            "crop": crop if crop is not None else (1.0, 0.5, 0.5),
            "flipped": flipped,
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
