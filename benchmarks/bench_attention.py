"""Joint context attention against SDPA over the concatenation, in the same run.

    PYTHONPATH=$PWD python -m pytest benchmarks/bench_attention.py --benchmark-only

CPU: B=1, H=8, D=64, Nc=1365, Nq=Nk=585 (the paper's context of one chunk at small scale),
fp32 and bf16, forward and forward+backward, each backend forced and ``auto`` (the measured choice,
named in the table), and ``buffer``: pfp_kernels.JointKVBuffer, the context written once into a
persistent [context ; target] buffer outside the timing, each call writing the target K/V into its
tail and running SDPA over it (a denoising step; forward only). The baseline ``sdpa_concat`` is ``F.scaled_dot_product_attention(q, cat(ctx_k, k),
cat(ctx_v, v))`` with the concatenation inside the timed call (the layout transposes are views).
CUDA (skipped without a GPU): the paper's scale, B=1, H=24, D=128, Nc=5460, Nq=Nk=2340, bf16,
forward and forward+backward, in TFLOP/s (4*B*H*Nq*(Nc+Nk)*D flops per forward) against SDPA over
the concatenation (PyTorch's choice, and each of its fused kernels forced) and flash-attn where
installed, timed with CUDA events (benchmarks/_timing.py).

Each section writes a markdown table to the results folder (benchmarks/_results.py) when its benchmarks ran (not with
--benchmark-disable): each backend's minimum and its ratio to the baseline measured in this run. On
CPU the table's figures come from rounds interleaved across the contenders (benchmarks/_timing.py),
so that load from neighbours on a shared VM hits them alike; pytest-benchmark's per-test figures
are kept for its own report.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.nn.functional as F

import pfp_kernels as pk
from pfp_kernels._tuning import cpu_model

from _timing import interleaved_mins

from _results import results_dir
CPU_SHAPE = dict(B=1, H=8, D=64, Nc=1365, N=585)
CPU_IMPLS = ("sdpa_concat", "cpp", "cpp_flash", "cpp_segments", "cpp_concat", "sdpa", "auto", "buffer")
CPU_FWD_BWD_IMPLS = ("sdpa_concat", "cpp", "sdpa", "auto")
CPU_INTERLEAVED_ROUNDS = 40
CUDA_SHAPE = dict(B=1, H=24, D=128, Nc=5460, N=2340)
BASELINE = "sdpa_concat"

_measured: dict[str, dict[tuple, float]] = {"cpu": {}, "cuda": {}}
_auto_ran: dict[tuple, str] = {}  # (device, direction, dtype) -> what auto ran, with its measured times


def _inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, d, nc, n = shape["B"], shape["H"], shape["D"], shape["Nc"], shape["N"]

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return r(b, n, h, d), r(b, n, h, d), r(b, n, h, d), r(1, nc, h, d), r(1, nc, h, d)


def _sdpa_concat(q, k, v, ck, cv):
    b = q.shape[0]
    kk = torch.cat([ck.expand(b, -1, -1, -1), k], dim=1)
    vv = torch.cat([cv.expand(b, -1, -1, -1), v], dim=1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)).transpose(1, 2)


def _runner(impl, inputs):
    if impl == BASELINE:
        return lambda: _sdpa_concat(*inputs)
    if impl == "buffer":   # the context copied in once, here; each call is one denoising step's
        q, k, v, ck, cv = inputs
        buf = pk.JointKVBuffer(ck, cv, q.shape[0], k.shape[1])

        def step():
            with torch.no_grad():
                return buf.attend(q, k, v)
        return step
    if impl.startswith("cpp_"):  # the C++ op with one CPU route forced: cpp_flash, cpp_segments
        route = impl[len("cpp_"):]

        def forced():
            previous = torch.ops.pfp._attention_cpu_path(route)
            try:
                return pk.joint_attention(*inputs, impl="cpp")
            finally:
                torch.ops.pfp._attention_cpu_path(previous)
        return forced
    return lambda: pk.joint_attention(*inputs, impl=impl)


def _with_backward(impl, inputs, runner):
    """A call of ``impl``'s forward and backward (gradients of all five inputs)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    fwd = runner(impl, leaves)
    grad = torch.randn_like(inputs[0])
    return lambda: torch.autograd.grad(fwd(), leaves, grad)


