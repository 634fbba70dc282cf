"""``python -m pfp_kernels.info``: which implementations of every op can run here, and why not.

``--table`` prints ``auto``'s measured choices for this machine's devices (shipped and cached;
``pfp_kernels._tuning``), and ``--tune`` first re-times the standard shapes below on every device
here and writes them to the cache: on CUDA the paper's attention (B=1 and 2, H=24, D=128,
Nq=Nk=2340, Nc=0/1000/5460/20000, bf16, forward and forward+backward), the compressor's four
conv stages at 480p, and the compressor's own causal stages and projection as it runs them (20 s
of history whole, and a 1 s append after it); on CPU the same at the benchmarks' CPU scale (H=8,
D=64, Nq=Nk=585; conv stages at 1/4 spatial scale, width 256), fp32 and bf16.

Every op is printed the same way, from the one registry (``pfp_kernels._registry.OPS``): for each
device, the op's probe inputs, then each implementation with "yes" (marked where ``impl="auto"``'s
static order would pick it; measured choices, per shape, are in ``--table``) or "no: <reason>". Reasons are input-aware, so for your own shapes
ask the op itself: ``pfp_kernels.attention_backends(q, k, v, ...)`` or
``pfp_kernels.conv.conv_impl_reasons(op, x, weight)``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator

import torch

from . import _extension, _registry, _tuning
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
                mark = " (auto, static order)" if impl.name == auto else ""
                verdict = "yes" + mark if why is None else "no: " + why
                lines.append(f"    {impl.name:<12} {verdict}")
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
        routes.append(f"{_tuning.dtype_name(dtype)} {torch.ops.pfp._attention_cpu_last_route()}")
    return [f"    cpp routes with a context: {', '.join(routes)}"]


# ----------------------------------------------------------------------------------------------
# the standard shapes --tune measures
# ----------------------------------------------------------------------------------------------
CONV_STAGES = ((16, 64, (2, 1, 1), (120, 60, 104)), (64, 128, (1, 2, 2), (60, 60, 104)),
               (128, 256, (1, 2, 2), (60, 30, 52)), (256, 512, (1, 2, 2), (60, 15, 26)))


def tuning_cases(device: torch.device) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) pairs: each call runs one op with ``impl="auto"`` so that it is re-timed."""
    from . import attention, conv
    cuda = device.type == "cuda"
    dtypes = (torch.bfloat16,) if cuda else (torch.float32, torch.bfloat16)
    h, d, n = (24, 128, 2340) if cuda else (8, 64, 585)
    contexts = (0, 1000, 5460, 20000) if cuda else (0, 1365, 5460)
    batches = (1, 2) if cuda else (1,)
    for dtype in dtypes:
        for b in batches:
            for nc in contexts:
                for grad in (False, True):
                    def call(b=b, nc=nc, grad=grad, dtype=dtype):
                        q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype).requires_grad_(grad)
                                   for _ in range(3))
                        ck = cv = None
                        if nc:
                            ck, cv = (torch.randn(1, nc, h, d, device=device, dtype=dtype).requires_grad_(grad)
                                      for _ in range(2))
                        with _tuning.refreshing():
                            attention.joint_attention(q, k, v, ck, cv)
                    yield (f"joint_attention {_tuning.dtype_name(dtype)} B={b} H={h} D={d} Nq=Nk={n} Nc={nc} "
                           f"{'fwd+bwd' if grad else 'fwd'}"), call
        scale = 1 if cuda else 4
        for cin, cout, stride, (t, hh, ww) in CONV_STAGES:
            def call(cin=cin, cout=cout, stride=stride, t=t, hh=hh, ww=ww, dtype=dtype):
                x = torch.randn(1, cin, t, hh // scale, ww // scale, device=device, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last_3d)
                w = torch.randn(cout, cin, 3, 3, 3, device=device, dtype=dtype) * 0.05
                bias = torch.zeros(cout, device=device, dtype=dtype)
                with _tuning.refreshing():
                    conv.conv3d_act(x, w, bias, stride, 1)
            yield (f"conv3d_act {_tuning.dtype_name(dtype)} {cin}->{cout} stride {stride} "
                   f"[{t}, {hh // scale}, {ww // scale}]"), call
        yield from _compressor_cases(device, dtype, scale)


# The compressor's own calls: its HR stages are causal_conv3d_act (with and without a stream's
# state) and its projection project_tokens, keyed apart from conv3d_act, so they are tuned as a
# compressor makes them: 20 s of 480p (HR latent [16, 120, 60, 104]; 4x4x2 over a 1x2x2 patch crops
# it to the 60 x 7 x 13 token grid's 56 x 104) compressed whole, and a 1 s append (6 HR frames)
# after it.
COMPRESSOR_HR, APPEND_FRAMES = (16, 120, 60, 104), 6


def _compressor_cases(device: torch.device, dtype: torch.dtype, scale: int):
    from . import conv
    cin0, t, hh, ww = COMPRESSOR_HR
    hh, ww = (hh // scale) // 8 * 8, (ww // scale) // 8 * 8   # whole 8 x 8 token footprints
    inner = 3072 if device.type == "cuda" else 256   # the benchmarks' CPU case: width 256

    def call(append: bool, frozen: bool):
        g = torch.Generator().manual_seed(0)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)
        stages = [(rand(cout, cin, 3, 3, 3, std=0.05), rand(cout, std=0.05), stride)
                  for cin, cout, stride, _ in CONV_STAGES]
        proj_w, proj_b = rand(inner, CONV_STAGES[-1][1], std=0.05), rand(inner, std=0.05)

        def run(h, states):   # the stages and the projection over new frames h: the new states
            new = []
            for (w, b, stride), state in zip(stages, states):
                h, state = conv.causal_conv3d_act(h, w, b, stride, 1, state=state)
                new.append(state)
            conv.project_tokens(h, proj_w, proj_b, residual=rand(1, h.shape[2] * h.shape[3] * h.shape[4], inner))
            return new
        x = rand(1, cin0, t + APPEND_FRAMES, hh, ww).contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad(), (conv.frozen_weights() if frozen else contextlib.nullcontext()):
            states = run(x[:, :, :t], [None] * len(stages)) if append else [None] * len(stages)
            with _tuning.refreshing():
                run(x[:, :, t:] if append else x[:, :, :t], states)
    # on CPU pfp.generate runs the convs inside frozen_weights(), which auto keys apart; training does not
    for frozen in ((False, True) if device.type == "cpu" else (False,)):
        for append in (False, True):
            what = f"a {APPEND_FRAMES}-frame append after {t}" if append else f"{t} frames whole"
            yield (f"compressor stages + projection {_tuning.dtype_name(dtype)} [{cin0}, {hh}, {ww}], width {inner}: "
                   f"{what}{', frozen weights' if frozen else ''}"), (lambda append=append, frozen=frozen: call(append, frozen))


def table_report(devices: list[torch.device]) -> str:
    names = {_tuning.device_name(device) for device in devices}
    entries = [e for e in _tuning.TABLE.entries() if e.device in names]
    lines = [f"auto's measured choices for {', '.join(sorted(names))} (cache: {_tuning.cache_path()}; "
             f"timing on first use {'on' if _tuning.autotune_enabled() else 'off'}, "
             f"{_tuning.AUTOTUNE_ENV})"]
    if not entries:
        lines.append("  none yet: the first call of each shape is timed (or run --tune)")
    for e in sorted(entries, key=lambda e: (e.device, e.op, e.dtype, e.mode, repr(e.bucket))):
        times = ", ".join(f"{k} {v:.3f}" for k, v in sorted(e.ms.items(), key=lambda kv: kv[1]))
        stale = (f"; stale, measured under {e.software or 'an older pfp_kernels'}: timed again on its next call"
                 if _tuning.TABLE.is_stale(e) else "")
        lines.append(f"  {e.op} {e.dtype} {e.mode} {list(e.bucket)}: {e.impl}  (ms: {times}; {e.source}{stale})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfp_kernels.info",
                                     description="Which implementations of every op can run here, and why not.")
    parser.add_argument("--table", action="store_true", help="also print auto's measured choices for this machine")
    parser.add_argument("--tune", action="store_true",
                        help="re-time the standard shapes on every device here, save them, print the table")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="the devices --tune and --table cover (default: all here)")
    args = parser.parse_args(argv)
    devices = [d for d in _devices() if args.device in ("all", d.type)]
    if not devices:
        print(f"python -m pfp_kernels.info: --device {args.device}: no such device here (have: "
              f"{', '.join(d.type for d in _devices())})", file=sys.stderr)
        return 2
    print(report())
    if args.tune:
        cases = [(device, label, call) for device in devices for label, call in tuning_cases(device)]
        print(f"\ntuning {len(cases)} cases (each timed on this machine; results go to {_tuning.cache_path()})")
        for i, (device, label, call) in enumerate(cases, 1):
            print(f"  [{i}/{len(cases)}] {device.type}: {label}", flush=True)
            call()
    if args.table or args.tune:
        print()
        print(table_report(devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
