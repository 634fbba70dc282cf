"""Crash-safe training checkpoints with exact resume: model, optimizer, step and RNG states.

A run folder ``OUT`` keeps its checkpoints under ``OUT/checkpoints/``::

    checkpoints/step-00000120/   model.safetensors      every saved parameter and buffer (LoRA included)
                                 optimizer.safetensors  per-parameter optimizer tensors ("12/exp_avg"),
                                                        plus the torch CPU/CUDA RNG states
                                 state.json             step, run arguments, config, param groups,
                                                        optimizer scalars, Python/NumPy RNG states
                                 manifest.json          step, and the size and SHA-256 of each file above
    checkpoints/.tmp-ckpt-*      a save that had not finished (removed by :func:`recover`)
    checkpoints/.trash-*         an old checkpoint being deleted (removed by :func:`recover`)

A save is a sequence of single filesystem operations (:data:`_after_op` marks each one), so a kill
at any instant leaves one of a few states, all of which :func:`recover` resolves:

1. a temporary folder ``.tmp-ckpt-*`` is made, the three data files are written and fsynced into it,
   then ``manifest.json`` last: a folder without a manifest that verifies is not a checkpoint;
2. the folder is fsynced and renamed to ``step-N`` in one atomic rename (a stale folder already
   holding that name is first moved to the trash);
3. checkpoints beyond the newest ``keep`` are each renamed into the trash, then deleted.

The newest complete checkpoint is the highest ``step-N`` whose manifest verifies: every file's size
and checksum. Nothing that verifies is ever deleted except by step 3, and only after a newer one is
in place. Run folders written before manifests existed (``OUT/checkpoint``, and the
``OUT/checkpoint.old`` a kill could leave) are read too, checked by parsing their files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pfp._cli import UsageError
from pfp._io import fsync_path as _fsync

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "pfp-checkpoint/1"
DATA_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
LEGACY_DIRS = ("checkpoint", "checkpoint.old")  # the layout before manifests (one folder, renamed aside)
_STEP_DIR = re.compile(r"step-(\d+)$")
_TEMP_PREFIX, _TRASH_PREFIX = ".tmp-ckpt-", ".trash-"


class CheckpointError(UsageError):
    """A checkpoint that is incomplete or damaged; the message is one line naming the folder."""


def _after_op(op: str, path: str) -> None:
    """Called after every filesystem operation of a save (a no-op). The fault tests replace it to
    stop a save at each point in turn, as a kill -9 would, and check what :func:`recover` makes of
    the folder left behind."""


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _step_of(name: str) -> Optional[int]:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _trash(path: str, root: str) -> None:
    """Delete a folder by first renaming it into a trash folder under ``root`` (one atomic step, so
    a kill mid-delete never leaves a half-deleted folder under a checkpoint's name, and
    :func:`recover` finds the rest there), then removing it."""
    trash = tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=root)
    target = os.path.join(trash, os.path.basename(path))
    os.rename(path, target)
    _after_op("trash", path)
    shutil.rmtree(trash)
    _after_op("rmtree", trash)


def _write_data_files(folder: str, model_state: dict, optimizer, step: int, extra: Optional[dict]) -> None:
    def written(name):
        path = os.path.join(folder, name)
        _after_op("write", path)
        _fsync(path)
        _after_op("fsync", path)

    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
              os.path.join(folder, "model.safetensors"))
    written("model.safetensors")
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
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    written("optimizer.safetensors")
    state = {"step": int(step), "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
             "rng": rng_meta, **(extra or {})}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)
    written("state.json")


def save_checkpoint(run_dir: str, model_state: dict, optimizer, step: int, extra: Optional[dict] = None,
                    keep: int = 2) -> str:
    """Write the checkpoint of ``step`` as ``run_dir/checkpoints/step-N`` and return its path.

    optimizer: an Optimizer, or an already gathered optimizer state dict (FSDP: keyed by names).
    keep: how many checkpoints to keep (>= 1): older ones are deleted once this one is in place.
    The sequence is crash-safe at every instant (module docstring)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    root = os.path.join(os.path.abspath(run_dir), CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=root)
    _after_op("mkdtemp", tmp)
    try:
        _write_data_files(tmp, model_state, optimizer, step, extra)
        manifest = {"format": FORMAT, "step": int(step),
                    "files": {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                                     "sha256": _sha256(os.path.join(tmp, name))} for name in DATA_FILES}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f)
        _after_op("write", os.path.join(tmp, MANIFEST))
        _fsync(os.path.join(tmp, MANIFEST))
        _fsync(tmp)
        _after_op("fsync", tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk; a kill leaves it to recover()
        raise
    final = os.path.join(root, step_dir_name(step))
    if os.path.lexists(final):
        # a folder of the same step from an abandoned future of this run (resumed from an older
        # checkpoint because this one did not verify): the new one replaces it
        _trash(final, root)
    os.rename(tmp, final)
    _after_op("rename", final)
    _fsync(root)
    _after_op("fsync", root)
    older = [(s, p) for s, p in _candidates(run_dir) if s < step]
    for _, path in sorted(older, reverse=True)[keep - 1:]:
        _trash(path, root)
    return final


# ------------------------------------------------------------------------------------------------
# finding, checking and loading
# ------------------------------------------------------------------------------------------------
def _legacy_step(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, "state.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _candidates(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every folder that claims to be a checkpoint of the run, unverified."""
    found = []
    root = os.path.join(run_dir, CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            step = _step_of(name)
            if step is not None and os.path.isdir(os.path.join(root, name)):
                found.append((step, os.path.join(root, name)))
    for name in LEGACY_DIRS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            step = _legacy_step(path)
            found.append((-1 if step is None else step, path))
    return found


def verify_checkpoint(path: str) -> int:
    """Check a checkpoint folder and return its step; :class:`CheckpointError` (one line) otherwise.

    With a manifest: every file's size and SHA-256. Without one (the layout before manifests): the
    state must parse and both safetensors files must open."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is not a folder")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        if not os.path.isfile(os.path.join(path, "state.json")):
            raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (not a pfp.train checkpoint)")
        return _verify_legacy(path)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files, step = manifest["files"], int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from None
    for name, want in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, its manifest "
                                  f"says {want['bytes']}")
        if _sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its checksum")
    return step


def _verify_legacy(path: str) -> int:
    from safetensors import safe_open
    step = _legacy_step(path)
    if step is None:
        raise CheckpointError(f"checkpoint {path} is damaged: state.json is unreadable")
    for name in DATA_FILES[:2]:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign file
            raise CheckpointError(f"checkpoint {path} is damaged: {name} cannot be read "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return step


def _newest_verified(run_dir: str, notes: Optional[list] = None) -> Optional[str]:
    """The newest checkpoint folder of a run that verifies (None if none does); each one skipped
    on the way is noted in ``notes``."""
    for _, path in sorted(_candidates(run_dir), reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            if notes is not None:
                notes.append(f"skipped {exc}")
            continue
        return path
    return None


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint of a run folder that verifies, or None. Changes nothing on disk."""
    return _newest_verified(run_dir)


def recover(run_dir: str) -> tuple[Optional[str], list[str]]:
    """Tidy a run folder after a crash and find where to resume.

    Removes what an unfinished save or delete left (``.tmp-ckpt-*``, ``.trash-*``); keeps every
    folder that claims to be a checkpoint, complete or not. Returns ``(newest complete checkpoint
    or None, one-line notes on what was removed or found damaged)``."""
    notes = []
    root = os.path.join(run_dir, CHECKPOINTS)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                notes.append(f"removed {name} (an unfinished save or delete)")
    return _newest_verified(run_dir, notes), notes


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (its newest complete checkpoint), verified;
    :class:`CheckpointError` naming what is wrong otherwise."""
    if os.path.isdir(os.path.join(path, CHECKPOINTS)) or any(
            os.path.isdir(os.path.join(path, d)) for d in LEGACY_DIRS):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} is a training run folder with no complete checkpoint")
        return found
    verify_checkpoint(path)
    return path


def read_state(path: str) -> dict:
    """``state.json`` of a checkpoint folder (step, args, config, ...)."""
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def read_optimizer_state(path: str) -> dict:
    """The optimizer state dict stored in a checkpoint (parameter keys as they were saved)."""
    state = read_state(path)
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
                    restore_rng: bool = True, verify: bool = True) -> tuple[dict, dict]:
    """Read a checkpoint folder: returns (model tensors, state dict); loads the optimizer and RNG
    states if asked. ``verify``: check it first (:func:`verify_checkpoint`)."""
    if verify:
        verify_checkpoint(path)
    model_state = load_file(os.path.join(path, "model.safetensors"))
    state = read_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(path))
    if restore_rng:
        restore_rng_state(path, state)
    return model_state, state


def restore_rng_state(path: str, state: Optional[dict] = None) -> None:
    """Set the torch, Python and NumPy RNGs to what they were when the checkpoint was saved."""
    state = read_state(path) if state is None else state
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    _set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])


__all__ = ["save_checkpoint", "load_checkpoint", "read_optimizer_state", "read_state", "latest_checkpoint",
           "recover", "resolve_checkpoint", "verify_checkpoint", "restore_rng_state", "CheckpointError",
           "CHECKPOINTS"]
