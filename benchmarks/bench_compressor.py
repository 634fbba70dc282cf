"""pfp.MemoryCompressor benchmarks (pytest-benchmark).

    PYTHONPATH=$PWD python -m pytest benchmarks/bench_compressor.py --benchmark-only

History: a 20 s, 832x480, 24 fps video through a Wan-2.1-style VAE (16 channels, 8x8 spatial,
4x temporal) -> HR latent [1, 16, 120, 60, 104], LR latent [1, 16, 60, 15, 26]; rate 4x4x2,
patch (1, 2, 2), inner dim 3072, hidden (64, 128, 256, 512) -> 5460 context tokens.

CPU (all under torch.no_grad, batch 1):
- full compression, fp32 at full 480p scale; fp32 and bf16 at 1/4 spatial scale per side
  (HR latent 15x26, LR 3x6 -> 60x1x3 tokens), because bf16 convs through the reference ops are
  ~50x slower than fp32 on a CPU without native bf16. Time (pytest-benchmark) and peak memory
  (peak RSS of a fresh subprocess that does one compression, and its rise over the RSS just
  before the call);
- streaming at full scale, fp32: one 1 s append (6 HR + 3 LR latent frames) to a stream holding
  2 s and one holding 20 s of history (must agree within 20%), and a full recompute of the 21 s
  history against the append at 20 s (the append must be >= 15x faster). Each round appends to a
  fork of the same stream, so every round sees exactly 2 s / 20 s of history. The ratios come
  from rounds that interleave the three measurements, so load drift hits them alike.
CUDA: the same at full scale in bf16; skipped with the reason when no GPU is present.

Results go to cpu_compressor.md (and cuda_compressor.md) in the results folder (benchmarks/_results.py), with the
pfp_kernels implementation that ran each op (impl="auto": the reference ops until the C++ /
Triton kernels are built).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pfp  # noqa: E402
from pfp_kernels import conv as _conv  # noqa: E402

from _results import impls_chosen, results_dir
INNER, RATE, CHANNELS = 3072, "4x4x2", 16
PLAN = pfp.plan_inputs((832, 480), fps=24, seconds=20, rate=RATE)
HR_T, HR_H, HR_W = PLAN.hr_latent_shape[1:]       # 120, 60, 104
CHUNK_HR, CHUNK_LR = 6, 3                          # 1 s: 24 frames / 4; at 1/2 fps / 4
SCALES = {"full": 1, "quarter": 4}                 # spatial divisor per side

_rows: dict[str, dict] = {}


def _build(dtype: torch.dtype, device: str = "cpu", impl: str = "auto") -> pfp.MemoryCompressor:
    torch.manual_seed(0)
    pe = nn.Conv3d(CHANNELS, INNER, (1, 2, 2), (1, 2, 2))
    c = pfp.MemoryCompressor(pe, CHANNELS, INNER, RATE, zero_init=False, impl=impl)
    return c.to(device=device, dtype=dtype).eval()


def _inputs(scale: str, dtype: torch.dtype, device: str = "cpu", frames: int = HR_T):
    d = SCALES[scale]
    hr = torch.randn(1, CHANNELS, frames, HR_H // d, HR_W // d, device=device, dtype=dtype)
    hr = hr.contiguous(memory_format=torch.channels_last_3d)
    lr = torch.randn(1, CHANNELS, -(-frames // 2), HR_H // d // 4, HR_W // d // 4, device=device, dtype=dtype)
    return hr, lr


def _macs(c: pfp.MemoryCompressor, hr_shape) -> float:
    """Multiply-adds of one compression (convs over the cropped grid, projection, patchify)."""
    _, _, t, h, w = hr_shape
    gt, gh, gw = c.token_grid((t, h, w))
    fh, fw = c.hr_factors[1:]
    t, h, w = t, gh * fh, gw * fw
    total = 0.0
    for s in c.specs:
        t, h, w = -(-t // s.stride[0]), h // s.stride[1], w // s.stride[2]
        total += t * h * w * s.out_channels * s.in_channels * s.kernel[0] * s.kernel[1] * s.kernel[2]
    n = gt * gh * gw
    return total + n * c.hidden[-1] * INNER + n * INNER * CHANNELS * 4


def _impls(run) -> str:
    """The implementations ``auto`` really chose for the conv stages and the projection, recorded
    while ``run()`` does the benchmarked work once more."""
    return impls_chosen(run, (_conv.CAUSAL_CONV3D_ACT, _conv.PROJECT_TOKENS))


def _fork(stream: pfp.CompressorStream) -> pfp.CompressorStream:
    """A copy that shares the history's tensors (never mutated in place) but not the lists."""
    other = copy.copy(stream)
    other._states = list(stream._states)
    other._chunks = list(stream._chunks)
    other._features = list(stream._features)
    return other


