"""Retrieval and consistency metrics.

- :func:`psnr`, :func:`ssim`: frame fidelity, videos ``[3, T, H, W]`` (or ``[B, 3, T, H, W]``) in [-1, 1].
- :func:`retrieval_metrics`: the paper's frame retrieval (Table 1): compress a clip, then
  regenerate chosen frames from noise conditioned only on the compressed context (placed at their
  own times by RoPE) and compare them with the originals.
- :func:`return_consistency`: memory across cuts. For every return of an earlier scene (a
  ``(last_frame_before, first_frame_back)`` pair, e.g. :func:`pfp.data.synthetic.scene_returns` of a
  synthetic clip, or the shots of a storyboard whose prompt comes back), the PSNR between the
  scene's last frame before it left and its first frame back. A model that remembers the scene
  continues it; one that only reads the prompt does not.
- :func:`scene_fidelity`: whether a generated video looks like the synthetic scene its prompt
  describes (its colours, its sprites and their shapes) and not like noise; the real scene gives
  the ceiling.
"""
from __future__ import annotations

import math
import os
import statistics
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.synthetic import scene_returns


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images/videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def ssim(a: Tensor, b: Tensor, window: int = 7) -> float:
    """Mean SSIM over frames and channels (uniform ``window`` x ``window``; constants of Wang et al. 2004)."""
    x = (a.float().clamp(-1, 1) + 1) / 2
    y = (b.float().clamp(-1, 1) + 1) / 2
    if x.dim() == 5:
        x, y = x.flatten(0, 1), y.flatten(0, 1)
    c, t, h, w = x.shape
    x = x.permute(1, 0, 2, 3).reshape(t * c, 1, h, w)
    y = y.permute(1, 0, 2, 3).reshape(t * c, 1, h, w)
    k = min(window, h, w)
    pool = lambda z: F.avg_pool2d(z, k, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy = pool(x * x) - mx * mx, pool(y * y) - my * my
    cov = pool(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean().item()


@torch.no_grad()
def retrieval_metrics(model, hr_video: Tensor, lr_video: Tensor, frames: Sequence[int], prompt: str = "", *,
                      steps: int = 16, seed: int = 0, lpips=None) -> dict:
    """Regenerate latent frames ``frames`` of a clip from its compressed context alone.

    hr_video / lr_video: ``[1, 3, T, H, W]`` and the low-res branch's input (a dataset item's
    ``"hr"``/``"lr"`` with a batch dim). ``frames`` are latent frame indices. Returns PSNR/SSIM of
    the retrieved frames against the VAE's decode of the originals, and the retrieved frames
    ``[3, F, H, W]``: F = k pixel frames with a frame-wise VAE; with a causal temporal VAE (factor
    tf > 1) the pixel frames each retrieved latent frame decodes to (1 for latent 0, tf for others),
    decoded in place within the whole clip. ``lpips``: a perceptual distance of two ``[N, 3, H, W]``
    frame batches in [-1, 1] (:func:`lpips_metric`); with one the result has ``"lpips"``, the mean
    over the retrieved frames (else None).
    """
    from pfp.backbones.rope import frame_positions
    from pfp.sampler import timestep_schedule
    vae, backbone = model.vae, model.backbone
    device = next(backbone.parameters()).device
    hr = vae.encode(hr_video.to(device))
    lrs = [vae.encode(v.to(device)) for v in model.low_res_videos(hr_video, lr_video)]  # one per compressor
    ctx = model.compress(hr, lrs)
    context = backbone.cache_context(ctx) if backbone.context_mode == "cached" else ctx
    idx = torch.as_tensor(list(frames), dtype=torch.long)
    if idx.numel() == 0 or idx.min() < 0 or idx.max() >= hr.shape[2]:
        raise ValueError(f"frames must be latent frame indices in 0..{hr.shape[2] - 1}, got {list(frames)}")
    x0 = hr[:, :, idx.to(device)]
    _, c, k, h, w = x0.shape
    ph, pw = backbone.patch_size[1:]
    positions = frame_positions(idx.float(), h // ph, w // pw).to(device)
    text, mask = model.encode_text([prompt])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x0.shape, generator=g).to(device)
    ts = timestep_schedule(steps, model.config.sample_shift, device=device)
    for i in range(steps):
        v = backbone(x, ts[i].expand(1), text, context, positions=positions, text_mask=mask)
        x = x + (ts[i + 1] - ts[i]) * v
    tf = getattr(vae, "temporal_factor", 1)
    if tf == 1:
        got = vae.decode(x).clamp(-1, 1)[0].cpu()
        want = vae.decode(x0)[0].cpu()
    else:
        # A causal VAE (Wan: 1 + 4k frames) decodes a latent frame from the ones before it; decoded
        # alone it would come out as a first frame. So the retrieved frames go back into the clip's
        # latents, the whole clip is decoded, and each retrieved latent frame is scored on the pixel
        # frames it decodes to (latent 0 -> frame 0, latent j -> frames 1 + tf*(j-1) .. tf*j).
        filled = hr.clone()
        filled[:, :, idx.to(device)] = x.to(hr.dtype)
        pixel = [f for j in idx.tolist() for f in ([0] if j == 0 else range(1 + tf * (j - 1), 1 + tf * j))]
        pixel = torch.tensor(pixel, dtype=torch.long)
        got = vae.decode(filled).clamp(-1, 1)[0].cpu()[:, pixel]
        want = vae.decode(hr)[0].cpu()[:, pixel]
    dist = None
    if lpips is not None:
        with torch.no_grad():
            dist = float(lpips(got.transpose(0, 1).float(), want.transpose(0, 1).float()).mean())
    return {"psnr": psnr(got, want), "ssim": ssim(got, want), "lpips": dist, "frames": got}


def return_consistency(video: Tensor, returns: Sequence[tuple]) -> Optional[float]:
    """Mean PSNR between ``video[:, before]`` and ``video[:, after]`` over ``returns`` (None if none)."""
    if not returns:
        return None
    vals = [psnr(video[:, a], video[:, b]) for a, b in returns]
    return sum(vals) / len(vals)


def storyboard_returns(storyboard, fps: float, num_frames: int) -> list:
    """``(last_frame_before, first_frame_back)`` for every shot whose prompt appeared in an earlier,
    non-adjacent shot, at video frame rate ``fps``."""
    return _prompt_returns([storyboard.prompt_at(f / fps) for f in range(num_frames)])


def generated_returns(storyboard, chunk_prompts: Sequence[str], config, num_frames: int, first_generated: int) -> list:
    """The returns of :func:`storyboard_returns` as a generated video shows them, for those that land
    in its generated part: frames before ``first_generated`` (the given history) have the
    storyboard's prompt at their own time, and every generated frame its chunk's prompt
    (``chunk_prompts``, one per chunk, as :func:`pfp.generate.generate` takes them at each chunk's
    start). So a cut that the storyboard puts inside a chunk counts from the next chunk, where the
    generated video has it."""
    prompts, k = [], 0
    for f in range(num_frames):
        if f < first_generated:
            prompts.append(storyboard.prompt_at(f / config.fps))
            continue
        while config.clip_frames(k + 1) <= f:
            k += 1
        prompts.append(chunk_prompts[k])
    return [(a, b) for a, b in _prompt_returns(prompts) if b >= first_generated]


def _prompt_returns(prompts: Sequence[str]) -> list:
    prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return scene_returns(torch.tensor([prompt_ids[p] for p in prompts]))


def scene_fidelity(video: Tensor, scene, tol: float = 0.2, min_sprite_fraction: float = 0.01) -> dict:
    """How well ``video [3, T, H, W]`` (in [-1, 1]) shows a :class:`pfp.data.synthetic.Scene`.

    - ``"palette"``: the fraction of pixels within ``tol`` (RGB distance, colours in [0, 1]) of the
      scene's colours: the background's range (the segment between ``colour`` and ``colour2``, which
      gradients, stripes and checkers blend along; the one colour if solid) or a sprite's colour.
      Noise and wrong colours score low. Anti-aliased sprite edges miss, so the real scene scores a
      little under 1.
    - ``"sprites"``: the fraction of the scene's sprites (those whose colour differs from the
      background's by more than ``2 * tol``) covering at least ``min_sprite_fraction`` of the pixels
      per frame, on average. None if the scene has no such sprite.
    - ``"shape"``: how much the sprites present look like their shapes. In each frame where such a
      sprite's colour covers at least ``min_sprite_fraction`` of the pixels, the pixels of its colour
      (within ``tol``) are compared with the sprite's own shape at its size, placed where it overlaps
      them best: intersection over union, mean over those (frame, sprite) pairs. A blob of the right
      colour scores well under 1; None if no sprite is present in any frame.
    """
    from .data.synthetic import COLOURS

    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {tuple(video.shape)}")
    px = ((video.detach().double().clamp(-1, 1) + 1) / 2).flatten(1).t()          # [N, 3] in [0, 1]
    c1 = torch.tensor(COLOURS[scene.colour], dtype=torch.float64)
    c2 = torch.tensor(COLOURS[scene.colour2 if scene.kind != "solid" else scene.colour], dtype=torch.float64)
    seg = c2 - c1

    def to_background(points):              # RGB distance of [..., 3] points to the segment c1-c2
        u = ((points - c1) @ seg / seg.dot(seg).clamp(min=1e-12)).clamp(0, 1)
        return (points - (c1 + u[..., None] * seg)).norm(dim=-1)

    dist = [to_background(px)]
    recalls, ious = [], []
    _, t, h, w = video.shape
    for sp in scene.sprites:
        c = torch.tensor(COLOURS[sp.colour], dtype=torch.float64)
        d = (px - c).norm(dim=1)
        dist.append(d)
        if float(to_background(c)) > 2 * tol:
            mask = (d < tol).view(t, h, w)
            recalls.append(float(mask.double().mean()) >= min_sprite_fraction)
            present = mask.flatten(1).double().mean(dim=1) >= min_sprite_fraction
            if present.any():
                ious.extend(_best_shape_iou(mask[present], sp.shape, sp.radius * min(h, w)).tolist())
    palette = float((torch.stack(dist).min(dim=0).values < tol).double().mean())
    return {"palette": palette, "sprites": (sum(recalls) / len(recalls)) if recalls else None,
            "shape": (sum(ious) / len(ious)) if ious else None}


def _best_shape_iou(mask: Tensor, shape: str, radius: float) -> Tensor:
    """``[n]``: for each frame of ``mask [n, H, W]`` (bool), the best intersection over union with the
    sprite ``shape`` of ``radius`` pixels over every placement on the pixel grid and the four
    half-pixel centre offsets (the real sprite's centre is anywhere between pixel centres)."""
    import torch.nn.functional as F

    from .data.synthetic import sprite_distance

    k = 2 * math.ceil(radius) + 3                            # odd, holds the sprite at any offset
    grid = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    m = mask.double().unsqueeze(1)                           # [n, 1, H, W]
    area = m.flatten(1).sum(dim=1)
    best = torch.zeros(mask.shape[0], dtype=torch.float64)
    for ox in (0.0, 0.5):
        for oy in (0.0, 0.5):
            template = (sprite_distance(shape, grid.view(1, k) - ox, grid.view(k, 1) - oy, radius) < 0).double()
            inter = F.conv2d(m, template.view(1, 1, k, k), padding=k - 1).flatten(1)   # every placement
            iou = inter / (area.view(-1, 1) + template.sum() - inter)
            best = torch.maximum(best, iou.max(dim=1).values)
    return best


__all__ = ["psnr", "ssim", "lpips_metric", "retrieval_metrics", "return_consistency", "storyboard_returns",
           "generated_returns", "scene_fidelity"]


# ------------------------------------------------------------------------------------------------
# python -m pfp.eval
# ------------------------------------------------------------------------------------------------
def lpips_metric():
    """(LPIPS distance, None) when the ``lpips`` package and every weight it reads are on this
    machine, else (None, a note saying what is missing). The distance is the package's LPIPS with
    AlexNet features (the usual choice for video retrieval tables), on ``[N, 3, H, W]`` in [-1, 1].
    Nothing is downloaded: AlexNet's ImageNet weights must already be in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints/``), as torchvision would have stored them."""
    import os
    try:
        import lpips
        from torchvision.models import AlexNet_Weights
    except Exception as exc:  # noqa: BLE001 - any import problem is a reason
        return None, f"not computed: the lpips package (and torchvision) is not importable ({type(exc).__name__}: {exc})"
    linear = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    backbone = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url))
    missing = [p for p in (linear, backbone) if not os.path.isfile(p)]
    if missing:
        return None, f"not computed: LPIPS's weights are not on this machine ({', '.join(missing)})"
    model = lpips.LPIPS(net="alex", verbose=False).eval()

    def distance(a: Tensor, b: Tensor) -> Tensor:
        return model(a.to(next(model.parameters()).device), b.to(next(model.parameters()).device)).flatten()
    return distance, None


