"""Grow a trained TinyDiT deeper without changing what it computes.

``python benchmarks/grow_tiny_dit.py --depth 8 --out runs/grown8`` reads the built-in weights (or
``--weights``), appends blocks until the backbone has ``--depth`` of them, and writes
``runs/grown8.safetensors`` and ``runs/grown8_config.json``, ready for ``python -m pfp.train
finetune --config runs/grown8_config.json --init runs/grown8.safetensors``.

Each new block starts as the identity: the output projections of its self-attention, its text
cross-attention and its MLP are zero, so the residual stream passes through it unchanged and the
grown model predicts exactly what the trained one did. Their inputs are not zero, so those
projections receive gradients from the first step and the new blocks start learning at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def grow(weights: str | None, depth: int, out: str) -> tuple[str, str]:
    """Write ``out.safetensors`` and ``out_config.json``; returns their paths."""
    from pfp.weights import PFPConfig, build_model, load_state_checked, read_weights, save_weights

    tensors, cfg = read_weights(weights or os.path.join(ROOT, "pfp", "weights", "default.safetensors"))
    if cfg is None or cfg.dit.get("kind") != "tiny":
        raise ValueError("--weights must be a pfp weights file of a tiny-DiT config")
    old_depth = int(cfg.dit.get("depth", 4))
    if depth <= old_depth:
        raise ValueError(f"--depth must exceed the weights' depth {old_depth}, got {depth}")
    grown = PFPConfig.from_dict({**cfg.to_dict(), "dit": {**cfg.dit, "depth": depth}})
    model = build_model(grown)
    own = model.trainable_state_dict()
    new = {k: v for k, v in own.items() if k not in tensors}
    load_state_checked(model, {**tensors, **{k: v.clone() for k, v in new.items()}}, "grown model")
    with torch.no_grad():
        for block in model.backbone.blocks[old_depth:]:
            for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn[2]):
                layer.weight.zero_()
                layer.bias.zero_()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weights_path, config_path = out + ".safetensors", out + "_config.json"
    save_weights(model, weights_path)
    with open(config_path, "w") as f:
        json.dump({"config": grown.to_dict()}, f, indent=1)
    return weights_path, config_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default: the built-in weights")
    p.add_argument("--depth", type=int, required=True, help="blocks of the grown backbone")
    p.add_argument("--out", required=True, help="path prefix of the grown weights and config")
    a = p.parse_args(argv)
    for path in grow(a.weights, a.depth, a.out):
        print(path)


if __name__ == "__main__":
    main()