def _auto_choice(inputs, backward: bool) -> str:
    """The implementation auto's tuning table holds for these inputs' key, with the times it
    measured (auto measures on its first call), or what auto falls back to without an entry."""
    from pfp_kernels import _tuning
    from pfp_kernels.attention import _tune_call
    bucket = _tune_call(*inputs, inputs[0].shape[-1] ** -0.5).bucket
    entry = _tuning.TABLE.get(_tuning.tuning_key("joint_attention", inputs[0], backward, bucket))
    if entry is None:
        return "static order (no table entry)"
    return entry.impl + " (measured: " + ", ".join(f"{k} {v:.2f} ms" for k, v in entry.ms.items()) + ")"


def _machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def _write_cpu_table(path, shape, how):
    rows = _measured["cpu"]
    if not rows:
        return
    lines = [f"# joint_attention on CPU: {_machine('cpu')}", "",
             f"torch {torch.__version__}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Shape "
             + ", ".join(f"{k}={v}" for k, v in shape.items())
             + f" (N = Nq = Nk; context batch 1). Baseline `{BASELINE}`: SDPA over cat(context, target), "
             f"the concatenation timed (its backward is PyTorch's). Ratio = baseline min / backend min over {how} "
             "(> 1: faster). `auto` is the op as users call it: the implementation its tuning table "
             "holds for the call's key, measured on its first call (PFP_KERNELS_CACHE points at an empty "
             "file for a fresh measurement).", ""]
    for direction in ("forward", "forward+backward"):
        mine = {key[1:]: t for key, t in rows.items() if key[0] == direction}
        if not mine:
            continue
        lines += [f"## {direction}", "", "| dtype | backend | min ms | ratio vs sdpa_concat |", "|---|---|---|---|"]
        for (dtype, impl), t in sorted(mine.items(), key=lambda kv: (kv[0][0], kv[0][1] != BASELINE, kv[0][1])):
            base = mine.get((dtype, BASELINE))
            ratio = f"{base / t:.2f}" if base else "n/a"
            lines.append(f"| {dtype} | {impl} | {t * 1e3:.2f} | {ratio} |")
        ran = {k[2]: v for k, v in _auto_ran.items() if k[:2] == ("cpu", direction)}
        if ran:
            lines += [""] + [f"- `auto`, {dtype}: {v}" for dtype, v in sorted(ran.items())]
        lines.append("")
    with open(results_dir("attention") / path, "w") as f:
        f.write("\n".join(lines))


@pytest.fixture(scope="module", autouse=True)
def _tables():
    yield
    _write_cpu_table("cpu_attention.md", CPU_SHAPE, how=f"{CPU_INTERLEAVED_ROUNDS} rounds interleaved across the backends")
    _write_cuda_table()