class _ClipSets:
    """Each checkpoint's clips of a video folder, for one eval command: a folder scan per distinct
    clip geometry (checkpoints of one config share it), each scan checked before any scoring. The
    first set's unusable videos are listed on stderr; a later checkpoint whose clips leave out
    other videos (longer clips, say) gets its own line naming it, so no video drops out silently
    and ``psnr_per_clip`` lists of different lengths are explained."""

    def __init__(self, videos: str, *, progress: bool, storyboards: str = "required"):
        self.videos, self.progress, self.storyboards = videos, progress, storyboards
        self._sets: dict = {}
        self._first_paths: Optional[list] = None

    def get(self, config, n_chunks: int, checkpoint: str):
        import sys

        from pfp.data import VideoFolderDataset
        spec = config.clip_spec(n_chunks)
        dataset = self._sets.get(spec)
        if dataset is None:
            try:
                dataset = VideoFolderDataset(self.videos, spec, progress=self.progress, storyboards=self.storyboards)
            except ValueError as exc:
                reason = str(exc).removeprefix("VideoFolderDataset: ").replace(f" under {self.videos!r}", "")
                raise ValueError(f"--videos {self.videos}: {reason}") from None
            self._sets[spec] = dataset
        if self._first_paths is None:
            self._first_paths = list(dataset.paths)
            if dataset.skip_report():
                print(f"videos: {dataset.skip_report()}", file=sys.stderr)
        elif list(dataset.paths) != self._first_paths:   # said for every such checkpoint
            print(f"videos for {checkpoint} (clips of {n_chunks} chunks, {config.clip_frames(n_chunks)} frames "
                  f"at {config.fps:g} fps): {dataset.skip_report() or 'none skipped'}; it is scored on "
                  f"{len(dataset)} videos, the first checkpoint on {len(self._first_paths)}", file=sys.stderr)
        return dataset


