"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

The Triton interpreter ignores hardware limits (tl.dot tile sizes, shared memory, registers),
so the tests compile every config a launcher can pick for the H100 (sm_90) and the RTX 4070
(sm_89) and check ptxas' register / spill report and the shared memory against each card.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Opt-in shared memory per block (bytes): H100 228 KiB SM with 227 KiB per block; Ada 100 KiB SM
# with 99 KiB per block.
SHARED_LIMIT = {90: 227 * 1024, 89: 99 * 1024}
TARGETS = {"H100": 90, "RTX 4070": 89}


@dataclass
class AotReport:
    capability: int
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def shared_ok(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT[self.capability]

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _ptxas(capability: int) -> str:
    # The ptxas Triton itself compiles with (the legacy one in its bin/ rejects the PTX version
    # Triton 3.9 emits).
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def compile_for(fn, signature: dict, constexprs: dict, capability: int, num_warps: int = 4,
                num_stages: int = 3) -> AotReport:
    """Compile a @triton.jit kernel for sm_<capability>; return shared memory and ptxas figures.

    signature: argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr", ...).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return AotReport(capability, int(compiled.metadata.shared), int(regs.group(1)) if regs else -1,
                     int(stores.group(1)) if stores else 0, int(loads.group(1)) if loads else 0)
