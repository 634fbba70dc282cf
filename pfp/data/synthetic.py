"""Procedural multi-shot videos that need long-range memory: scenes cut away and come back.

Each video has a small pool of distinct *scenes*. A scene is a background (solid colour, two-colour
gradient, stripes or checkerboard) and 1-3 *sprites* (circle, square, triangle, diamond, ring or
cross, each a distinct colour) that move in straight lines and bounce off the frame's edges.

The video is a sequence of *shots*; each shot shows one scene, and consecutive shots show different
scenes. Earlier scenes return (A, B, A, C, B, ...): every video with 3 or more shots has at least
one return. A scene's clock only runs while it is on screen, so a returning scene resumes exactly
where it was left: its first frame back continues its last frame seen. A model that remembers the
scene can continue it; one that only reads the caption can get the colours and shapes right but not
the sprites' positions. ``scene_ids``/``scene_time`` per frame, and :func:`scene_returns`, let an
evaluation compare the frames around each return.

The storyboard captions each shot from its scene ("a red circle and a blue square on a green
background"); a returning scene gets the same caption.

Everything is drawn with vectorised torch ops from signed distances (anti-aliased edges), and is a
pure function of ``(seed, index)``: the same seed gives identical bytes on every run.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..text import Shot, Storyboard
from . import VideoSpec, to_low_res

__all__ = ["SyntheticMultiShotVideos", "Scene", "Sprite", "ShotPlan", "VideoPlan", "scene_returns",
           "COLOURS", "SHAPES", "BACKGROUNDS"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "magenta": (0.85, 0.15, 0.75),
    "orange": (0.95, 0.55, 0.10),
    "purple": (0.50, 0.20, 0.70),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "pink": (0.95, 0.60, 0.70),
    "brown": (0.50, 0.30, 0.12),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
BACKGROUNDS = ("solid", "gradient", "stripes", "checker")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Sprite:
    """A moving shape. Lengths are in units of ``min(H, W)``; positions are fractions of the frame
    (``x`` of the width, ``y`` of the height) at scene time 0; velocity in those units per second."""

    shape: str
    colour: str
    radius: float
    x: float
    y: float
    vx: float
    vy: float


@dataclass(frozen=True)
class Scene:
    """Background ``kind`` in :data:`BACKGROUNDS` with colours ``colour``/``colour2`` (``colour2`` unused
    for "solid"), an ``angle`` in degrees for gradients and stripes, a ``period`` (units of ``min(H, W)``)
    for stripes and checkers, and its sprites."""

    kind: str
    colour: str
    colour2: str
    angle: float
    period: float
    sprites: tuple[Sprite, ...]

    @property
    def caption(self) -> str:
        names = [f"{_a(s.colour)} {s.colour} {s.shape}" for s in self.sprites]
        things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        if self.kind == "solid":
            bg = f"{_a(self.colour)} {self.colour} background"
        elif self.kind == "gradient":
            bg = f"{_a(self.colour)} {self.colour} to {self.colour2} gradient background"
        elif self.kind == "stripes":
            bg = f"{_a(self.colour)} {self.colour} and {self.colour2} striped background"
        else:
            bg = f"{_a(self.colour)} {self.colour} and {self.colour2} checkered background"
        return f"{things} on {bg}"


@dataclass(frozen=True)
class ShotPlan:
    """Frames ``[start_frame, end_frame)`` show ``scene``, starting at scene time ``scene_start`` seconds."""

    scene: int
    start_frame: int
    end_frame: int
    scene_start: float


@dataclass(frozen=True)
class VideoPlan:
    scenes: tuple[Scene, ...]
    shots: tuple[ShotPlan, ...]


def sprite_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance in pixels (negative inside) from a sprite's outline, at offsets ``dx``, ``dy``
    (broadcastable tensors, pixels, y down) from its centre; ``r`` is its radius in pixels. A pixel's
    coverage is ``clamp(0.5 - distance, 0, 1)``."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "ring":
        return (torch.sqrt(dx * dx + dy * dy) - 0.7 * r).abs() - 0.3 * r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    if shape == "diamond":
        return (dx.abs() + dy.abs() - r) * (1 / math.sqrt(2))
    if shape == "triangle":  # apex up, circumradius r
        return torch.maximum(dy - 0.5 * r, 0.866 * dx.abs() - 0.5 * dy - 0.5 * r)
    if shape == "cross":     # union of two bars
        ax, ay = dx.abs(), dy.abs()
        return torch.minimum(torch.maximum(ax - 0.3 * r, ay - r), torch.maximum(ay - 0.3 * r, ax - r))
    raise ValueError(f"sprite shape {shape!r} is not one of {SHAPES}")


def scene_returns(scene_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``(last_frame_before, first_frame_back)`` for every shot whose scene was shown before (not
    counting the shot just before it, which is always another scene). ``scene_ids``: ``[T]`` ints."""
    ids = scene_ids.tolist()
    last_seen: dict[int, int] = {}
    out = []
    for f, s in enumerate(ids):
        if f > 0 and ids[f - 1] != s and s in last_seen:
            out.append((last_seen[s], f))
        last_seen[s] = f
    return out


