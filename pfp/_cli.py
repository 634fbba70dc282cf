"""What every ``python -m pfp.*`` command shares: argument errors, up-front path checks, and the one
place where an exception becomes the single ``error:`` line a user sees.

Exit statuses: 0 done; 2 bad input (arguments, files, paths, optional dependencies), found before
any work starts; 1 a failure while working (non-finite values, out of memory, a damaged file found
late); 130 interrupted. ``PFP_DEBUG=1`` re-raises instead, for the traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Callable, Optional


class UsageError(ValueError):
    """Bad input, reported as one line and exit status 2."""


class RunFailure(RuntimeError):
    """A run that cannot go on (non-finite values, ...): one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit 2.

    A value that starts with a dash is taken as the value of the flag before it (``--vram -1GiB``
    as ``--vram=-1GiB``) when that flag takes one value and the token names none of this parser's
    flags, in full or as a prefix argparse would accept: argparse would read it as an unknown flag
    and say only "expected one argument", where the flag's own check names what is wrong with
    the value."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")

    def _flag_action(self, token: str, any_prefix: bool = False):
        """The action ``token`` names (its flag, or a unique long-flag prefix); with ``any_prefix``
        the first of several a prefix matches. None when it names none."""
        name = token.split("=", 1)[0]
        if name in self._option_string_actions:
            return self._option_string_actions[name]
        if self.allow_abbrev and name.startswith("--") and len(name) > 2:
            found = {a for flag, a in self._option_string_actions.items() if flag.startswith(name)}
            if len(found) == 1 or (found and any_prefix):
                return next(iter(found))
        return None

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        joined, i = [], 0
        while i < len(args):
            token = args[i]
            if token == "--":
                joined += args[i:]
                break
            nxt = args[i + 1] if i + 1 < len(args) else None
            action = self._flag_action(token) if token.startswith("-") and "=" not in token else None
            if (action is not None and action.nargs is None and isinstance(nxt, str) and nxt.startswith("-")
                    and nxt != "--" and self._flag_action(nxt, any_prefix=True) is None):
                joined.append(f"{token}={nxt}")
                i += 2
                continue
            joined.append(token)
            i += 1
        return super().parse_known_args(joined, namespace)


def one_line(exc: BaseException) -> str:
    """The line that says what went wrong. An exception re-raised from a DataLoader worker carries
    the worker's traceback in its message; its last line is the original error."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].strip()
    first = text.splitlines()[0].strip() if text else ""
    if isinstance(exc, (UsageError, RunFailure)) or type(exc) in (ValueError, RuntimeError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_work_started = False


def work_started() -> None:
    """Say that a command's up-front checks are over and its work begins (generate's first chunk,
    train's first step, eval's first clip): from here on any error is a failure while working
    (exit 1), not bad input (exit 2). Outside :func:`run_cli` it changes nothing."""
    global _work_started
    _work_started = True


def run_cli(main: Callable[[], int]) -> int:
    """Run a command's body and turn what it raises into one ``error:`` line and an exit status."""
    global _work_started
    _work_started = False
    try:
        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place that reports every failure
        if os.environ.get("PFP_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        # before the work starts, plain ValueErrors are the library's own argument checks (configs,
        # shapes, flags); after it, whatever goes wrong is a failure while working
        usage = not _work_started and (isinstance(exc, (UsageError, FileNotFoundError)) or type(exc) is ValueError)
        return 2 if usage else 1


# ------------------------------------------------------------------------------------------------
# argument checks: each raises UsageError naming the flag and what it accepts
# ------------------------------------------------------------------------------------------------
def check_number(flag: str, value, *, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, hi_open: bool = False, integer: bool = False,
                 allow_none: bool = True) -> None:
    """``value`` must be finite and within ``[lo, hi]`` (open at ``lo`` with ``lo_open``, at ``hi``
    with ``hi_open``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if lo is not None and hi is not None:
            span = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            span = f" {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            span = f" {'<' if hi_open else '<='} {hi:g}"
        else:
            span = ""
        raise UsageError(f"{flag} must be {kind}{span}, got {value}")


def check_device(flag: str, name: str) -> None:
    """cpu, cuda or cuda:N, and CUDA present when asked for; under torchrun with several ranks on
    this machine, no one GPU index for them all."""
    import torch
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks_here > 1 and str(name).strip().startswith("cuda:"):
        raise UsageError(f"{flag} {name} under torchrun with {ranks_here} ranks on this machine would put every "
                         f"rank on that one GPU; give {flag} cuda (each rank takes cuda:LOCAL_RANK)")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use {flag} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s)")


def check_output_file(flag: str, path: str, suffixes: tuple = (), create_dirs: bool = False) -> None:
    """A file the command will write at the end: right suffix, not a folder, and its folder exists
    (or, with ``create_dirs``, can be made) and takes a new file (tried for real, since permission
    bits say nothing for root or read-only mounts)."""
    if suffixes and not path.lower().endswith(suffixes):
        raise UsageError(f"{flag} must name a {' or '.join(suffixes)} file, got {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; name a file")
    check_writable_dir(flag, os.path.dirname(os.path.abspath(path)), create=create_dirs)


def check_writable_dir(flag: str, folder: str, create: bool = False) -> None:
    """``folder`` exists (or, with ``create``, can be made) and a file can be written in it."""
    if create and not os.path.exists(folder):
        parent = folder
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{flag}: {parent} is not a folder")
        check_writable_dir(flag, parent)
        return
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_module(flag: str, module: str, package: str) -> None:
    """An optional dependency that ``flag`` needs imports (the command needs it anyway, later)."""
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs {package}: pip install {package}") from None


__all__ = ["UsageError", "RunFailure", "Parser", "one_line", "run_cli", "check_number", "check_device",
           "check_output_file", "check_writable_dir", "check_module"]
