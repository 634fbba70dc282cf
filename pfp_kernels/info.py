"""``python -m pfp_kernels.info``: which implementations of every op can run here, and why not."""
from __future__ import annotations

import sys

import torch

from . import _dispatch, _extension
from .attention import attention_backends
from .conv import conv_impl_reasons


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def report() -> str:
    lines = [f"pfp_kernels on torch {torch.__version__}"]
    if _extension.LOADED:
        lines.append(f"C++ library: loaded, CPU kernels for {torch.ops.pfp.build_info()} (this CPU: "
                     f"{torch.backends.cpu.get_cpu_capability()} per torch; built: "
                     f"{', '.join(_extension.built_isas()) or 'none'}; PFP_CPU_ISA picks a lower one)")
    else:
        lines.append(f"C++ library: not loaded - {_extension.REASON}")
    lines.append("Triton: " + ("available" + (" (interpreter: TRITON_INTERPRET=1)" if _dispatch.TRITON_INTERPRET else "")
                               if _dispatch.TRITON_AVAILABLE else f"unavailable - {_dispatch.TRITON_REASON}"))
    for device in _devices():
        lines.append(f"\n[{device.type}]")
        for op in ("conv3d_act", "causal_conv3d_act", "project_tokens"):
            lines.append(f"  {op}")
            for name, why in conv_impl_reasons(op, device).items():
                lines.append(f"    {name:<10} {'yes' if why is None else 'no: ' + why}")
        q = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        lines.append("  joint_attention (fp16/64-dim probe on cuda, fp32 on cpu)")
        for name, why in attention_backends(q, q, q, q, q).items():
            lines.append(f"    {name:<10} {'yes' if why is None else 'no: ' + why}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
