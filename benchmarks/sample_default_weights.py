"""Contact sheets of the built-in weights: what ``python -m pfp.generate`` makes, and what the model
remembers of a real history.

``python benchmarks/sample_default_weights.py [--weights W]`` writes, under
``benchmarks/results/default_weights/``:

- ``contact_sheet_builtin_storyboard.png``: ``python -m pfp.generate`` with no arguments (built-in
  storyboard, seed 0), one row per chunk;
- ``contact_sheet_continuation.png``: three held-out synthetic videos (seed 999, never trained on;
  the sizes of the training data), two rows each: the real 4 s, then the model's video when it is
  given the real first 2 s as history (``generate(..., history=...)``) and generates the last 2 s
  from that history and the storyboard, in 4-frame chunks.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "benchmarks", "results", "default_weights")

# the synthetic sizes stages 6-8 of pfp/weights/default.json trained on
SPRITE_RADIUS, PATTERN_PERIOD = (0.16, 0.26), (0.35, 0.6)


def main(argv=None):
    from pfp.data import SyntheticMultiShotVideos
    from pfp.generate import BUILTIN_STORYBOARD, generate, write_contact_sheet
    from pfp.text import Storyboard
    from pfp.weights import load_weights

    p = argparse.ArgumentParser()
    p.add_argument("--weights", default=None, help="default: the built-in weights")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cfg", type=float, default=2.0)
    a = p.parse_args(argv)
    model = load_weights(a.weights)
    cfg = model.config
    os.makedirs(OUT, exist_ok=True)

    res = generate(model, Storyboard.from_list(BUILTIN_STORYBOARD), 4.0, seed=0, steps=a.steps, cfg=a.cfg,
                   progress=False)
    write_contact_sheet(res.video, os.path.join(OUT, "contact_sheet_builtin_storyboard.png"),
                        frames_per_row=cfg.chunk_frames, upscale=4)

    seconds, given_seconds = 4.0, 2.0
    frames = int(seconds * cfg.fps)
    data = SyntheticMultiShotVideos(3, cfg.video_spec(frames), seed=999, sprite_radius=SPRITE_RADIUS,
                                    pattern_period=PATTERN_PERIOD)
    rows = []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            latents = model.vae.encode(item["hr"][None])
            n_given = int(given_seconds * cfg.fps) // cfg.chunk_frames * cfg.chunk_latent_frames
            out = generate(model, item["storyboard"], seconds, seed=i, steps=a.steps, cfg=a.cfg, progress=False,
                           history=latents[:, :, :n_given])
            rows += [item["hr"], out.video]
    write_contact_sheet(torch.cat(rows, dim=1), os.path.join(OUT, "contact_sheet_continuation.png"),
                        frames_per_row=frames, upscale=2)
    print(OUT)


if __name__ == "__main__":
    main()
