"""The starting weights of every Table 1 variant: the built-in tiny model's first ``--depth``
backbone blocks, with everything else it has.

Every variant starts from this same file with ``--init-skip compressor.``, which leaves each
variant's compressor freshly initialised, so the rows differ only in the compressor. The built-in weights were trained on the
synthetic scenes of :mod:`pfp.data`, never on real video.
"""
from __future__ import annotations

import argparse
import re
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--depth", type=int, default=4, help="backbone blocks kept (default %(default)s)")
    ns = p.parse_args(argv)
    from safetensors.torch import save_file

    from pfp.weights import DEFAULT_WEIGHTS, read_weights
    tensors, _ = read_weights(DEFAULT_WEIGHTS)
    block = re.compile(r"^backbone\.blocks\.(\d+)\.")
    kept = {k: v.contiguous() for k, v in tensors.items()
            if not ((m := block.match(k)) and int(m.group(1)) >= ns.depth)}
    save_file(kept, ns.out)
    print(f"{ns.out}: {len(kept)} of {len(tensors)} tensors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
