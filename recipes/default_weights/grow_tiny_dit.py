"""Grow a trained TinyDiT deeper without changing what it computes (:mod:`pfp.grow`).

``python recipes/default_weights/grow_tiny_dit.py --depth 8 --out runs/grown8`` reads the built-in weights (or
``--weights``), appends blocks until the backbone has ``--depth`` of them, and writes
``runs/grown8.safetensors`` and ``runs/grown8_config.json``, ready for ``python -m pfp.train
finetune --config runs/grown8_config.json --init runs/grown8.safetensors``. The built-in weights'
stage 17 was grown this way.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    from pfp.grow import grow_weights
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default: the built-in weights")
    p.add_argument("--depth", type=int, required=True, help="blocks of the grown backbone")
    p.add_argument("--out", required=True, help="path prefix of the grown weights and config")
    a = p.parse_args(argv)
    for path in grow_weights(a.weights, a.depth, a.out):
        print(path)


if __name__ == "__main__":
    main()
