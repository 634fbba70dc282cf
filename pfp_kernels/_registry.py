"""One registry of every op's implementations, in the spirit of xformers' fmha dispatch.

Each op is an :class:`Op`: its implementations as :class:`Impl` records, the order ``impl="auto"``
tries them per device type, and a probe (small example inputs) for ``python -m pfp_kernels.info``.
An ``Impl`` says which device types it can ever run on and, through ``why_not(*inputs)``, why it
cannot run *these* inputs (dtype, head dim, size, a missing library...), or None when it can.
``Op.choose`` checks a forced implementation, or for ``auto`` takes the measured fastest of those
that can run (``_tuning``: a shipped table, the user's cache, or timing on first use), else the
first of the static order that can; every refusal names the implementation and its reason.

The ``why_not`` functions must stay cheap and traceable by torch.compile: no imports or
dispatcher queries while tracing (see ``_extension.CPU_KERNELS`` and the attention module's table
of installed packages).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from . import _extension, _tuning

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    return True, ""


TRITON_AVAILABLE, TRITON_REASON = _probe_triton()


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    name: what ``impl=`` takes. devices: the device types it can ever run on (empty: any). why_not: called with
    the op's inputs (already checked by the op), returns None if it can run them, else the reason.
    where: where its kernel lives, for ``info``.
    """

    name: str
    devices: tuple[str, ...]
    why_not: Callable[..., Optional[str]]
    where: str = ""


@dataclass(frozen=True)
class Op:
    """An op's implementations, its ``impl="auto"`` order per device type, and an info probe.

    tuned: per device type, the implementations ``auto`` times against each other when the API
    passes a :class:`_tuning.TuneCall` (the stock kernels among them, so a measured ``auto`` is never
    slower than the stock kernel it knows). Empty: the static order alone.
    grad_order: per device type, the static order for calls whose :class:`_tuning.TuneCall` has
    inputs that need gradients, where it differs from ``auto_order`` (an implementation with a fast
    forward and a slow backward). Used where nothing is measured (torch.compile tracing, timing
    off, no table entry).
    probe(device) returns ``(description, inputs)``: small inputs on ``device`` that show which
    implementations can run there (``info`` prints the reasons for them).
    """

    name: str
    impls: tuple[Impl, ...]
    auto_order: Mapping[str, tuple[str, ...]]
    probe: Optional[Callable[[torch.device], tuple[str, tuple]]] = field(default=None, compare=False)
    tuned: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    grad_order: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(impl.name for impl in self.impls)

    def reasons(self, *inputs) -> dict[str, Optional[str]]:
        """impl name -> None if it can run these inputs, else why not. inputs[0] is a tensor whose
        device is the op's."""
        device = inputs[0].device.type
        out: dict[str, Optional[str]] = {}
        for impl in self.impls:
            if impl.devices and device not in impl.devices:
                out[impl.name] = f"runs on {' or '.join(d.upper() for d in impl.devices)} tensors only, these are on {device}"
            else:
                out[impl.name] = impl.why_not(*inputs)
        return out

    def static_order(self, device: str, grad: bool = False) -> tuple[str, ...]:
        """``auto``'s order without a measurement on this device type: :attr:`grad_order`'s for a
        call that needs gradients where it has one, else :attr:`auto_order`'s."""
        if grad and device in self.grad_order:
            return self.grad_order[device]
        return self.auto_order.get(device, self.auto_order["default"])

    def choose(self, impl: str, *inputs, tune: Optional[_tuning.TuneCall] = None) -> str:
        """The implementation to run: ``impl`` itself if it can run these inputs, or for "auto" the
        measured fastest of ``tuned`` that can (when ``tune`` is given and two or more can), else the
        first in this device's auto order that can. Raises
        ValueError for an unknown name and RuntimeError (with every reason) when none can."""
        names = self.names
        if impl != "auto" and impl not in names:
            raise ValueError(f"{self.name}: impl must be one of {('auto',) + names}, got {impl!r}")
        reasons = self.reasons(*inputs)
        if impl != "auto":
            why = reasons[impl]
            if why is not None:
                raise RuntimeError(f"{self.name}: impl={impl!r} cannot run these inputs: {why}")
            return impl
        device = inputs[0].device.type
        if tune is not None and device in self.tuned:
            runnable = [name for name in self.tuned[device] if reasons[name] is None]
            if len(runnable) > 1:
                best = _tuning.lookup_or_measure(self.name, runnable, inputs, tune)
                if best is not None:
                    return best
        order = self.static_order(device, grad=tune is not None and bool(tune.grad_inputs) and torch.is_grad_enabled())
        for name in order:
            if reasons[name] is None:
                return name
        details = "; ".join(f"{name}: {reasons[name]}" for name in order)
        raise RuntimeError(f"{self.name}: no implementation can run these inputs ({details})")


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    if "default" not in op.auto_order:
        raise ValueError(f"{op.name}: auto_order needs a 'default' entry")
    for order in (*op.auto_order.values(), *op.tuned.values(), *op.grad_order.values()):
        unknown = set(order) - set(op.names)
        if unknown:
            raise ValueError(f"{op.name}: auto_order names unknown implementations {sorted(unknown)}")
    for device, tuned in op.tuned.items():
        # the first of the tuned that runs is the static choice that two disagreeing timings keep
        order = op.auto_order.get(device, op.auto_order["default"])
        if [n for n in order if n in tuned] != list(tuned):
            raise ValueError(f"{op.name}: tuned[{device!r}] must follow auto_order[{device!r}]")
    OPS[op.name] = op
    return op


