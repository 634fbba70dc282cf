"""File writing shared by the pfp layer: nothing half-written is ever left at the target path."""
from __future__ import annotations

import os
import tempfile


def chmod_like_open(path: str) -> None:
    """mkstemp makes files 0600; give ``path`` the mode a plain open() would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_safetensors_atomic(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` to ``path`` as safetensors via a temporary file in the same folder and an
    atomic rename, so an interrupted save leaves neither a partial file nor a stale temp file."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        chmod_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def state_mismatch(expected: dict, found: dict) -> tuple[list, list, list]:
    """Compare a checkpoint's tensors (``found``) with the state a model expects.

    Returns ``(missing, unexpected, wrong)``: sorted names absent from the checkpoint, sorted
    names the model does not have, and ``(name, checkpoint_shape, model_shape)`` for the shared
    names whose shapes differ. Callers word the error; all three empty means the checkpoint fits.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, tuple(found[k].shape), tuple(expected[k].shape))
             for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, wrong
