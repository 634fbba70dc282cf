"""File writing shared by the pfp layer: nothing half-written is ever left at the target path."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_target(path, suffix: str = ""):
    """Yield a temporary path beside ``path`` to write to; when the block finishes, the file gets
    the mode a plain open() would give it (0666 less the umask; mkstemp makes 0600) and is renamed
    over ``path`` in one step. If the block raises, the temporary file is removed, so neither a
    partial file nor a stale temporary one is left behind."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors_atomic(tensors: dict, path, metadata: dict) -> None:
    """Write ``tensors`` to ``path`` as safetensors through :func:`atomic_target` (creating the
    folder if needed)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_target(path, ".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)


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


def describe_mismatch(missing: list, unexpected: list, wrong: list, show: int = 4) -> str:
    """One line naming what :func:`state_mismatch` found (at most ``show`` names per kind), e.g.
    ``1 with other shapes: w (checkpoint (8, 4), model (8, 5)); 2 missing from the checkpoint: a, b``."""
    def few(names):
        return ", ".join(names[:show]) + (f", ... (+{len(names) - show} more)" if len(names) > show else "")
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} with other shapes: "
                     + few(sorted(f"{k} (checkpoint {have}, model {want})" for k, have, want in wrong)))
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the checkpoint: {few(unexpected)}")
    return "; ".join(parts)
