"""Grow a trained TinyDiT deeper without changing what it computes.

Each new block starts as the identity: the output projections of its self-attention, its text
cross-attention and its MLP are zero, so the residual stream passes through it unchanged and the
grown model predicts exactly what the trained one did. Their inputs are not zero, so those
projections receive gradients from the first step and the new blocks start learning at once.
``recipes/default_weights/grow_tiny_dit.py`` is the command the built-in weights' stage 17 used.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from pfp._io import atomic_target
from pfp.weights import DEFAULT_WEIGHTS, PFPConfig, PFPModel, build_model, load_state_checked, read_weights, save_weights


def grow_tiny_dit(weights: Optional[str], depth: int) -> tuple[PFPModel, PFPConfig]:
    """The model of a tiny-DiT weights file (default: the built-in one) with ``depth`` blocks, the
    new ones appended as the identity; returns (model, its config)."""
    tensors, cfg = read_weights(weights or DEFAULT_WEIGHTS)
    if cfg is None or cfg.dit.get("kind") != "tiny":
        raise ValueError("weights must be a pfp weights file of a tiny-DiT config")
    old_depth = int(cfg.dit.get("depth", 4))
    if depth <= old_depth:
        raise ValueError(f"depth must exceed the weights' depth {old_depth}, got {depth}")
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
    return model, grown


def grow_weights(weights: Optional[str], depth: int, out: str) -> tuple[str, str]:
    """Write the grown model as ``out.safetensors`` and its config as ``out_config.json`` (ready
    for ``pfp.train finetune --config ... --init ...``); returns their paths."""
    model, grown = grow_tiny_dit(weights, depth)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weights_path, config_path = out + ".safetensors", out + "_config.json"
    save_weights(model, weights_path)
    with atomic_target(config_path) as tmp, open(tmp, "w") as f:   # never a partial config beside the weights
        json.dump({"config": grown.to_dict()}, f, indent=1)
    return weights_path, config_path


__all__ = ["grow_tiny_dit", "grow_weights"]
