"""The caption-only reference for Table 2's consistency: ``pfp.eval consistency`` with the
compressor's context emptied, so every chunk sees its prompt and no memory of the video.

    python recipes/table1/consistency_without_memory.py --videos DIR CKPT [CKPT ...]

Same arguments and JSON rows as ``python -m pfp.eval consistency`` (history 2 s, 6 s, 16 steps,
seed 0 by default). The given history still decodes into the first frames; only the backbone's
context is empty. The gap between a checkpoint's score and this one is what its memory adds.
This is a diagnostic: it replaces the compressor stream's outputs for the whole process.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--videos", required=True)
    p.add_argument("--history-seconds", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    import pfp.compressor as comp
    from pfp.eval import consistency_table

    def no_tokens(stream):
        return comp._empty_context(stream.batch_size, stream.compressor.inner_dim, stream._dtype, stream._device)

    append = comp.CompressorStream.append

    def append_nothing(self, hr_chunk, lr_chunk):
        append(self, hr_chunk, lr_chunk)   # the stream still runs (its checks and state), its tokens are dropped
        return no_tokens(self)

    comp.CompressorStream.append = append_nothing
    comp.CompressorStream.context = property(no_tokens)
    for row in consistency_table(ns.checkpoints, ns.videos, history_seconds=ns.history_seconds, seconds=ns.seconds,
                                 steps=ns.steps, seed=ns.seed):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
