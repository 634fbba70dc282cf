"""Write procedural multi-shot videos whose scenes return after a cut (pfp.data.SyntheticMultiShotVideos),
each with its storyboard, as a folder that ``python -m pfp.eval consistency`` scores.

The videos come from a seed that no training run of the recipe draws from, so they are held out.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write <i>.mp4 and <i>.json into")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--size", type=int, default=32, help="frame height and width (default %(default)s)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=999)
    ns = p.parse_args(argv)
    from pfp.data import SyntheticMultiShotVideos, VideoSpec, write_video
    frames = int(round(ns.seconds * ns.fps))
    # large sprites and coarse patterns: those the built-in model was trained on
    data = SyntheticMultiShotVideos(ns.videos, VideoSpec(hr_size=ns.size, hr_fps=ns.fps, hr_frames=frames),
                                    seed=ns.seed, sprite_radius=(0.16, 0.26), pattern_period=(0.35, 0.6))
    os.makedirs(ns.out, exist_ok=True)
    for i in range(len(data)):
        item = data[i]
        write_video(os.path.join(ns.out, f"{i:03d}.mp4"), item["hr"], ns.fps)
        with open(os.path.join(ns.out, f"{i:03d}.json"), "w") as f:
            f.write(item["storyboard"].to_json())
    print(f"{ns.out}: {len(data)} videos of {frames} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
