"""Weights files of a PFP model: safetensors that carry the model's config as metadata.

:func:`save_weights` / :func:`load_weights` write and read them; ``default.safetensors`` beside
this file is the built-in tiny model trained on the synthetic scenes (``default.json`` is its
config and the commands that made it). The config lives in :mod:`pfp.config` and the model in
:mod:`pfp.model`; both are importable from here too.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .._io import describe_mismatch, save_safetensors_atomic, state_mismatch
from ..config import COMPONENT_KINDS, PFPConfig, check_component, format_compressor_signature
from ..model import PFPModel, build_model

WEIGHTS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "default.safetensors")
DEFAULT_CONFIG = os.path.join(WEIGHTS_DIR, "default.json")
FORMAT = "pfp.PFPModel/1"
COMPRESSORS_KEY = "compressors"   # metadata: built_compressor_signature() of the saved model


def save_weights(model: PFPModel, path: str, dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None) -> None:
    """Write the model's weights (optionally cast, e.g. to bf16) with its config as metadata."""
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.trainable_state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()),
            COMPRESSORS_KEY: json.dumps(built_compressor_signature(model))}
    if extra:
        meta.update({k: json.dumps(v) for k, v in extra.items()})
    save_safetensors_atomic(state, path, meta)


def built_compressor_signature(model: PFPModel) -> str:
    """:meth:`PFPConfig.compressor_signature` as the model's compressor modules were built (their
    kind, rate and low-res phase), not as its config says: :func:`save_weights` records it beside
    the config, so a file whose config metadata was changed afterwards is caught on loading."""
    comps = model.compressors
    return format_compressor_signature([(c.kind, c.rate) for c in comps], comps[0].lr_phase)


def read_weights(path: str) -> tuple[dict, Optional[PFPConfig]]:
    """(tensors, config or None) of a :func:`save_weights` file. ValueError when its config's
    compressors differ from those its weights were saved from (files since 2026-12-08 record them)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    cfg = None
    if "config" in meta:
        try:
            cfg = PFPConfig.from_dict(json.loads(meta["config"]))
        except (TypeError, ValueError) as exc:  # truncated or hand-edited metadata
            raise ValueError(f"checkpoint {path}: its config metadata is not a valid config "
                             f"({str(exc).splitlines()[0]})") from None
    if cfg is not None and COMPRESSORS_KEY in meta:
        try:
            built = json.loads(meta[COMPRESSORS_KEY])
        except ValueError:
            built = meta[COMPRESSORS_KEY]
        if built != cfg.compressor_signature():
            raise ValueError(f"checkpoint {path}: its weights were saved from compressors {built} but its config "
                             f"metadata says {cfg.compressor_signature()}; the metadata was changed after the "
                             f"file was written")
    return tensors, cfg


def load_state_checked(model: PFPModel, tensors: dict, source: str) -> None:
    """Copy tensors into the model; ValueError naming every missing / unexpected / misshapen tensor,
    or the first one whose values cannot be weights: a floating-point tensor of the model given as
    integers or bools, or holding NaN/Inf (a diverged run's weights would only make black video)."""
    own = model.trainable_state_dict()
    missing, unexpected, mismatched = state_mismatch(own, tensors)
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {source} is from another config; tensors that do not fit: "
                         + describe_mismatch(missing, unexpected, mismatched))
    for k, v in tensors.items():
        if not own[k].is_floating_point():
            continue
        if not v.is_floating_point():
            raise ValueError(f"checkpoint {source}: tensor {k} has dtype {str(v.dtype).replace('torch.', '')}; "
                             f"weights must be floating point (float32, bfloat16 or float16)")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"checkpoint {source}: tensor {k} holds NaN or Inf values")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def load_weights(path: Optional[str] = None, config: Optional[PFPConfig] = None,
                 context_mode: Optional[str] = None) -> PFPModel:
    """Build the model a weights file describes (or ``config``) and load it. Default: the built-in model.

    ``context_mode`` must match the mode the weights were trained in (recorded in the file); a
    different one raises, since the two modes need their own training.
    """
    path = path or DEFAULT_WEIGHTS
    tensors, file_cfg = read_weights(path)
    cfg = config or file_cfg
    if cfg is None:
        raise ValueError(f"checkpoint {path} carries no config; pass config=")
    if context_mode is not None and context_mode != cfg.context_mode:
        raise ValueError(f"--context-mode {context_mode}: checkpoint {path} was trained with context_mode="
                         f"{cfg.context_mode!r}, and each mode needs weights trained in it")
    if file_cfg is not None and file_cfg.compressor_signature() != cfg.compressor_signature():
        # before any model is built (a preset's is billions of parameters). Tensors that fit would
        # not be enough: pfp and without_lr weights have the same ones, and those of another rate
        # or low-res phase always do, to be read at other strides
        raise ValueError(f"checkpoint {path} holds compressors for {file_cfg.compressor_signature()} but the config "
                         f"asks for {cfg.compressor_signature()}; use the file's own config or one that matches")
    model = build_model(cfg)
    load_state_checked(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, path)
    return model.eval()


__all__ = ["PFPConfig", "PFPModel", "build_model", "check_component", "COMPONENT_KINDS", "save_weights", "read_weights", "load_weights",
           "built_compressor_signature",
           "load_state_checked", "DEFAULT_WEIGHTS", "DEFAULT_CONFIG"]