@contextlib.contextmanager
def _one_thread():
    """Render on one intra-op thread: the ops are small, and on a busy machine two OpenMP threads
    made rendering 4-8x slower (measured: 64x64x241 frames 0.06 s on one thread, 0.26 s on two)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _reflect(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Bounce ``p`` between ``lo`` and ``hi`` (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return torch.full_like(p, (lo + hi) / 2)
    u = torch.remainder(p - lo, 2 * span)
    return lo + span - (u - span).abs()


class SyntheticMultiShotVideos(Dataset):
    """Procedural multi-shot videos with storyboards (module docstring for what they show).

    Args:
        num_videos: dataset length.
        spec: a :class:`pfp.data.VideoSpec` (or dict): high-res size/fps/frames, and optionally the
            low-res branch (``"lr"`` is then made from ``"hr"`` by :func:`pfp.data.to_low_res`).
        seed: base seed; item ``i`` depends only on ``(seed, i)``.
        num_scenes: scenes in each video's pool (>= 2 so that cuts are possible).
        shot_seconds: ``(min, max)`` shot length in seconds (each shot gets at least one frame).
        sprites_per_scene: ``(min, max)`` sprites per scene, between 1 and ``len(SHAPES)``.
        return_prob: probability that a cut goes back to an already-shown scene (when there is one).
        sprite_radius: ``(min, max)`` sprite radius in units of ``min(H, W)``.
        pattern_period: ``(min, max)`` period of stripes and checkers in units of ``min(H, W)``.
            Larger sprites and coarser patterns make an easier dataset for small models (the
            built-in tiny model was trained with ``sprite_radius=(0.16, 0.26)``,
            ``pattern_period=(0.35, 0.6)``: at 32x32 its tokens cover 8x8 pixels).

    Items (see :mod:`pfp.data`): ``hr [3, T, H, W]``, ``lr [3, T_lr, h, w]`` or None, ``storyboard``,
    ``hr_fps``, ``lr_fps``, ``source``, and ``scene_ids [T]`` long, ``shot_ids [T]`` long,
    ``scene_time [T]`` float64 (seconds of the scene's own clock at each frame).
    """

    def __init__(self, num_videos: int, spec: Any, *, seed: int = 0, num_scenes: int = 3,
                 shot_seconds: tuple[float, float] = (1.0, 3.0), sprites_per_scene: tuple[int, int] = (1, 3),
                 return_prob: float = 0.5, sprite_radius: tuple[float, float] = (0.08, 0.16),
                 pattern_period: tuple[float, float] = (0.12, 0.3)):
        if isinstance(num_videos, bool) or not isinstance(num_videos, int) or num_videos < 1:
            raise ValueError(f"num_videos must be an int >= 1, got {num_videos!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or not 2 <= num_scenes <= len(COLOURS) // 2:
            raise ValueError(f"num_scenes must be an int in [2, {len(COLOURS) // 2}], got {num_scenes!r}")
        lo, hi = shot_seconds
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"shot_seconds must be (min, max) with 0 < min <= max, got {shot_seconds!r}")
        slo, shi = sprites_per_scene
        if not (1 <= slo <= shi <= len(SHAPES)):
            raise ValueError(f"sprites_per_scene must be (min, max) with 1 <= min <= max <= {len(SHAPES)}, "
                             f"got {sprites_per_scene!r}")
        if not 0.0 <= return_prob <= 1.0:
            raise ValueError(f"return_prob must be in [0, 1], got {return_prob!r}")
        for name, rng_ in (("sprite_radius", sprite_radius), ("pattern_period", pattern_period)):
            if (not isinstance(rng_, (tuple, list)) or len(rng_) != 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in rng_)
                    or not 0 < rng_[0] <= rng_[1] <= 1):
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1 (units of min(H, W)), "
                                 f"got {rng_!r}")
        self.num_videos = num_videos
        self.sprite_radius = (float(sprite_radius[0]), float(sprite_radius[1]))
        self.pattern_period = (float(pattern_period[0]), float(pattern_period[1]))
        self.spec = VideoSpec.coerce(spec)
        self.seed = seed
        self.num_scenes = num_scenes
        self.shot_seconds = (float(lo), float(hi))
        self.sprites_per_scene = (int(slo), int(shi))
        self.return_prob = float(return_prob)

    def __len__(self) -> int:
        return self.num_videos

    # -- planning -------------------------------------------------------------------------------
    def _rng(self, index: int) -> random.Random:
        return random.Random(f"pfp.synthetic:{self.seed}:{index}")

    def _make_scenes(self, rng: random.Random) -> tuple[Scene, ...]:
        names = list(COLOURS)
        main = rng.sample(names, self.num_scenes)  # distinct main background colour per scene
        scenes = []
        for c in main:
            kind = rng.choice(BACKGROUNDS)
            c2 = rng.choice([n for n in names if n != c])
            bg_colours = {c} if kind == "solid" else {c, c2}
            n = rng.randint(*self.sprites_per_scene)
            shapes = rng.sample(SHAPES, n)
            colours = rng.sample([k for k in names if k not in bg_colours], n)
            sprites = []
            for shape, colour in zip(shapes, colours):
                r = rng.uniform(*self.sprite_radius)
                speed = rng.uniform(0.15, 0.45)
                theta = rng.uniform(0, 2 * math.pi)
                sprites.append(Sprite(shape, colour, r, rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85),
                                      speed * math.cos(theta), speed * math.sin(theta)))
            scenes.append(Scene(kind, c, c2, rng.choice((0.0, 45.0, 90.0, 135.0)), rng.uniform(*self.pattern_period),
                                tuple(sprites)))
        return tuple(scenes)

    def plan(self, index: int) -> VideoPlan:
        """The scenes and shots of item ``index`` (no pixels)."""
        if isinstance(index, bool) or not isinstance(index, int) or not -self.num_videos <= index < self.num_videos:
            raise IndexError(f"index {index!r} out of range for {self.num_videos} videos")
        index %= self.num_videos
        rng = self._rng(index)
        scenes = self._make_scenes(rng)
        fps, total = self.spec.hr_fps, self.spec.hr_frames
        order: list[int] = []
        lengths: list[int] = []
        f = 0
        while f < total:
            n = max(1, round(rng.uniform(*self.shot_seconds) * fps))
            n = min(n, total - f)
            if not order:
                s = 0
            else:
                seen = [k for k in dict.fromkeys(order) if k != order[-1]]
                fresh = [k for k in range(len(scenes)) if k not in order]
                if seen and (not fresh or rng.random() < self.return_prob):
                    s = rng.choice(seen)
                else:
                    s = fresh[0]
            order.append(s)
            lengths.append(n)
            f += n
        returned = any(order[i] in order[:i - 1] for i in range(2, len(order)))
        if len(order) >= 3 and not returned:
            order[-1] = order[0]  # scene 0 has not been seen since shot 0, so this is a return
        shots = []
        elapsed = [0.0] * len(scenes)
        f = 0
        for s, n in zip(order, lengths):
            shots.append(ShotPlan(s, f, f + n, elapsed[s]))
            elapsed[s] += n / fps
            f += n
        return VideoPlan(scenes, tuple(shots))

    # -- drawing --------------------------------------------------------------------------------
    @staticmethod
    def _background(scene: Scene, h: int, w: int) -> torch.Tensor:
        """``[3, H, W]`` float32 in [-1, 1]."""
        unit = min(h, w)
        y = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2).view(h, 1)
        x = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2).view(1, w)
        c1 = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
        c2 = torch.tensor(COLOURS[scene.colour2]).view(3, 1, 1)
        a = math.radians(scene.angle)
        along = x * math.cos(a) + y * math.sin(a)  # pixels along the pattern direction
        period = scene.period * unit
        if scene.kind == "solid":
            mix = torch.zeros(1, h, w)
        elif scene.kind == "gradient":
            extent = abs(w * math.cos(a)) + abs(h * math.sin(a))
            mix = (along / extent + 0.5).clamp(0, 1).unsqueeze(0)
        elif scene.kind == "stripes":
            dist = torch.sin(along * (2 * math.pi / period)) * (period / (2 * math.pi))
            mix = (0.5 + dist).clamp(0, 1).unsqueeze(0)
        else:
            k = 2 * math.pi / period
            dist = torch.sin(x * k) * torch.sin(y * k) * (period / (2 * math.pi))
            mix = (0.5 + dist).clamp(0, 1).unsqueeze(0)
        return (c1 * (1 - mix) + c2 * mix).expand(3, h, w) * 2 - 1

    @staticmethod
    def _draw_sprites(frames: torch.Tensor, scene: Scene, times: torch.Tensor) -> None:
        """Composite the scene's sprites at scene times ``times [n]`` onto ``frames [3, n, H, W]``
        (values in [-1, 1]) in place. Each sprite is evaluated only in a small window around it per
        frame (it covers nothing outside), gathered and scattered back through flat indices."""
        _, n, h, w = frames.shape
        unit = min(h, w)
        t = times.to(torch.float64)
        fidx = torch.arange(n).view(n, 1, 1)
        flat = frames.view(3, n * h * w)  # a view: frames is a time slice of a contiguous video
        for sp in scene.sprites:
            r = sp.radius * unit
            cx = _reflect(sp.x * w + sp.vx * unit * t, r, w - r)
            cy = _reflect(sp.y * h + sp.vy * unit * t, r, h - r)
            # window of pixels whose centres can be within r + 0.5 of the sprite centre
            kx, ky = min(w, math.ceil(2 * r) + 3), min(h, math.ceil(2 * r) + 3)
            x0 = (torch.floor(cx - r).long() - 1).clamp_(0, w - kx)
            y0 = (torch.floor(cy - r).long() - 1).clamp_(0, h - ky)
            cols = (x0.view(n, 1) + torch.arange(kx)).view(n, 1, kx)
            rows = (y0.view(n, 1) + torch.arange(ky)).view(n, ky, 1)
            dx = cols.float() + 0.5 - cx.float().view(n, 1, 1)  # [n, 1, kx]
            dy = rows.float() + 0.5 - cy.float().view(n, 1, 1)  # [n, ky, 1]
            alpha = (0.5 - sprite_distance(sp.shape, dx, dy, r)).clamp_(0, 1)  # [n, ky, kx] coverage
            colour = torch.tensor(COLOURS[sp.colour]) * 2 - 1
            idx = ((fidx * h + rows) * w + cols).reshape(-1)  # flat (frame, y, x) of each window pixel
            region = flat.index_select(1, idx)  # [3, n*ky*kx]
            flat.index_copy_(1, idx, region.lerp_(colour.view(3, 1).expand_as(region), alpha.reshape(1, -1)))

    def render(self, plan: VideoPlan) -> torch.Tensor:
        """Pixels of a plan: ``[3, T, H, W]`` float32 in ``[-1, 1]`` at the spec's high-res size and fps."""
        h, w = self.spec.hr_size
        fps = self.spec.hr_fps
        video = torch.empty(3, self.spec.hr_frames, h, w)
        backgrounds: dict[int, torch.Tensor] = {}
        for shot in plan.shots:
            scene = plan.scenes[shot.scene]
            if shot.scene not in backgrounds:
                backgrounds[shot.scene] = self._background(scene, h, w)
            frames = video[:, shot.start_frame:shot.end_frame]
            frames.copy_(backgrounds[shot.scene].unsqueeze(1).expand_as(frames))
            n = shot.end_frame - shot.start_frame
            times = shot.scene_start + torch.arange(n, dtype=torch.float64) / fps
            self._draw_sprites(frames, scene, times)
        return video.clamp_(-1, 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plan = self.plan(index)
        index %= self.num_videos
        fps = self.spec.hr_fps
        with _one_thread():
            hr = self.render(plan)
            lr = to_low_res(hr, self.spec) if self.spec.lr_size is not None else None
        scene_ids = torch.empty(self.spec.hr_frames, dtype=torch.long)
        shot_ids = torch.empty_like(scene_ids)
        scene_time = torch.empty(self.spec.hr_frames, dtype=torch.float64)
        shots = []
        for k, shot in enumerate(plan.shots):
            sl = slice(shot.start_frame, shot.end_frame)
            scene_ids[sl] = shot.scene
            shot_ids[sl] = k
            scene_time[sl] = shot.scene_start + torch.arange(shot.end_frame - shot.start_frame,
                                                             dtype=torch.float64) / fps
            shots.append(Shot(shot.start_frame / fps, shot.end_frame / fps, plan.scenes[shot.scene].caption))
        return {
            "hr": hr,
            "lr": lr,
            "storyboard": Storyboard(tuple(shots)),
            "hr_fps": fps,
            "lr_fps": self.spec.lr_fps,
            "source": f"synthetic:seed={self.seed}:index={index}",
            "scene_ids": scene_ids,
            "shot_ids": shot_ids,
            "scene_time": scene_time,
        }
