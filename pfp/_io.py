"""File writing shared by the pfp layer: nothing half-written is ever left at the target path."""
from __future__ import annotations

import os
import tempfile


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
