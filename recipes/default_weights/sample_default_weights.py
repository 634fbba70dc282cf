"""Contact sheets of the built-in weights: what ``python -m pfp.generate`` makes, and what the model
remembers of a real history.

``python recipes/default_weights/sample_default_weights.py [--weights W]`` writes, under
``recipes/default_weights/results/``:

- ``contact_sheet_builtin_storyboard.png``: ``python -m pfp.generate`` with no arguments (built-in
  storyboard, seed 0), one row per chunk;
- ``contact_sheet_continuation.png``: the first three held-out synthetic videos (seed 999 unless
  ``--eval-seed``, never trained on; the sizes of the training data), two rows each: the real 4 s,
  then the model's video when it is given the real first 2 s as history
  (``generate(..., history=...)``) and generates the last 2 s from that history and the
  storyboard, in 4-frame chunks;
- ``quality.md``: :func:`pfp.eval.scene_fidelity` (palette: pixels in the scene's colours; sprites:
  the prompted sprites present; shape: how much the present ones look like their shapes) of what
  the model generates against the real scenes, over held-out synthetic videos (seed 999): the first
  chunk from its prompt alone, and the chunks after 2 s of real history. The continuations of the
  contact sheet are the first three of these, made once.

``--quality-only`` / ``--drift-only`` print the quality table / the drift after a real history
(:func:`drift`) for ``--eval-seed`` and write nothing: for comparing candidate weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
OUT = os.path.join(HERE, "results")

# the synthetic sizes stages 6-16 of pfp/weights/default.json trained on
SPRITE_RADIUS, PATTERN_PERIOD = (0.16, 0.26), (0.35, 0.6)


def main(argv=None):
    from pfp.generate import BUILTIN_STORYBOARD, generate, write_contact_sheet
    from pfp.text import Storyboard
    from pfp.weights import load_weights

    p = argparse.ArgumentParser()
    p.add_argument("--weights", default=None, help="default: the built-in weights")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cfg", type=float, default=None, help="default: the config's sample_cfg")
    p.add_argument("--eval-videos", type=int, default=48, help="held-out videos for quality.md")
    p.add_argument("--eval-seed", type=int, default=999,
                   help="data seed of the held-out videos (999: quality.md's set; 998 and 997: the others)")
    p.add_argument("--quality-only", action="store_true",
                   help="print the quality table and write nothing (for comparing weights)")
    p.add_argument("--drift-only", action="store_true",
                   help="print how far the chunks after a real history drift from the real ones; write nothing")
    p.add_argument("--seconds", type=float, default=None,
                   help="--quality-only / --drift-only: length of the held-out videos; the first 2 s are the "
                        "history, the rest is generated (default 4; the written files are always 4 s)")
    p.add_argument("--per-chunk", action="store_true",
                   help="--quality-only: also a row per chunk after the history (how the scenes fade)")
    a = p.parse_args(argv)
    model = load_weights(a.weights)
    cfg = model.config
    if a.per_chunk and not a.quality_only:
        p.error("--per-chunk adds rows to the table of --quality-only; give that too")
    if a.seconds is not None and not (a.quality_only or a.drift_only):
        p.error("--seconds goes with --quality-only / --drift-only (the written files are always 4 s)")
    if a.quality_only or a.drift_only:
        a.seconds = 4.0 if a.seconds is None else a.seconds
        if a.seconds <= 2.0 or (a.seconds * cfg.fps) % cfg.chunk_frames:
            p.error(f"--seconds must be more than the 2 s of history and whole {cfg.chunk_frames}-frame chunks "
                    f"at {cfg.fps:g} fps, got {a.seconds:g}")
        conts = continuations(model, a.eval_videos, a.steps, a.cfg, a.seconds, 2.0, seed=a.eval_seed)
        if a.quality_only:
            print(quality(model, a.eval_videos, a.steps, a.cfg, a.seconds, 2.0, seed=a.eval_seed, conts=conts,
                          per_chunk=a.per_chunk))
        if a.drift_only:
            print(drift(model, a.eval_videos, a.steps, a.cfg, a.seconds, 2.0, seed=a.eval_seed, conts=conts))
        return
    os.makedirs(OUT, exist_ok=True)

    res = generate(model, Storyboard.from_list(BUILTIN_STORYBOARD), 4.0, seed=0, steps=a.steps, cfg=a.cfg,
                   progress=False)
    write_contact_sheet(res.video, os.path.join(OUT, "contact_sheet_builtin_storyboard.png"),
                        frames_per_row=cfg.chunk_frames, upscale=4)

    seconds, given_seconds = 4.0, 2.0
    t0 = time.time()
    conts = continuations(model, a.eval_videos, a.steps, a.cfg, seconds, given_seconds, seed=a.eval_seed)
    rows = [v for item, _, _, out in conts[:3] for v in (item["hr"], out.video)]
    write_contact_sheet(torch.cat(rows, dim=1), os.path.join(OUT, "contact_sheet_continuation.png"),
                        frames_per_row=int(seconds * cfg.fps), upscale=2)
    table = quality(model, a.eval_videos, a.steps, a.cfg, seconds, given_seconds, seed=a.eval_seed, conts=conts)
    with open(os.path.join(OUT, "quality.md"), "w") as f:
        f.write(table)
    print(f"generated and scored in {time.time() - t0:.0f} s")
    print(table)
    print(OUT)


def sampler_settings(cfg, with_cfg: bool = True) -> str:
    """The config's sampler settings, as quality.md states them."""
    parts = [f"sample_shift {cfg.sample_shift:g}", f"sample_eta {cfg.sample_eta:g}"]
    if with_cfg:
        parts.append(f"sample_cfg {cfg.sample_cfg:g}")
    if cfg.sample_cfg_min_t > 0:
        parts.append(f"sample_cfg_min_t {cfg.sample_cfg_min_t:g} (no guidance at t <= it)")
    return ", ".join(parts)