def retrieval_table(checkpoints: Sequence[str], videos: str, *, seconds: Optional[float] = None, frames: int = 3,
                    clips_per_video: int = 1, steps: int = 16, seed: int = 0, progress: bool = False) -> list:
    """The paper's Table 1 on a folder of videos: for each checkpoint, the mean PSNR/SSIM of
    ``frames`` latent frames per clip (picked at random, the same for every checkpoint),
    regenerated from the compressed ``seconds`` of the clip alone (default: 4 chunks). Each video
    gives ``clips_per_video`` clips, spread evenly over it. Storyboards are optional (a video
    without one is conditioned on the prompt ``"a video"``).

    Returns one dict per checkpoint: ``checkpoint``, ``variant`` (the compressor kind), ``rate``,
    ``context_tokens`` (of one clip), ``psnr``, ``psnr_sem`` (its standard error over the clips;
    None for one clip), ``ssim``, ``lpips`` (None when it cannot be computed here, ``lpips_note`` says
    why: :func:`lpips_metric`), ``videos``, ``clips``,
    ``frames_per_video`` (per clip), ``psnr_per_clip`` (the same clips, in the same order, for every
    checkpoint whose clips the same videos hold: compare two checkpoints clip by clip). Unusable
    videos are listed once and skipped; a checkpoint whose clip length leaves out other videos than
    the first checkpoint's is named with them on stderr."""
    import random
    import sys

    from tqdm import tqdm

    from pfp.generate import chunk_plan, load_model
    from pfp._cli import work_started
    models = [(path, load_model(path, flag="--checkpoints")) for path in checkpoints]  # all checked first
    lpips, lpips_note = lpips_metric()
    clip_sets = _ClipSets(videos, progress=progress, storyboards="optional")
    prepared = []   # each checkpoint's clip length and clips, all checked before any is scored
    for path, model in models:
        n_chunks = chunk_plan(model.config, seconds if seconds is not None else 4 * model.config.chunk_seconds)
        prepared.append((n_chunks, clip_sets.get(model.config, n_chunks, str(path))))
    work_started()
    rows = []
    for (path, model), (n_chunks, dataset) in zip(models, prepared):
        config = model.config
        latent_frames = n_chunks * config.chunk_latent_frames
        h, w = config.video_size
        s = config.vae_spatial
        tokens = sum(math.prod(c.token_grid((latent_frames, h // s, w // s))) for c in model.compressors)
        clips = [(i, c, start) for i in range(len(dataset))
                 for c, start in enumerate(dataset.spread_starts(i, clips_per_video))]
        scores, dists = [], []
        for i, c, start in tqdm(clips, desc=os.path.basename(str(path)), disable=not progress, file=sys.stderr):
            item = dataset.get(i, start=start)
            # clip c of video i: the same frames for every checkpoint (a video's first clip keeps the
            # seed it had before several clips per video existed)
            rng = random.Random(seed * 100003 + i + 1000003 * c)
            picks = sorted(rng.sample(range(latent_frames), min(frames, latent_frames)))
            m = retrieval_metrics(model, item["hr"][None], item["lr"][None], picks,
                                  item["storyboard"].prompt_at(0.0), steps=steps, seed=seed, lpips=lpips)
            scores.append((m["psnr"], m["ssim"]))
            dists.append(m["lpips"])
        psnrs = [p for p, _ in scores]
        mean = statistics.fmean(psnrs)
        sem = statistics.stdev(psnrs) / len(psnrs) ** 0.5 if len(psnrs) > 1 else None
        rows.append({"checkpoint": str(path), "variant": _variant(config), "rate": _rates(config),
                     "context_tokens": tokens, "psnr": mean, "psnr_sem": sem,
                     "ssim": sum(q for _, q in scores) / len(scores),
                     "lpips": statistics.fmean(dists) if lpips is not None else None, "lpips_note": lpips_note,
                     "videos": len(dataset), "clips": len(scores), "frames_per_video": min(frames, latent_frames),
                     "psnr_per_clip": psnrs})
    return rows


def consistency_table(checkpoints: Sequence[str], videos: str, *, history_seconds: Optional[float] = None,
                      seconds: Optional[float] = None, steps: int = 16, seed: int = 0, progress: bool = False,
                      memory: bool = True) -> list:
    """Memory of scenes that return after a cut: each video's first ``history_seconds`` (default: 1
    chunk) are given as real history, the rest of ``seconds`` (default: 4 chunks) is generated
    following the video's storyboard, and every return of an earlier shot's prompt within the
    generated part (where the generated video has it: :func:`generated_returns`) is scored by
    :func:`return_consistency` (PSNR, dB, between the scene's last frame before it left and its
    first frame back). Higher: the model remembers the scene. ``memory=False`` generates with the
    compressors' context emptied (:func:`pfp.generate.generate`'s ``memory``): the caption-only
    reference, so a checkpoint's score minus this one is what its memory adds.

    Returns one dict per checkpoint: ``checkpoint``, ``variant``, ``rate``, ``consistency_psnr``
    (mean over the videos that have a return; None if none has), ``videos_scored``, ``returns``,
    ``consistency_per_video`` (each video's score in folder order, None where it has no return:
    the same videos for every checkpoint whose clip length they all hold, to compare two pair by
    pair; one that leaves out other videos is named with them on stderr), ``memory``."""
    import sys

    from tqdm import tqdm

    from pfp.generate import chunk_plan, generate, load_model
    from pfp._cli import work_started
    models = [(path, load_model(path, flag="--checkpoints")) for path in checkpoints]
    clip_sets = _ClipSets(videos, progress=progress)
    prepared = []   # each checkpoint's chunk counts and clips, all checked before any is scored
    for path, model in models:
        config = model.config
        n_chunks = chunk_plan(config, seconds if seconds is not None else 4 * config.chunk_seconds)
        n_given = chunk_plan(config, history_seconds if history_seconds is not None else config.chunk_seconds)
        if not 0 < n_given < n_chunks:
            raise ValueError(f"--history-seconds must leave at least one chunk to generate of --seconds "
                             f"({n_chunks} chunks of {config.chunk_seconds:g} s)")
        prepared.append((n_chunks, n_given, clip_sets.get(config, n_chunks, str(path))))
    work_started()
    rows = []
    for (path, model), (n_chunks, n_given, dataset) in zip(models, prepared):
        config = model.config
        first_generated = config.clip_frames(n_given)        # video frames of the given history
        scores, per_video, n_returns = [], [], 0
        for i in tqdm(range(len(dataset)), desc=os.path.basename(str(path)), disable=not progress, file=sys.stderr):
            item = dataset[i]
            with torch.no_grad():  # only the given frames: the VAE is causal, so their latents are the same
                history = model.vae.encode(item["hr"][None, :, :first_generated])
            out = generate(model, item["storyboard"], n_chunks * config.chunk_seconds, steps=steps, seed=seed,
                           history=history, progress=False, memory=memory)
            returns = generated_returns(item["storyboard"], out.prompts, config, out.video.shape[1], first_generated)
            per_video.append(return_consistency(out.video, returns))   # None without a return
            if returns:
                scores.append(per_video[-1])
                n_returns += len(returns)
        rows.append({"checkpoint": str(path), "variant": _variant(config), "rate": _rates(config),
                     "consistency_psnr": sum(scores) / len(scores) if scores else None,
                     "videos_scored": len(scores), "returns": n_returns, "consistency_per_video": per_video,
                     "memory": memory})
    return rows


def _variant(config) -> str:
    """The compressor kind(s), ``+``-joined when several are mixed (``pfp+pfp``)."""
    return "+".join(c.compressor_kind for c in config.branch_configs())


def _rates(config) -> str:
    """The compression rate(s), ``+``-joined when several are mixed (``4x4x2+2x2x8``)."""
    return "+".join(c.rate for c in config.branch_configs())


def _lpips_cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table_md(rows: list) -> str:
    lines = ["| checkpoint | variant | rate | context tokens | PSNR | SSIM | LPIPS |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        sem = f" ± {r['psnr_sem']:.2f}" if r.get("psnr_sem") is not None else ""
        lines.append(f"| {r['checkpoint']} | {r['variant']} | {r['rate']} | {r['context_tokens']} | {r['psnr']:.2f}{sem} | "
                     f"{r['ssim']:.3f} | {_lpips_cell(r['lpips'])} |")
    note = next((r["lpips_note"] for r in rows if r.get("lpips_note")), None)
    return "\n".join(lines) + (f"\n\nLPIPS: {note}.\n" if note else "\n\nLPIPS: AlexNet features (the lpips package).\n")


def _parser():
    from pfp._cli import Parser
    p = Parser(prog="python -m pfp.eval", description="Evaluate PFP checkpoints.")
    sub = p.add_subparsers(dest="command", metavar="retrieval|consistency")
    r = sub.add_parser("retrieval", help="the paper's Table 1 (frame retrieval PSNR/SSIM, and LPIPS where "
                         "the lpips package and AlexNet's weights are on this machine) on a folder of videos")
    r.error = p.error  # one line, exit 2, for the subcommand's errors too
    r.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="weights files (pfp.train --export), checkpoint folders or run folders")
    r.add_argument("--videos", required=True,
                   help="a folder of videos (any PyAV decodes); a <name>.json storyboard beside one gives its "
                        "prompt, else 'a video'")
    r.add_argument("--seconds", type=float, default=None, help="history compressed per video (default: 4 chunks)")
    r.add_argument("--frames", type=int, default=3, help="latent frames retrieved per clip (default %(default)s)")
    r.add_argument("--clips-per-video", type=int, default=1,
                   help="clips per video, spread evenly over it (default %(default)s)")
    r.add_argument("--steps", type=int, default=16, help="denoising steps per retrieval (default %(default)s)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    r.add_argument("--out", default=None, help="write the table as markdown to this .md file")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(r)
    c = sub.add_parser("consistency", help="memory of scenes that return after a cut, on generated continuations")
    c.error = p.error
    c.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT")
    c.add_argument("--videos", required=True, help="a folder of videos with storyboards in which a prompt returns")
    c.add_argument("--history-seconds", type=float, default=None, help="real history given (default: 1 chunk)")
    c.add_argument("--seconds", type=float, default=None, help="history + generated length (default: 4 chunks)")
    c.add_argument("--steps", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-memory", action="store_true", help="generate with the compressors' context emptied: "
                   "the caption-only reference (a checkpoint's score minus this one is what its memory adds)")
    c.add_argument("--json", action="store_true", help="print one JSON object per checkpoint")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(c)
    return p


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 each lets two evaluations share the cores "
                             "without slowing each other down")


def main(argv=None) -> int:
    import json

    from pfp._cli import UsageError, check_module, check_number, check_output_file, run_cli

    def body() -> int:
        parser = _parser()
        ns = parser.parse_args(argv)
        if ns.command is None:
            raise UsageError("give a command: retrieval or consistency (see --help)")
        check_number("--steps", ns.steps, lo=1, hi=1000, integer=True, allow_none=False)
        check_number("--threads", ns.threads, lo=1, integer=True)
        check_number("--seconds", ns.seconds, lo=0, lo_open=True, hi=3600)
        if not os.path.isdir(ns.videos):
            raise UsageError(f"--videos {ns.videos}: no such folder")
        check_module("--videos", "av", "av")   # PyAV decodes them
        if ns.threads is not None:
            torch.set_num_threads(ns.threads)
        if ns.command == "consistency":
            check_number("--history-seconds", ns.history_seconds, lo=0, lo_open=True, hi=3600)
            rows = consistency_table(ns.checkpoints, ns.videos, history_seconds=ns.history_seconds,
                                     seconds=ns.seconds, steps=ns.steps, seed=ns.seed, progress=not ns.quiet,
                                     memory=not ns.no_memory)
            for row in rows:
                if ns.json:
                    print(json.dumps(row))
                else:
                    score = "-" if row["consistency_psnr"] is None else f"{row['consistency_psnr']:.2f} dB"
                    print(f"{row['checkpoint']}: {row['variant']} {row['rate']}, return consistency {score} "
                          f"over {row['returns']} returns in {row['videos_scored']} videos"
                          + ("" if row["memory"] else " (context emptied: no memory)"))
            return 0
        check_number("--frames", ns.frames, lo=1, integer=True, allow_none=False)
        check_number("--clips-per-video", ns.clips_per_video, lo=1, hi=1000, integer=True, allow_none=False)
        if ns.out is not None:
            check_output_file("--out", ns.out, (".md",))
        rows = retrieval_table(ns.checkpoints, ns.videos, seconds=ns.seconds, frames=ns.frames,
                               clips_per_video=ns.clips_per_video, steps=ns.steps, seed=ns.seed,
                               progress=not ns.quiet)
        if ns.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(_table_md(rows), end="")
        if ns.out is not None:
            from pfp._io import atomic_target
            with atomic_target(ns.out, ".md") as tmp:
                with open(tmp, "w") as f:
                    f.write(_table_md(rows))
        return 0
    return run_cli(body)


if __name__ == "__main__":
    import sys
    sys.exit(main())