def _time_append(times: list, base: pfp.CompressorStream, hr, lr, a: int, b: int, frozen: bool) -> None:
    """Append HR frames ``a:a+CHUNK_HR`` and LR frames ``b:b+CHUNK_LR`` to a fork of ``base`` and
    record the seconds; ``frozen``: inside ``pfp_kernels.frozen_weights()`` (as pfp.generate runs
    it: the conv kernels keep each weight's content hash)."""
    import pfp_kernels
    fork = _fork(base)
    with pfp_kernels.frozen_weights() if frozen else contextlib.nullcontext():
        t0 = time.perf_counter()
        fork.append(hr[:, :, a: a + CHUNK_HR], lr[:, :, b: b + CHUNK_LR])
        times.append(time.perf_counter() - t0)


def _stream_with_history(c, seconds: int, hr, lr) -> pfp.CompressorStream:
    s = c.stream(1)
    with torch.no_grad():
        s.append(hr[:, :, : seconds * CHUNK_HR], lr[:, :, : seconds * CHUNK_LR])
    return s


def _record(key: str, benchmark, **extra) -> dict:
    st = benchmark.stats.stats
    row = {"min_s": st.min, "median_s": st.median, "rounds": st.rounds, **extra}
    _rows[key] = row
    return row


# ----------------------------------------------------------------------------------------------
# peak memory in a fresh process
# ----------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _peak_child(scale: str, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    c = _build(dtype)
    hr, lr = _inputs(scale, dtype)
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = c(hr, lr)
    seconds = time.perf_counter() - t0
    return {"peak_rss_mib": _rss_kib("VmHWM") / 1024, "rise_mib": (_rss_kib("VmHWM") - before) / 1024,
            "child_seconds": seconds, "child_tokens": ctx.num_tokens}


def _peak_memory(scale: str, dtype_name: str) -> dict:
    if not Path("/proc/self/status").exists():
        return {"peak_rss_mib": float("nan"), "rise_mib": float("nan")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-W", "ignore", __file__, "--peak", scale, dtype_name],
                         capture_output=True, text=True, env=env, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# CPU: full compression
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,dtype_name", [("full", "float32"), ("quarter", "float32"), ("quarter", "bfloat16")])
def test_cpu_full_compression(benchmark, scale, dtype_name):
    dtype = getattr(torch, dtype_name)
    c = _build(dtype)
    hr, lr = _inputs(scale, dtype)
    with torch.no_grad():
        ctx = c(hr, lr)          # warm-up (oneDNN primitive caches)
        benchmark.pedantic(lambda: c(hr, lr), rounds=2 if dtype_name == "bfloat16" else 3, iterations=1)
    mem = _peak_memory(scale, dtype_name)
    macs = _macs(c, hr.shape)
    row = _record(f"full/{scale}/{dtype_name}", benchmark, hr=list(hr.shape), lr=list(lr.shape),
                  tokens=ctx.num_tokens, gmacs=macs / 1e9, impls=_impls(lambda: c(hr, lr)), **mem)
    row["gflops"] = 2 * macs / row["min_s"] / 1e9
    assert ctx.num_tokens == (5460 if scale == "full" else 60 * 1 * 3)


# ----------------------------------------------------------------------------------------------
# CPU: streaming, full 480p scale, fp32
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_setup():
    c = _build(torch.float32)
    hr, lr = _inputs("full", torch.float32, frames=HR_T + CHUNK_HR)   # 21 s
    return c, hr, lr, {s: _stream_with_history(c, s, hr, lr) for s in (2, 20)}


@pytest.mark.parametrize("history_s", [2, 20])
def test_cpu_stream_append_1s(benchmark, stream_setup, history_s):
    c, hr, lr, streams = stream_setup
    base = streams[history_s]
    a, b = history_s * CHUNK_HR, history_s * CHUNK_LR
    hr_chunk, lr_chunk = hr[:, :, a: a + CHUNK_HR], lr[:, :, b: b + CHUNK_LR]
    holder = {}

    def setup():
        holder["s"] = _fork(base)

    def run():
        return holder["s"].append(hr_chunk, lr_chunk)

    with torch.no_grad():
        new = _fork(base).append(hr_chunk, lr_chunk)     # warm-up
        benchmark.pedantic(run, setup=setup, rounds=7, iterations=1)
    assert new.num_tokens == 3 * 7 * 13
    _record(f"append/{history_s}s", benchmark, history_tokens=base.num_tokens, new_tokens=new.num_tokens,
            impls=_impls(lambda: _fork(base).append(hr_chunk, lr_chunk)))


def test_cpu_stream_ratios_interleaved(benchmark, stream_setup):
    """Append at 2 s, append at 20 s and a full 21 s recompute, interleaved round by round so
    that load from other processes drifts over all three alike; ratios of medians."""
    c, hr, lr, streams = stream_setup
    times = {"append/2s": [], "append/20s": [], "append/20s frozen": [], "recompute/21s": []}

    def one_round():
        for key, s in (("append/2s", 2), ("append/20s", 20), ("append/20s frozen", 20)):
            _time_append(times[key], streams[s], hr, lr, s * CHUNK_HR, s * CHUNK_LR, key.endswith("frozen"))
        t0 = time.perf_counter()
        c(hr, lr)
        times["recompute/21s"].append(time.perf_counter() - t0)

    with torch.no_grad():
        ctx = c(hr, lr)
        benchmark.pedantic(one_round, rounds=5, iterations=1)
    assert ctx.num_tokens == 63 * 7 * 13
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"min_s": min(times["recompute/21s"]), "median_s": med["recompute/21s"], "rounds": 5,
           "tokens": ctx.num_tokens, "impls": _impls(lambda: c(hr, lr)),
           "interleaved": {k: {"min_s": min(v), "median_s": med[k]} for k, v in times.items()},
           "append_20s_over_2s": med["append/20s"] / med["append/2s"],
           "recompute_over_append": med["recompute/21s"] / med["append/20s"],
           "recompute_over_frozen_append": med["recompute/21s"] / med["append/20s frozen"]}
    _rows["recompute/21s"] = row
    assert abs(row["append_20s_over_2s"] - 1) <= 0.2, row
    assert row["recompute_over_append"] >= 15, row


