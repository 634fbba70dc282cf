"""Measured choice for ``impl="auto"``: the fastest implementation for a device, dtype and shape.

An op's static order (``Op.auto_order``) says which implementation usually wins; which one wins for
*these* shapes on *this* device is a measurement. ``auto`` answers from a table keyed by

    (op, device name, dtype, mode, shape bucket)

where mode is ``"fwd"`` or ``"fwd+bwd"`` (inputs that require grad, grad enabled: the backward is
timed too, since backends share the forward's choice) and the bucket is the op's own tuple of sizes
with the long axes rounded up to a power of two. Three sources, first hit wins:

1. entries measured in this process, and the user's cache file (``$PFP_KERNELS_CACHE``, default
   ``$XDG_CACHE_HOME/pfp_kernels/tuning.json`` or ``~/.cache/...``), written after each measurement;
2. the table shipped with the package (``pfp_kernels/tuning_table.json``): entries measured on named
   cards, each naming the benchmark results it comes from;
3. on a miss, the candidates that can run are timed on the call's own inputs (interleaved rounds,
   the minimum per candidate) and the winner is recorded in 1. A winner other than the static
   order's first candidate is timed against it once more and kept only if it wins again.
   ``PFP_KERNELS_AUTOTUNE=0`` turns timing off; then a miss takes the static order.

A cached entry records the software it was measured under (torch, pfp_kernels, and triton where
installed). After an upgrade of any of them the entry is stale: the next call of its key times the
candidates again (where timing is on) and replaces it, since a new kernel or a new torch can change
the winner. With timing off a stale entry still serves. Shipped entries are never stale: they
name the run they come from, and a user's own measurement replaces them.

Nothing is timed on meta or fake tensors or during CUDA graph capture; those calls take the table
or the static order. While torch.compile traces, the table is not read either (reading it may touch
the cache file, which a fullgraph trace cannot take): a compiled call runs the static order's
first implementation that can run, which an eager call of the same key may not. ``python -m
pfp_kernels.info --tune`` shows the table and re-measures the ops' standard shapes.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

FORMAT = 1
SHIPPED_TABLE = Path(__file__).with_name("tuning_table.json")
AUTOTUNE_ENV = "PFP_KERNELS_AUTOTUNE"
CACHE_ENV = "PFP_KERNELS_CACHE"

Key = tuple  # (op, device, dtype, mode, bucket tuple)


@dataclass
class TuneCall:
    """What an op's API hands ``Op.choose`` so that ``auto`` can look up or time a choice.

    bucket: the op's shape key (ints and strings; long axes already rounded by :func:`pow2`).
    run: ``run(impl)`` calls the op with that implementation on the call's inputs and returns its
        output (a tensor or a tuple whose first item is the tensor the backward starts from).
    grad_inputs: the inputs that require grad; non-empty with grad enabled means mode "fwd+bwd".
    """

    bucket: tuple
    run: Callable[[str], object]
    grad_inputs: tuple = ()


def pow2(n: int) -> int:
    """n rounded up to a power of two (0 stays 0): the bucket of a long axis."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off", "")


def cache_path() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pfp_kernels" / "tuning.json"


# ----------------------------------------------------------------------------------------------
# device names
# ----------------------------------------------------------------------------------------------
_DEVICE_NAMES: dict = {}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The card's name on CUDA (``torch.cuda.get_device_name``); on CPU the model, the ISA torch
    uses, the thread count and the ISA of our C++ kernels as loaded (``PFP_CPU_ISA`` can lower
    it, ``PFP_DISABLE_CPP`` turn them off), since all four change which kernel wins."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index)
        if key not in _DEVICE_NAMES:
            _DEVICE_NAMES[key] = torch.cuda.get_device_name(index)
        return _DEVICE_NAMES[key]
    if device.type == "cpu":
        threads = torch.get_num_threads()
        key = ("cpu", threads)
        if key not in _DEVICE_NAMES:
            from . import _extension
            _DEVICE_NAMES[key] = (f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
                                  f"{threads} threads, pfp C++ {_extension.ISA or 'off'}")
        return _DEVICE_NAMES[key]
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_SOFTWARE: list = []


