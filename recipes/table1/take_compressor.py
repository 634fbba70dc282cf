"""One checkpoint from two: the compressor of a frame-retrieval pretraining run over the backbone
and text encoder of another file, e.g. the built-in model's.

This is how the paper hands a pretrained compressor to the finetune: only the compressor carries
over, and the backbone it finetunes with is the base model's, not the one the pretraining adapted.

    python recipes/table1/take_compressor.py --base pfp/weights/default.safetensors \\
        --compressor runs/pre.safetensors --out runs/base_with_pretrained_compressor.safetensors

The output has the compressor file's config (its kind and rate) and all its compressors (with
``mix_compressors``, the mixed ones too); both files must hold the same
backbone and text encoder tensors (names and shapes). Written through a temporary file, so an
interrupted run leaves no partial output; bad input gets one line and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys


def _fail(message: str):
    """Bad input: one line on stderr, exit status 2 (argparse's), before anything is written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(path: str, flag: str):
    from safetensors import safe_open
    if not os.path.isfile(path):
        _fail(f"{flag} {path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:   # safetensors raises its own error types
        _fail(f"{flag} {path} is not a safetensors file ({exc})")
    if "config" not in meta:
        _fail(f"{flag} {path} has no pfp config in its metadata (not a pfp checkpoint)")
    return meta, tensors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="checkpoint whose backbone and text encoder are kept")
    p.add_argument("--compressor", required=True, help="checkpoint whose compressor (and config) is taken")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    ns = p.parse_args(argv)
    from pfp._cli import UsageError, check_output_file
    from pfp._io import describe_mismatch, save_safetensors_atomic, state_mismatch
    try:
        check_output_file("--out", ns.out, (".safetensors",), create_dirs=True)
    except UsageError as exc:
        _fail(str(exc))
    base_meta, base = _load(ns.base, "--base")
    comp_meta, comp = _load(ns.compressor, "--compressor")
    # every compressor: the main one, and those a config's mix_compressors adds (mix.N.*)
    compressors = ("compressor.", "mix.")
    taken = {k: v for k, v in comp.items() if k.startswith(compressors)}
    if not taken:
        _fail(f"--compressor {ns.compressor} holds no compressor.* tensors")
    kept = {k: v for k, v in base.items() if not k.startswith(compressors)}
    if not kept:
        _fail(f"--base {ns.base} holds only compressor.* tensors: no backbone to keep")
    others = {k: v for k, v in comp.items() if not k.startswith(compressors)}
    mismatch = state_mismatch(kept, others)
    if any(mismatch):
        _fail(f"--base and --compressor hold different backbones (--compressor's file as a checkpoint of "
              f"--base's model: {describe_mismatch(*mismatch)}); the compressor must come from a run on it")
    # the compressor is stored as the base stores its own (e.g. bf16 when the base is a bf16 export);
    # only floating-point tensors change dtype
    floats = [v.dtype for v in kept.values() if v.is_floating_point()]
    base_float = max(set(floats), key=floats.count) if floats else None

    def as_base(name, t):
        if not t.is_floating_point():
            return t
        want = base[name].dtype if name in base and base[name].is_floating_point() else base_float
        return t.to(want) if want is not None else t
    out = {**kept, **{k: as_base(k, v) for k, v in taken.items()}}
    # the base's "trained_with" would describe a run that made neither half of this file
    meta = {k: v for k, v in base_meta.items() if k != "trained_with"}
    meta["config"] = comp_meta["config"]
    # which compressors the weights were saved from: --compressor's (files from before this was
    # recorded have none, and none is then claimed)
    meta.pop("compressors", None)
    if "compressors" in comp_meta:
        meta["compressors"] = comp_meta["compressors"]
    save_safetensors_atomic(out, ns.out, meta)
    print(f"{ns.out}: {len(taken)} compressor tensors from {ns.compressor}, {len(kept)} from {ns.base}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