def test_cpu_stream_quarter_width256_interleaved(benchmark):
    """Issue 24's CPU case: the compressor at 1/4 scale with width 256, a 1 s append to 20 s of
    history (plain, and inside pfp_kernels.frozen_weights()) against a full 21 s recompute,
    interleaved; reported, not asserted (the goal is a recompute >= 15x an append)."""
    torch.manual_seed(0)
    c = pfp.MemoryCompressor(nn.Conv3d(CHANNELS, 256, (1, 2, 2), (1, 2, 2)), CHANNELS, 256, RATE,
                             zero_init=False).eval()
    hr, lr = _inputs("quarter", torch.float32, frames=HR_T + CHUNK_HR)
    base = _stream_with_history(c, 20, hr, lr)
    a, b = 20 * CHUNK_HR, 20 * CHUNK_LR
    times = {"append": [], "append frozen": [], "recompute": [], "append GEMMs": [], "recompute GEMMs": []}
    # The floor: each conv stage and the projection as one GEMM of the shape im2col would give
    # ([output positions, Cin*kt*kh*kw] @ [.., Cout]), with the positions an append and a recompute
    # really produce (read off the stages' outputs), timed with the same BLAS in the same rounds.
    gemms = {"append GEMMs": _gemm_operands(c, lambda: _fork(base).append(hr[:, :, a:a + CHUNK_HR],
                                                                          lr[:, :, b:b + CHUNK_LR])),
             "recompute GEMMs": _gemm_operands(c, lambda: c(hr, lr))}

    def one_round():
        for key in ("append", "append frozen"):
            _time_append(times[key], base, hr, lr, a, b, key.endswith("frozen"))
        t0 = time.perf_counter()
        c(hr, lr)
        times["recompute"].append(time.perf_counter() - t0)
        for key, operands in gemms.items():
            t0 = time.perf_counter()
            for x, w in operands:
                torch.mm(x, w)
            times[key].append(time.perf_counter() - t0)

    with torch.no_grad():
        benchmark.pedantic(one_round, rounds=30, iterations=1, warmup_rounds=2)
    _rows["quarter256"] = {k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}


