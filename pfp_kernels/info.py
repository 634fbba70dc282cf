"""``python -m pfp_kernels.info``: which implementations of every op can run here, and why not.

Every op is printed the same way, from the one registry (``pfp_kernels._registry.OPS``): for each
device, the op's probe inputs, then each implementation with "yes" (marked "auto" where
``impl="auto"`` would pick it) or "no: <reason>". Reasons are input-aware, so for your own shapes
ask the op itself: ``pfp_kernels.attention_backends(q, k, v, ...)`` or
``pfp_kernels.conv.conv_impl_reasons(op, x, weight)``.
"""
from __future__ import annotations

import sys

import torch

from . import _extension, _registry
from . import attention as _attention  # noqa: F401  (registers its op)
from . import conv as _conv  # noqa: F401  (registers its ops)


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _header() -> list[str]:
    lines = [f"pfp_kernels on torch {torch.__version__}"]
    if _extension.LOADED:
        lines.append(f"C++ library: loaded, CPU kernels for {torch.ops.pfp.build_info()} (this CPU: "
                     f"{torch.backends.cpu.get_cpu_capability()} per torch; built: "
                     f"{', '.join(_extension.built_isas()) or 'none'}; PFP_CPU_ISA picks a lower one)")
    else:
        lines.append(f"C++ library: not loaded - {_extension.REASON}")
    if _registry.TRITON_AVAILABLE:
        lines.append("Triton: available" + (" (interpreter: TRITON_INTERPRET=1)" if _registry.TRITON_INTERPRET else ""))
    else:
        lines.append(f"Triton: unavailable - {_registry.TRITON_REASON}")
    return lines


def report() -> str:
    lines = _header()
    for device in _devices():
        lines.append(f"\n[{device.type}]")
        for op in _registry.OPS.values():
            what, inputs = op.probe(device)
            reasons = op.reasons(*inputs)
            try:
                auto = op.choose("auto", *inputs)
            except RuntimeError:
                auto = None
            lines.append(f"  {op.name} ({what})")
            for impl in op.impls:
                why = reasons[impl.name]
                verdict = ("yes" + (" (auto)" if impl.name == auto else "")) if why is None else "no: " + why
                lines.append(f"    {impl.name:<10} {verdict}")
            if device.type == "cpu" and op.name == "joint_attention":
                lines += _cpu_attention_routes()
    return "\n".join(lines)


def _cpu_attention_routes() -> list[str]:
    """Which route the C++ CPU kernel takes here with a context segment, per dtype ("concat" on
    CPUs with AMX-BF16 for bf16: ATen's kernel over the concatenation; else our "flash" kernel)."""
    if not _extension.has_cpu_kernel("joint_attention"):
        return []
    routes = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, ck = torch.zeros(1, 2, 1, 8, dtype=dtype), torch.zeros(1, 3, 1, 8, dtype=dtype)
        torch.ops.pfp.joint_attention(q, q, q, ck, ck, 0.35)
        routes.append(f"{str(dtype).replace('torch.', '')} {torch.ops.pfp._attention_cpu_last_route()}")
    return [f"    cpp routes with a context: {', '.join(routes)}"]


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