# ----------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------
def _cpu_runnable(names, inputs):
    reasons = pk.attention_backends(*inputs)
    return [i for i in names if i in (BASELINE, "auto", "buffer") or reasons[i.split("_")[0]] is None]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_joint_attention(benchmark, impl, dtype):
    """``cpp`` is the op as dispatched (its "flash" route); ``cpp_segments`` forces its fallback
    route, ATen's flash kernel per segment + merge, so the table says which of the two is faster."""
    inputs = _inputs(CPU_SHAPE, getattr(torch, dtype), "cpu")
    if impl not in _cpu_runnable([impl], inputs):
        pytest.skip(f"{impl}: {pk.attention_backends(*inputs)[impl.split('_')[0]]}")
    benchmark.group = f"cpu {dtype}"
    fn = _runner(impl, inputs)
    out = benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=2)
    torch.testing.assert_close(out.float(), _sdpa_concat(*inputs).float(), atol=2e-2, rtol=0)
    if impl == BASELINE and not getattr(benchmark, "disabled", False):
        # the table: every runnable backend of this dtype, in turn, round after round
        fns = {i: _runner(i, inputs) for i in _cpu_runnable(CPU_IMPLS, inputs)}
        fns["auto"]()  # auto measures its choice on its first call: before the rounds
        mins = interleaved_mins(fns, budget_s=1e9, max_rounds=CPU_INTERLEAVED_ROUNDS)
        _measured["cpu"].update({("forward", dtype, i): t for i, t in mins.items()})
        _auto_ran[("cpu", "forward", dtype)] = _auto_choice(inputs, backward=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_joint_attention_backward(benchmark, dtype):
    """Forward + backward (gradients of q, k, v and the context) against SDPA over the
    concatenation with PyTorch's backward."""
    inputs = _inputs(CPU_SHAPE, getattr(torch, dtype), "cpu")
    benchmark.group = f"cpu {dtype} forward+backward"
    fns = {i: _with_backward(i, inputs, _runner) for i in _cpu_runnable(CPU_FWD_BWD_IMPLS, inputs)}
    fns["auto"]()  # auto measures its forward+backward choice on its first call
    benchmark.pedantic(fns["auto"], rounds=5, iterations=1, warmup_rounds=1)
    if not getattr(benchmark, "disabled", False):
        mins = interleaved_mins(fns, budget_s=1e9, max_rounds=CPU_INTERLEAVED_ROUNDS // 2)
        _measured["cpu"].update({("forward+backward", dtype, i): t for i, t in mins.items()})
        _auto_ran[("cpu", "forward+backward", dtype)] = _auto_choice(inputs, backward=True)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
# SDPA over the concatenation with each of PyTorch's fused CUDA kernels forced: FlashAttention-2
# (built into PyTorch), cuDNN's attention, and the memory-efficient (xformers-derived) kernel.
SDPA_FORCED = {"sdpa_concat_flash": "FLASH_ATTENTION", "sdpa_concat_cudnn": "CUDNN_ATTENTION",
               "sdpa_concat_efficient": "EFFICIENT_ATTENTION"}
CUDA_FWD = (BASELINE, *SDPA_FORCED, "triton", "sdpa", "flash_attn", "xformers", "auto", "buffer")
CUDA_FWD_BWD = (BASELINE, *SDPA_FORCED, "triton", "flash_attn", "auto")


def _cuda_runner(impl, inputs):
    if impl in SDPA_FORCED:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, SDPA_FORCED[impl])

        def forced():
            with sdpa_kernel(backend):
                return _sdpa_concat(*inputs)
        return forced
    return _runner(impl, inputs)


def _cuda_contenders(names, inputs, backward=False):
    """{name: callable} of the contenders that run these inputs, and {name: why not} of the rest."""
    runnable, skipped = {}, {}
    reasons = pk.attention_backends(*inputs)
    want = _sdpa_concat(*inputs).float()
    for name in names:
        if name in reasons and reasons[name] is not None:
            skipped[name] = reasons[name]
            continue
        fn = _cuda_runner(name, inputs)
        try:
            out = fn()
        except RuntimeError as exc:  # a forced SDPA kernel that cannot take these inputs
            skipped[name] = str(exc).strip().splitlines()[0][:160]
            continue
        err = ((out.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.3g} against sdpa_concat"
        if backward:
            fn = _with_backward(name, inputs, _cuda_runner)
            fn()  # auto measures its forward+backward choice on its first call: before the timing
        runnable[name] = fn
    return runnable, skipped


_cuda_skipped: dict[str, str] = {}


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
def test_cuda_joint_attention(benchmark, direction):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the paper-scale CUDA benchmark needs a GPU")
    from _timing import cuda_times
    inputs = _inputs(CUDA_SHAPE, torch.bfloat16, "cuda")
    backward = direction != "forward"
    fns, skipped = _cuda_contenders(CUDA_FWD_BWD if backward else CUDA_FWD, inputs, backward)
    _cuda_skipped.update(skipped)
    benchmark.group = f"cuda bfloat16 {direction}"
    benchmark.pedantic(lambda: (fns["triton"](), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=2)
    if not getattr(benchmark, "disabled", False):
        for impl, t in cuda_times(fns).items():
            _measured["cuda"][(direction, impl)] = t
        _auto_ran[("cuda", direction, "bfloat16")] = _auto_choice(inputs, backward)


def _write_cuda_table():
    rows = _measured["cuda"]
    if not rows:
        return
    s = CUDA_SHAPE
    flops = 4 * s["B"] * s["H"] * s["N"] * (s["Nc"] + s["N"]) * s["D"]
    import triton
    lines = [f"# joint_attention on CUDA: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, by `pytest benchmarks/bench_attention.py -k cuda "
             "--benchmark-only`. Shape " + ", ".join(f"{k}={v}" for k, v in s.items())
             + " (N = Nq = Nk; context batch 1), bf16. Each round times back-to-back calls between CUDA events "
             "(about 20 ms per round), 20 rounds interleaved across the contenders; min (median). "
             "Peak: the CUDA allocation during one call above what was allocated before it.", "",
             "Contenders: `sdpa_concat` F.scaled_dot_product_attention over cat(context, target), the "
             "concatenation timed, PyTorch's own kernel choice; `sdpa_concat_flash` / `_cudnn` / `_efficient` "
             "the same with FlashAttention-2 (PyTorch's), cuDNN or the memory-efficient kernel forced; "
             "`triton` pfp_kernels' fused kernel over the two segments (no concatenation); `sdpa` pfp_kernels' "
             "split path (SDPA per segment + log-sum-exp merge); `flash_attn` the flash-attn package where installed; "
             "`auto` the op as users call it; `buffer` pfp_kernels.JointKVBuffer (the context copied once into a "
             "persistent [context ; target] buffer before the timing, each call writing the target K/V into its tail "
             "and running flash-attn or SDPA over it: a denoising step; forward only).",
             "", f"TFLOP/s: {flops / 1e9:.0f} GFLOP per forward (4 B H Nq (Nc+Nk) D), x 3.5 for forward + backward "
             "(2.5 x the forward for the backward).", ""]
    for direction in ("forward", "forward+backward"):
        mine = {impl: v for (d, impl), v in rows.items() if d == direction}
        if not mine:
            continue
        best_name = min((k for k in mine if k.startswith("sdpa_concat")), key=lambda k: mine[k][0])
        best = mine[best_name][0]
        work = flops * (3.5 if direction != "forward" else 1.0)
        lines += [f"## {direction}", "", f"| backend | min ms (median) | vs {best_name} (fastest SDPA) | TFLOP/s | peak MiB |",
                  "|---|---:|---:|---:|---:|"]
        for impl, (tmin, tmed, peak) in sorted(mine.items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {impl} | {tmin * 1e3:.3f} ({tmed * 1e3:.3f}) | {best / tmin:.2f} | "
                         f"{work / tmin / 1e12:.0f} | {peak:.0f} |")
        if ("cuda", direction, "bfloat16") in _auto_ran:
            lines += ["", f"`auto` ran: {_auto_ran[('cuda', direction, 'bfloat16')]}"]
        lines.append("")
    if _cuda_skipped:
        lines += ["Not run here: " + "; ".join(f"`{k}`: {v}" for k, v in sorted(_cuda_skipped.items())) + "."]
    card = torch.cuda.get_device_name().replace(" ", "_")
    with open(results_dir("attention") / f"cuda_attention_{card}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