def call_op(op, *args):
    """``op(*args)`` for a pfp op (C++ or Triton), skipping torch.library's Python autograd wrapper
    when no argument needs a gradient (grad mode off, or no tensor argument requiring grad).

    That wrapper then only redispatches below the autograd key, which this does directly. Its
    Python costs ~10 us per call with warm caches, and ~50 us right after a conv that streamed a
    large weight through the caches: the four conv calls of a streaming append at 1/4 scale took
    1.53 ms instead of 1.73 (Zen 4, 2 cores, caches evicted first). Calls that need a gradient,
    and code torch.compile traces, go through the op as usual.
    """
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with _below_autograd():
        return op(*args)


_below_autograd = torch._C._AutoDispatchBelowAutograd  # a name of its own, for the tests


# ----------------------------------------------------------------------------------------------
# reasons shared by several ops
# ----------------------------------------------------------------------------------------------
def cpp_why_not(op: str, device: torch.device) -> Optional[str]:
    """Why the C++ kernel of pfp::<op> cannot run on ``device`` (None if it can)."""
    if not _extension.LOADED:
        return f"C++ library not loaded: {_extension.REASON}"
    if device.type != "cpu":
        return f"C++ kernels run on CPU tensors only, got {device.type}"
    if not _extension.has_cpu_kernel(op):
        return f"this build of pfp_kernels._C has no CPU kernel for pfp::{op}"
    return None


def triton_why_not(device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why a Triton kernel cannot run on ``device`` (and ``dtype``, when given); None if it can."""
    if not TRITON_AVAILABLE:
        return TRITON_REASON
    if device.type == "cpu":
        if not TRITON_INTERPRET:
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing pfp_kernels)"
        if dtype == torch.bfloat16:
            return "bf16 tl.dot gives wrong results under the Triton interpreter (TRITON_INTERPRET=1)"
        return None
    if device.type != "cuda":
        return f"Triton kernels need CUDA tensors, got {device.type}"
    return None


def dtype_why_not(dtype: torch.dtype, allowed: tuple) -> Optional[str]:
    if dtype not in allowed:
        names = ", ".join(_tuning.dtype_name(d) for d in allowed)
        return f"dtype {_tuning.dtype_name(dtype)} not supported (supports {names})"
    return None
