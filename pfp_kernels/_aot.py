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
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

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


def _ptxas_figures(log: str) -> tuple[int, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(stores.group(1)) if stores else 0,
            int(loads.group(1)) if loads else 0)


def compile_for(fn, signature: dict, constexprs: dict, capability: int, num_warps: int = 4,
                num_stages: int = 3, divisible_by_16: Iterable[str] = ()) -> AotReport:
    """Compile a @triton.jit kernel for sm_<capability>; return shared memory and ptxas figures.

    signature: argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr", ...).
    divisible_by_16: arguments (pointers or ints) to compile with Triton's divisibility-by-16
        hint, as a real launch does for 16-byte aligned pointers and ints that are multiples of
        16 (it is what lets Triton vectorise loads, so it changes registers and shared memory).

    The register and spill figures are those of the ptxas run Triton itself makes (same flags,
    e.g. --regAllocOptLevel=2), read from its log; on a Triton cache hit ptxas is rerun with
    those flags. Under TRITON_INTERPRET=1 only kernels that call no triton.language helper
    written in Triton (tl.cdiv, tl.sigmoid, ...) compile, since those are interpreter objects
    there: from an interpreted process, prefer ``compile_in_subprocesses``.
    """
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 @triton.jit gave a wrapper
        fn = JITFunction(fn.fn)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as exc:
        if knobs.runtime.interpret:
            raise RuntimeError(f"compile_for: compiling {fn.__name__} failed in a process with "
                               "TRITON_INTERPRET on (kernels calling triton.language helpers such as "
                               "tl.cdiv cannot compile there); use compile_in_subprocesses(...)") from exc
        raise
    finally:
        knobs.nvidia.dump_ptxas_log = saved
    regs, stores, loads = _ptxas_figures(log.getvalue())
    if regs < 0:  # cache hit: Triton did not run ptxas; run it as Triton does
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([_ptxas(capability), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True)
        regs, stores, loads = _ptxas_figures(out.stderr + out.stdout)
    return AotReport(capability, int(compiled.metadata.shared), regs, stores, loads)


def _run_jobs(jobs: list) -> list:
    """Child side of compile_in_subprocesses: job = [module, spec function, args, capability]."""
    import importlib
    out = []
    for module, spec_fn, args, capability in jobs:
        spec = getattr(importlib.import_module(module), spec_fn)(*args)
        out.append(asdict(compile_for(capability=capability, **spec)))
    return out


def compile_in_subprocesses(jobs: Sequence[tuple], processes: int = 2) -> list[AotReport]:
    """Run ``compile_for`` for many kernels in fresh Python processes with TRITON_INTERPRET=0.

    jobs: ``(module, spec_function, args, capability)``: ``module.spec_function(*args)`` returns the
        keyword arguments of compile_for other than capability (args must be JSON-serialisable).
    processes: how many compile processes run at once (compiling is CPU-bound; a Triton compile
        of a GEMM-sized kernel takes ~2-5 s).
    Returns one AotReport per job, in order.
    """
    import json
    import sys

    jobs = [list(j) for j in jobs]
    if not jobs:
        return []
    processes = max(1, min(processes, len(jobs)))
    chunks = [jobs[i::processes] for i in range(processes)]
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the folder holding pfp_kernels/
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = ("import json, sys; from pfp_kernels._aot import _run_jobs; "
            "print(json.dumps(_run_jobs(json.load(sys.stdin))))")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            with open(os.path.join(tmp, f"jobs{i}.json"), "w") as f:
                json.dump(chunk, f)
            # Files, not pipes, so that a chatty child can never block on a full pipe.
            with open(os.path.join(tmp, f"jobs{i}.json")) as fin, \
                    open(os.path.join(tmp, f"out{i}.json"), "w") as fout, \
                    open(os.path.join(tmp, f"err{i}.txt"), "w") as ferr:
                procs.append(subprocess.Popen([sys.executable, "-c", code], stdin=fin, stdout=fout,
                                              stderr=ferr, env=env))
        for i, proc in enumerate(procs):
            code_ = proc.wait()
            if code_ != 0:
                with open(os.path.join(tmp, f"err{i}.txt")) as f:
                    raise RuntimeError(f"AOT compile subprocess failed (exit {code_}):\n{f.read()[-4000:]}")
            with open(os.path.join(tmp, f"out{i}.json")) as f:
                results.append(json.loads(f.read().strip().splitlines()[-1]))
    ordered: list = [None] * len(jobs)
    for i, chunk_results in enumerate(results):
        for j, rep in enumerate(chunk_results):
            ordered[i + j * processes] = AotReport(**rep)
    return ordered
