"""Training checkpoints with exact resume: model, optimizer, step and RNG states, in safetensors.

A checkpoint is a directory:

- ``model.safetensors``: every parameter and buffer of the trained module (LoRA adapters included);
- ``optimizer.safetensors``: the optimizer's per-parameter state tensors, keyed
  ``"<param index or name>/<state>"`` (e.g. ``"12/exp_avg"``), plus the torch CPU/CUDA RNG states;
- ``state.json``: step, the run's arguments and model config, the optimizer's param groups and
  scalar state, and the Python and NumPy RNG states.

It is written to a temporary directory beside it and renamed into place, so a checkpoint is
either complete or absent.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(path: str, model_state: dict, optimizer, step: int,
                    extra: Optional[dict] = None) -> None:
    """Write a checkpoint directory at ``path`` (replacing an older one atomically).

    optimizer: an Optimizer, or an already gathered optimizer state dict (FSDP: keyed by names)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                  os.path.join(tmp, "model.safetensors"))
        opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in opt["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{pid}/{name}"] = val.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}/{name}"] = val
        rng_tensors, rng_meta = _rng_state()
        tensors.update(rng_tensors)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": int(step), "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
                 "rng": rng_meta, **(extra or {})}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
        old = path + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_optimizer_state(path: str) -> dict:
    """The optimizer state dict stored in a checkpoint (parameter keys as they were saved)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    per_param: dict = {}
    for key, val in tensors.items():
        if key.startswith("rng."):
            continue
        pid, name = key.rsplit("/", 1)
        per_param.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = val
    for key, val in state["optimizer_scalars"].items():
        pid, name = key.rsplit("/", 1)
        per_param.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = val
    return {"state": per_param, "param_groups": state["param_groups"]}


def load_checkpoint(path: str, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> tuple[dict, dict]:
    """Read a checkpoint: returns (model tensors, state dict); loads the optimizer and RNG states."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise ValueError(f"{path} is not a training checkpoint (no state.json)")
    model_state = load_file(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(path))
    if restore_rng:
        _set_rng_state(tensors, state["rng"])
    return model_state, state


__all__ = ["save_checkpoint", "load_checkpoint", "read_optimizer_state"]