def software() -> str:
    """The versions a measurement depends on: torch, pfp_kernels and (where installed) triton."""
    if not _SOFTWARE:
        from importlib import metadata
        from . import __version__
        parts = [f"torch {torch.__version__}", f"pfp_kernels {__version__}"]
        try:
            parts.append(f"triton {metadata.version('triton')}")
        except metadata.PackageNotFoundError:
            pass
        _SOFTWARE.append(", ".join(parts))
    return _SOFTWARE[0]


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    op: str
    device: str
    dtype: str
    mode: str
    bucket: tuple
    impl: str
    ms: dict          # candidate -> measured ms per call (the failed ones: absent)
    source: str       # "measured <date>" or the results file a shipped entry comes from
    software: str = field(default_factory=software)  # what it was measured under ("" in old caches)

    @property
    def key(self) -> Key:
        return (self.op, self.device, self.dtype, self.mode, self.bucket)

    def to_json(self) -> dict:
        return {"op": self.op, "device": self.device, "dtype": self.dtype, "mode": self.mode,
                "bucket": list(self.bucket), "impl": self.impl,
                "ms": {k: round(v, 5) for k, v in self.ms.items()}, "source": self.source,
                "software": self.software}

    @staticmethod
    def from_json(d: dict) -> "Entry":
        bucket = tuple(d["bucket"])
        if not all(isinstance(v, (int, str)) for v in bucket):
            raise ValueError(f"bucket {d['bucket']!r} holds other than ints and strings")
        return Entry(str(d["op"]), str(d["device"]), str(d["dtype"]), str(d["mode"]),
                     bucket, str(d["impl"]), {str(k): float(v) for k, v in d.get("ms", {}).items()},
                     str(d.get("source", "")), str(d.get("software", "")))


def _read_table(path: Path, what: str) -> dict:
    """key -> Entry from a table file; a missing or empty file (``mktemp``'s) is an empty table, an
    unreadable one is warned about once and ignored (auto then measures again or takes the static
    order)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        _warn_once(f"pfp_kernels: cannot read the {what} {path} ({exc}); ignoring it")
        return {}
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return {e.key: e for e in (Entry.from_json(d) for d in data["entries"])}
    except Exception as exc:  # noqa: BLE001 - any malformed content is ignored the same way
        _warn_once(f"pfp_kernels: ignoring the {what} {path}: not a tuning table ({exc})")
        return {}


_WARNED: set = set()


def _warn_once(message: str) -> None:
    """A warning about a table file, once per process (a cache that cannot be read or written
    would otherwise warn at every measurement)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s sidecar ``.lock`` file (where fcntl exists), so that two
    processes (torchrun ranks, data workers) merging into one cache file do not drop each other's
    entries."""
    try:
        import fcntl
    except ImportError:   # no flock (Windows): the whole-file replace still never tears a file
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_table(path: Path, entries: Iterable[Entry]) -> None:
    """Whole-file replace (temp file + rename), so a reader or a kill never sees half a table. The
    folder exists (the caller made it, for its lock file)."""
    rows = [json.dumps(e.to_json()) for e in sorted(entries, key=lambda e: repr(e.key))]
    text = f'{{"format": {FORMAT}, "entries": [\n' + ",\n".join(rows) + "\n]}\n"  # one entry per line
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Table:
    """The shipped entries plus this process's and the cache file's (which take precedence)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loaded = False
        self.shipped: dict = {}
        self.local: dict = {}

    def load(self) -> None:
        with self._lock:
            if not self._loaded:
                self.shipped = _read_table(SHIPPED_TABLE, "shipped tuning table")
                self.local = _read_table(cache_path(), "tuning cache")
                self._loaded = True

    def get(self, key: Key) -> Optional[Entry]:
        if not self._loaded:
            self.load()
        return self.local.get(key) or self.shipped.get(key)

    def put(self, entry: Entry, save: bool = True) -> None:
        """Record a measurement; with ``save``, merge it into the cache file (entries other
        processes wrote meanwhile are kept)."""
        if not self._loaded:
            self.load()
        with self._lock:
            self.local[entry.key] = entry
            if not save:
                return
            path = cache_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with _locked(path):
                    merged = _read_table(path, "tuning cache")
                    merged[entry.key] = entry
                    _write_table(path, merged.values())
            except OSError as exc:
                _warn_once(f"pfp_kernels: cannot write the tuning cache {path} ({type(exc).__name__}: "
                           f"{exc.strerror or exc}); its measurements are kept for this process only")

    def is_stale(self, entry: Entry) -> bool:
        """A cached or in-process entry measured under other software than this (see the module
        docstring); shipped entries never are."""
        return self.local.get(entry.key) is entry and entry.software != software()

    def entries(self) -> list[Entry]:
        if not self._loaded:
            self.load()
        merged = dict(self.shipped)
        merged.update(self.local)
        return list(merged.values())


TABLE = Table()


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def _can_measure(inputs: Sequence) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    first = inputs[0]
    if first.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(first):
        return False
    if first.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(run: Callable[[str], object], name: str, grad_inputs: tuple) -> None:
    out = run(name)
    if grad_inputs:
        first = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(first, grad_inputs, first.detach(), allow_unused=True)