def _gemm_operands(c: pfp.MemoryCompressor, run) -> list:
    """Random ``(x [M, K], w [K, N])`` pairs, one per conv stage and one for the projection, where
    M is the number of output positions that stage produced during ``run()``."""
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out[0])) for m in c.stages]  # (y, state)
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for spec, stage in zip(c.specs, c.stages):
        y = sum(o.shape[0] * o.shape[2] * o.shape[3] * o.shape[4] for o in outputs if o.shape[1] == spec.out_channels)
        k = stage.weight[0].numel()
        pairs.append((torch.randn(y, k), torch.randn(k, spec.out_channels)))
    last = pairs[-1][0].shape[0]
    pairs.append((torch.randn(last, c.hidden[-1]), torch.randn(c.hidden[-1], c.inner_dim)))
    return pairs


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
def _cuda_time(fn, rounds=5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_cuda_full_scale_bf16(benchmark):
    dev = "cuda"
    c = _build(torch.bfloat16, dev)
    hr, lr = _inputs("full", torch.bfloat16, dev, frames=HR_T + CHUNK_HR)
    hr20, lr20 = hr[:, :, :HR_T], lr[:, :, :HR_T // 2]
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        benchmark.pedantic(lambda: (c(hr20, lr20), torch.cuda.synchronize()), rounds=5, iterations=1, warmup_rounds=1)
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        streams = {s: _stream_with_history(c, s, hr, lr) for s in (2, 20)}
        appends = {}
        for s, base in streams.items():
            a, b = s * CHUNK_HR, s * CHUNK_LR
            appends[s] = _cuda_time(lambda: _fork(base).append(hr[:, :, a:a + CHUNK_HR], lr[:, :, b:b + CHUNK_LR]))
        # the same appends replayed as a CUDA graph: a stream fed 1 s chunks records the step and
        # captures it on its third chunk; each fork's append then replays it
        graphed = c.stream(1, cuda_graph=True)
        for k in range(20):
            graphed.append(hr[:, :, k * CHUNK_HR:(k + 1) * CHUNK_HR], lr[:, :, k * CHUNK_LR:(k + 1) * CHUNK_LR])
        a, b = 20 * CHUNK_HR, 20 * CHUNK_LR
        graph_append = _cuda_time(lambda: _fork(graphed).append(hr[:, :, a:a + CHUNK_HR], lr[:, :, b:b + CHUNK_LR]))
        replayed = graphed.graph_replays > 0   # a graph ran, not the recorded step without one
        recompute = _cuda_time(lambda: c(hr, lr))
    row = _record("cuda/full/bfloat16", benchmark, device=torch.cuda.get_device_name(), peak_alloc_mib=peak,
                  append_2s_s=appends[2], append_20s_s=appends[20], recompute_21s_s=recompute,
                  append_20s_graph_s=graph_append if replayed else None, impls=_impls(lambda: c(hr, lr)))
    _write_cuda(row)


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def _ms(v) -> str:
    return f"{v * 1e3:.0f} ms" if v is not None else "-"


def _write_cpu() -> None:
    if not any(k.startswith(("full/", "append/", "recompute/", "quarter256")) for k in _rows):
        return
    lines = [
        "# pfp.MemoryCompressor on CPU",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Rate {RATE}, patch (1,2,2), inner dim "
        f"{INNER}, hidden (64,128,256,512), batch 1, no_grad. 20 s of 832x480 at 24 fps through an 8x8x4, "
        f"16-channel VAE: HR latent {list(PLAN.hr_latent_shape)}, LR latent {list(PLAN.lr_latent_shape)}, "
        f"{PLAN.num_tokens} tokens. 'quarter' = 1/4 spatial scale per side (HR latent 15x26, LR 3x6, "
        "60x1x3 tokens). Times: min over rounds (median in brackets; the ratios use medians). Peak RSS: a fresh process doing one "
        "compression (rise = over its RSS just before the call).",
        "",
        "| what | dtype | scale | impls | time | GFLOP/s | peak RSS | rise |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in _rows.items():
        if key.startswith("full/"):
            _, scale, dt = key.split("/")
            lines.append(f"| full compression, {r['tokens']} tokens | {dt} | {scale} | {r['impls']} | "
                         f"{_ms(r['min_s'])} ({_ms(r['median_s'])}) | {r['gflops']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} MiB | {r['rise_mib']:.0f} MiB |")
    for key in ("append/2s", "append/20s", "recompute/21s"):
        r = _rows.get(key)
        if r is None:
            continue
        what = (f"append 1 s ({r['new_tokens']} tokens) to {key.split('/')[1]} of history"
                if key.startswith("append") else f"full recompute of 21 s ({r['tokens']} tokens)")
        lines.append(f"| {what} | float32 | full | {r['impls']} | {_ms(r['min_s'])} ({_ms(r['median_s'])}) "
                     f"| - | - | - |")
    rc = _rows.get("recompute/21s", {})
    if "recompute_over_append" in rc:
        inter = ", ".join(f"{k} {_ms(v['min_s'])} ({_ms(v['median_s'])})" for k, v in rc["interleaved"].items())
        lines += ["", f"Interleaved rounds (min (median)): {inter}.",
                  f"Append at 20 s / append at 2 s: {rc['append_20s_over_2s']:.2f} (must be within 0.8-1.2). "
                  f"Full recompute of 21 s / append at 20 s: {rc['recompute_over_append']:.1f}x (must be >= 15x); "
                  f"/ the append inside pfp_kernels.frozen_weights(): {rc['recompute_over_frozen_append']:.1f}x."]
    q = _rows.get("quarter256")
    if q:
        med = {k: v["median_s"] for k, v in q.items()}
        lines += ["", "1/4 scale, width 256 (issue 24's case), interleaved, min (median): "
                  + ", ".join(f"{k} {_ms2(v['min_s'])} ({_ms2(v['median_s'])})" for k, v in q.items())
                  + f". Recompute / append: {med['recompute'] / med['append']:.1f}x; / the append inside "
                  f"pfp_kernels.frozen_weights(): {med['recompute'] / med['append frozen']:.1f}x (goal >= 15x).",
                  "", "The GEMM reference: the same convs as plain GEMMs (im2col shapes, the output positions each "
                  f"really produces; torch.mm, no im2col, no overhead) take {_ms2(med['append GEMMs'])} for the append "
                  f"and {_ms2(med['recompute GEMMs'])} for the recompute: "
                  f"{med['recompute GEMMs'] / med['append GEMMs']:.1f}x. The append's few output positions per stage "
                  "(9 on the 256->512 stage) leave its GEMMs bound by reading the weights (18.7 MB fp32), which the "
                  "recompute amortises over 21x the positions. "
                  + ("Here the frozen append and the recompute both ran faster than their GEMMs (oneDNN's convs "
                     "against torch.mm's BLAS), so the reference bounds nothing on this machine."
                     if med['append frozen'] < med['append GEMMs'] and med['recompute'] < med['recompute GEMMs'] else
                     "With this BLAS that ratio is the most an append made of these GEMMs can reach.")]
    (results_dir("compressor") / "cpu_compressor.md").write_text("\n".join(lines) + "\n")


def _ms2(v) -> str:
    return f"{v * 1e3:.2f} ms"


def _write_cuda(r: dict) -> None:
    text = (f"# pfp.MemoryCompressor on CUDA\n\n{time.strftime('%Y-%m-%d %H:%M')}, {r['device']}, torch "
            f"{torch.__version__}, bf16, full 480p scale, rate {RATE}, inner dim {INNER}, impls: {r['impls']}.\n\n"
            "| what | time |\n| --- | --- |\n"
            f"| full compression, 20 s (5460 tokens) | {_ms2(r['min_s'])} (peak alloc {r['peak_alloc_mib']:.0f} MiB) |\n"
            f"| append 1 s to 2 s of history | {_ms2(r['append_2s_s'])} |\n"
            f"| append 1 s to 20 s of history | {_ms2(r['append_20s_s'])} |\n"
            f"| full recompute of 21 s | {_ms2(r['recompute_21s_s'])} |\n")
    graph = r.get("append_20s_graph_s")
    text += (f"| append 1 s to 20 s of history, replayed as a CUDA graph (`stream(cuda_graph=True)`) | "
             f"{_ms2(graph) if graph else 'not replayed'} |\n\n"
             f"Full recompute / append: {r['recompute_21s_s'] / r['append_20s_s']:.1f}x"
             + (f", / the replayed append: {r['recompute_21s_s'] / graph:.1f}x" if graph else "")
             + " (issue 24's goal: >= 5x on an H100).\n")
    (results_dir("compressor") / "cuda_compressor.md").write_text(text)


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    _write_cpu()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--peak":
    print(json.dumps(_peak_child(sys.argv[2], sys.argv[3])))