def continuations(model, n_videos: int, steps: int, cfg_scale: Optional[float], seconds: float,
                  given_seconds: float, seed: int = 999) -> list:
    """``(item, plan, latents, out)`` per held-out video (data seed ``seed``): the real clip, its
    plan, its latents, and what ``generate`` makes after the clip's real first ``given_seconds``
    (seed i for video i). :func:`quality` and :func:`drift` both score these."""
    from pfp.data import SyntheticMultiShotVideos
    from pfp.generate import generate

    cfg = model.config
    frames, per = int(seconds * cfg.fps), cfg.chunk_frames
    n_given = int(given_seconds * cfg.fps) // per * cfg.chunk_latent_frames
    data = SyntheticMultiShotVideos(n_videos, cfg.video_spec(frames), seed=seed, sprite_radius=SPRITE_RADIUS,
                                    pattern_period=PATTERN_PERIOD)
    rows = []
    with torch.no_grad():
        for i in range(n_videos):
            item = data[i]
            latents = model.vae.encode(item["hr"][None])
            out = generate(model, item["storyboard"], seconds, seed=i, steps=steps, cfg=cfg_scale, progress=False,
                           history=latents[:, :, :n_given])
            rows.append((item, data.plan(i), latents, out))
    return rows


def quality(model, n_videos: int, steps: int, cfg_scale: Optional[float], seconds: float, given_seconds: float,
            seed: int = 999, conts: Optional[list] = None, per_chunk: bool = False) -> str:
    """Markdown table of scene fidelity, real against generated, on held-out synthetic videos (their
    data seed: 999 for the README's table; 998 and 997 are the other held-out sets). ``conts``:
    :func:`continuations` of the same arguments, if already made. ``per_chunk``: a row more for each
    chunk after the history."""
    from pfp.eval import scene_fidelity
    from pfp.generate import generate
    from pfp.text import Storyboard

    cfg = model.config
    frames, per = int(seconds * cfg.fps), cfg.chunk_frames
    given = int(given_seconds * cfg.fps)
    cases = {"first chunk, prompt only": ([], []), f"chunks after {given_seconds:g} s of real history": ([], [])}
    if conts is None:
        conts = continuations(model, n_videos, steps, cfg_scale, seconds, given_seconds, seed)
    with torch.no_grad():
        for i, (item, plan, _, cont) in enumerate(conts):
            scene_at = item["scene_ids"]
            real, gen = cases["first chunk, prompt only"]
            scene = plan.scenes[int(scene_at[0])]
            out = generate(model, Storyboard.single(scene.caption, per / cfg.fps), per / cfg.fps, seed=i,
                           steps=steps, cfg=cfg_scale, progress=False)
            real.append(scene_fidelity(item["hr"][:, :per], scene))
            gen.append(scene_fidelity(out.video, scene))
            real, gen = cases[f"chunks after {given_seconds:g} s of real history"]
            for k, f0 in enumerate(range(given, frames, per)):
                scene = plan.scenes[int(scene_at[f0])]     # the storyboard's scene at the chunk's start
                real_fid = scene_fidelity(item["hr"][:, f0:f0 + per], scene)
                gen_fid = scene_fidelity(cont.video[:, f0:f0 + per], scene)
                real.append(real_fid)
                gen.append(gen_fid)
                if per_chunk:
                    r, g = cases.setdefault(f"- chunk {k + 1} after the history", ([], []))
                    r.append(real_fid)
                    g.append(gen_fid)

    def mean(rows, key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals)

    lines = [f"Scene fidelity of the built-in weights (`pfp.eval.scene_fidelity`, tol 0.2) on {n_videos} held-out "
             f"synthetic videos (seed {seed}), {steps} steps, "
             + (f"CFG {cfg_scale:g}, " if cfg_scale is not None else "")
             + f"the config's {sampler_settings(cfg, cfg_scale is None)}. palette: the "
             "fraction of pixels in the scene's colours; sprites: the fraction of prompted sprites present "
             "(>= 1% of the pixels); shape: IoU of a present sprite's colour mask with its own shape, best "
             "placement.", "",
             "| case | chunks | real palette | generated palette | real sprites | generated sprites | real shape | "
             "generated shape |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (real, gen) in cases.items():
        lines.append(f"| {name} | {len(gen)} | {mean(real, 'palette'):.3f} | {mean(gen, 'palette'):.3f} | "
                     f"{mean(real, 'sprites'):.3f} | {mean(gen, 'sprites'):.3f} | {mean(real, 'shape'):.3f} | "
                     f"{mean(gen, 'shape'):.3f} |")
    return "\n".join(lines) + "\n"


def drift(model, n_videos: int, steps: int, cfg_scale: Optional[float], seconds: float, given_seconds: float,
          seed: int = 999, conts: Optional[list] = None) -> str:
    """Latent MSE of each generated chunk after a real history against the real chunk, where the
    history's last scene goes on uncut to that chunk's end (the scenes move deterministically, so an
    exact memory could come close to 0). Later chunks have fewer such cases. ``conts``:
    :func:`continuations` of the same arguments, if already made."""
    cfg = model.config
    frames, per, lat_per = int(seconds * cfg.fps), cfg.chunk_frames, cfg.chunk_latent_frames
    given = int(given_seconds * cfg.fps) // per * per
    n_given = given // per * lat_per
    if conts is None:
        conts = continuations(model, n_videos, steps, cfg_scale, seconds, given_seconds, seed)
    errors = [[] for _ in range((frames - given) // per)]
    for item, _, latents, out in conts:
        scene_at = item["scene_ids"]
        if int(scene_at[given]) != int(scene_at[given - 1]):
            continue                                        # a cut right after the history
        for k, errs in enumerate(errors):
            if bool((scene_at[given - 1:given + (k + 1) * per] == scene_at[given - 1]).all()):
                a, b = n_given + k * lat_per, n_given + (k + 1) * lat_per
                errs.append(((out.latents[:, :, a:b] - latents[:, :, a:b]) ** 2).mean().item())
    counted = " / ".join(str(len(e)) for e in errors)
    mse = " / ".join(f"{sum(e) / len(e):.3f}" if e else "-" for e in errors)
    return (f"Drift after {given_seconds:g} s of real history ({n_videos} held-out videos, seed {seed}, "
            f"{steps} steps): latent MSE of generated chunks 1..{len(errors)} against the real ones, over the chunks whose "
            f"scene goes on uncut from the history ({counted} of them): {mse}\n")


if __name__ == "__main__":
    main()
