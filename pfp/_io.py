"""File writing shared by the pfp layer: nothing half-written is ever left at the target path."""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile


def fsync_path(path) -> None:
    """Flush a file or folder to disk (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path) -> str:
    """Temporary files of ``path`` are named ``.<name>.<host>.<pid>.tmp-*`` beside it, so a later
    writer of the same path can tell which ones a killed process left behind."""
    return f".{os.path.basename(os.fspath(path))}.{socket.gethostname()}.{os.getpid()}.tmp-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path) -> list:
    """Remove the temporary files of ``path`` that a killed writer left (same host, process gone);
    returns their names. Files of live processes and of other hosts are kept."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    head = f".{os.path.basename(os.fspath(path))}.{socket.gethostname()}."
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(head):
            continue
        pid = name[len(head):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def atomic_target(path, suffix: str = ""):
    """Yield a temporary path beside ``path`` to write to; when the block finishes, the file gets
    the mode a plain open() would give it (0666 less the umask; mkstemp makes 0600), is flushed to
    disk and renamed over ``path`` in one step. If the block raises, the temporary file is removed;
    one that a kill -9 left is removed by the next write of the same path
    (:func:`remove_stale_temps`). So neither a partial file nor, for long, a stale one is left."""
    remove_stale_temps(path)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fsync_path(tmp)
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