def measure(candidates: Sequence[str], call: TuneCall, device: torch.device, fwd_bwd: bool,
            round_s: float = 0.01, rounds: int = 5) -> dict:
    """name -> ms per call (min over interleaved rounds) for each candidate that runs; a candidate
    that raises is left out. Each is run twice first (compiles, caches, allocator)."""
    grad_inputs = call.grad_inputs if fwd_bwd else ()
    per_round: dict = {}
    # Identity saved-tensor hooks on top: the timing runs save nothing through an enclosing
    # region's hooks. Under activation checkpointing the first forward times the candidates and
    # its recompute does not (the choice is cached by then), so tensors the timing saved through
    # the checkpoint's hooks would make the two disagree, which checkpointing refuses.
    with torch.set_grad_enabled(fwd_bwd), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for name in candidates:
            try:
                for _ in range(2):
                    _call(call.run, name, grad_inputs)
                _sync(device)
                t0 = time.perf_counter()
                _call(call.run, name, grad_inputs)
                _sync(device)
                once = time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - e.g. out of memory, a kernel that cannot compile
                continue
            per_round[name] = max(1, min(200, int(round_s / max(once, 1e-7))))
        if not per_round:
            return {}
        if any(round_s / n > 0.05 for n in per_round.values()):
            rounds = 3  # slow calls: fewer rounds
        best = {name: float("inf") for name in per_round}
        for _ in range(rounds):
            for name, n in per_round.items():
                if name not in best:
                    continue
                try:
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        _call(call.run, name, grad_inputs)
                    _sync(device)
                except Exception:  # noqa: BLE001 - e.g. out of memory after many calls: left out
                    del best[name]
                    continue
                best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e3)
    return best


class _Refresh(threading.local):
    active = False


REFRESH = _Refresh()


class refreshing:
    """Context manager: inside it (on this thread), every ``auto`` choice re-times its key even if
    the table knows it, and measures even with ``PFP_KERNELS_AUTOTUNE=0``. ``info --tune`` uses it."""

    def __enter__(self):
        self._previous = REFRESH.active
        REFRESH.active = True
        return self

    def __exit__(self, *exc):
        REFRESH.active = self._previous
        return False


def tuning_key(op: str, first: torch.Tensor, fwd_bwd: bool, bucket: tuple) -> Key:
    """The table key of a call of ``op`` whose first input is ``first``: (op, device name, dtype,
    mode, bucket)."""
    return (op, device_name(first.device), dtype_name(first.dtype), "fwd+bwd" if fwd_bwd else "fwd", bucket)


def lookup_or_measure(op: str, candidates: Sequence[str], inputs: Sequence, call: TuneCall) -> Optional[str]:
    """The measured winner among ``candidates`` (those that can run, in static order) for this
    call's key, or None to take the static order."""
    first = inputs[0]
    if torch.compiler.is_compiling():
        return None
    fwd_bwd = bool(call.grad_inputs) and torch.is_grad_enabled()
    key = tuning_key(op, first, fwd_bwd, call.bucket)
    refresh = REFRESH.active
    entry = None if refresh else TABLE.get(key)

    def can_time() -> bool:
        return (refresh or autotune_enabled()) and _can_measure(inputs)
    # An entry is re-timed (where timing is on) if measured under other software, or if a candidate
    # that runs here was never timed for it (installed since, or not runnable where it was
    # measured: e.g. flash-attn beside a shipped entry). Candidates that failed are recorded.
    untimed = entry is not None and any(name not in entry.ms for name in candidates)
    if (entry is not None and entry.impl in candidates
            and not ((TABLE.is_stale(entry) or untimed) and can_time())):
        return entry.impl
    if not can_time():
        return None
    ms = measure(candidates, call, first.device, fwd_bwd)
    if not ms:
        return None
    winner = min(ms, key=ms.get)
    default = next(name for name in candidates if name in ms)
    if winner != default:
        # The static order's first candidate is overturned only by two timings that agree: a choice
        # is kept in the user's cache for good, and one noisy minute on a shared machine had picked
        # eager on a timing of cpp 3.38 against eager 1.95 ms, where the two re-timed at 4.0
        # against 4.3 ms (cpp ahead) in the next minutes. Disagreeing timings keep the static order.
        again = measure([default, winner], call, first.device, fwd_bwd)
        if not again or min(again, key=again.get) != winner:
            winner = default
        ms = {name: min(t, again.get(name, t)) for name, t in ms.items()}
    # the candidates that raised, as never-winning times, so that the entry counts as complete
    ms.update({name: float("inf") for name in candidates if name not in ms})
    TABLE.put(Entry(*key, winner, ms, "measured " + time.strftime("%Y-%m-%d %H:%M")))   # software: its own field
    return winner
