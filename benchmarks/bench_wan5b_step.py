"""One Wan-2.2-5B denoising step, end to end: time and MFU, bf16 and fp8, cached and joint context.

    python benchmarks/bench_wan5b_step.py [--device cuda] [--steps 10] [--dry-run]

The model is the full-size Wan 2.2 TI2V-5B transformer (``pfp.backbones.wan.WAN22_5B_CONFIG``, 30
blocks of width 3072, FFN 14336) with random weights built on the device (no hub), driven through
``WanBackbone``: one chunk of 2340 target tokens (1 s of 832x480 at 24 fps: a 6 x 30 x 52 latent
through Wan 2.2's 16x16x4 VAE, 6 x 15 x 26 tokens after the 1x2x2 patch) after 5460 context tokens
(the paper's "~5k tokens for 20 s", issue 24's attention shape; 4x4x2 over an 8x VAE's latent, as
Wan 2.1's, gives that count), 512 text states, classifier-free guidance (batch 2, one shared
context). A step is one forward of that batch:

- ``cached``: the context's per-layer K/V are computed once per chunk (timed apart) and every step
  runs only the target tokens over ``[context ; target]`` keys, concatenated per step;
- ``cached+buffers``: the same through persistent ``[context ; target]`` buffers
  (``WanBackbone.use_context_kv_buffers``, the memory planner's ``kv="buffer"`` that
  ``pfp.generate`` runs): the context is copied in once per chunk (inside the timed K/V build) and
  each step writes only the target's K/V;
- ``joint`` (the paper's mode): context and target tokens run through every block at every step.

FLOPs are counted per step from the shapes (2 per multiply-add, :func:`step_flops`): per block and
sample, the Q/K/V/O projections of the tokens run (target only in cached mode, target + context in
joint), the attention over ``Nc + Nt`` keys, the text cross-attention (its K/V over 512 states)
and the FFN.
MFU divides the achieved rate by the card's dense bf16 peak (``--peak-tflops``, default from the
card's name: 989 for an H100 SXM, 756 for an H100 PCIe); fp8 rows are divided by the same bf16
peak, so fp8's MFU reads as its speed-up, not its own utilisation.

fp8: torchao's ``Float8DynamicActivationFloat8WeightConfig`` on the blocks' linear layers (fp8 GEMMs
with per-row scales, sm_89 or newer), where torchao is installed; otherwise the rows say why not.

``--dry-run`` runs every path on the CPU with a 2-block, width-256 stand-in and few tokens, to
check the script without a GPU. Results: ``wan5b_step_<device>.md`` in the results folder.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from _results import results_dir  # noqa: E402 - benchmarks/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FULL = dict(grid=(6, 15, 26), context=5460, text=512)   # grid: target tokens (t, h, w), after the patch
DRY = dict(grid=(2, 4, 6), context=40, text=16)
# dense bf16 tensor-core peaks with fp32 accumulation (what torch's bf16 GEMMs use). GeForce Ada
# cards run fp32 accumulation at half their fp16-accumulate rate: the RTX 4070's 116.6 is the latter.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0,
                    "RTX 4070": 58.3}


def step_flops(cfg: dict, nt: int, nc: int, text: int, batch: int, mode: str) -> float:
    """Multiply-adds x 2 of one forward at these token counts (the module docstring's count). In
    joint mode the context tokens run every block too, except that the last block computes only their
    Q, K, V (their output is never read). Checked against torch's FlopCounterMode on the dry-run
    model with SDPA attention: within 2%."""
    c = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers = cfg["ffn_dim"], cfg["num_layers"]
    keys = nt + nc
    target = (4 * 2 * nt * c * c + 2 * 2 * nt * keys * c                        # self-attention
              + 2 * 2 * nt * c * c + 2 * 2 * text * c * c + 2 * 2 * nt * text * c  # text cross-attention
              + 2 * 2 * nt * c * f)                                               # FFN
    per_sample = target * layers
    if mode == "joint":
        context = 4 * 2 * nc * c * c + 2 * 2 * nc * keys * c + 2 * 2 * nc * c * f
        per_sample += context * (layers - 1) + 3 * 2 * nc * c * c
    return float(per_sample * batch)


def build(device: str, dtype: torch.dtype, dry_run: bool):
    from pfp.backbones.wan import WAN22_5B_CONFIG, WanBackbone
    cfg = dict(WAN22_5B_CONFIG)
    if dry_run:
        cfg.update(num_attention_heads=4, attention_head_dim=64, ffn_dim=512, num_layers=2, text_dim=64)
    torch.manual_seed(0)
    with torch.device(device):  # built and randomly initialised on the device: fast, no host copy
        bb = WanBackbone.from_config(context_mode="cached", **cfg)
    bb = bb.to(dtype).eval()
    with torch.no_grad():
        bb.transformer.proj_out.weight.mul_(0.1)
    return bb, cfg


def fp8_why_not(device: str) -> str | None:
    if device != "cuda":
        return "fp8 GEMMs need a CUDA device (sm_89 or newer)"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"fp8 GEMMs need sm_89 or newer, this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    try:
        import torchao.quantization as q
        getattr(q, "Float8DynamicActivationFloat8WeightConfig")
    except Exception as exc:  # noqa: BLE001 - any import problem is a reason
        return f"torchao with Float8DynamicActivationFloat8WeightConfig is not importable ({type(exc).__name__}: {exc})"
    return None


def to_fp8(bb) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    for blk in bb.blocks:
        quantize_(blk, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, device: str, steps: int) -> list:
    fn()
    fn()
    _sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def run(device: str, steps: int, dry_run: bool, peak_tflops: float | None) -> list:
    from pfp.compressor import Context
    shape = DRY if dry_run else FULL
    dtype = torch.float32 if (dry_run and device == "cpu") else torch.bfloat16
    t, h, w = shape["grid"]
    nt, nc, nl = t * h * w, shape["context"], shape["text"]
    rows = []
    for weights in ("bf16", "fp8"):
        why = fp8_why_not(device) if weights == "fp8" else None
        if why is not None:
            rows.append({"weights": weights, "why": why})
            continue
        bb, cfg = build(device, dtype, dry_run)
        if weights == "fp8":
            to_fp8(bb)
        g = torch.Generator(device="cpu").manual_seed(1)

        def r(*s):
            return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
        c = cfg["in_channels"]
        x = r(2, c, t, 2 * h, 2 * w)
        text = r(2, nl, cfg["text_dim"])
        ts = torch.full((2,), 0.7, device=device)
        ctx_frames = max(1, nc // (h * w))
        positions = torch.stack(torch.meshgrid(torch.arange(ctx_frames) * 2.0, torch.arange(h) * 1.0,
                                               torch.arange(w) * 1.0, indexing="ij"), -1).reshape(-1, 3)[:nc]
        positions = positions.to(device)
        if positions.shape[0] < nc:  # the last context frame partly filled
            extra = positions[-1:].repeat(nc - positions.shape[0], 1)
            positions = torch.cat([positions, extra])
        ctx = Context(r(1, nc, cfg["num_attention_heads"] * cfg["attention_head_dim"]), positions)
        t_start = float(positions[:, 0].max()) + 2
        for mode in ("cached", "cached+buffers", "joint"):
            bb.context_mode = "joint" if mode == "joint" else "cached"
            bb.use_context_kv_buffers(mode == "cached+buffers")
            with torch.no_grad():
                chunk_times = None
                if mode == "cached":
                    chunk_times = time_steps(lambda: bb.cache_context(ctx), device, max(2, steps // 4))
                    kv = bb.cache_context(ctx)
                elif mode == "cached+buffers":
                    def build_and_fill():   # the first step after a build copies the context in
                        built = bb.cache_context(ctx)
                        bb(x, ts, text, built, t_start=t_start)
                    chunk_times = time_steps(build_and_fill, device, max(2, steps // 4))
                    kv = bb.cache_context(ctx)
                if mode == "joint":
                    fn = lambda: bb(x, ts, text, ctx, t_start=t_start)  # noqa: E731
                else:
                    fn = lambda: bb(x, ts, text, kv, t_start=t_start)  # noqa: E731
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = time_steps(fn, device, steps)
            if mode == "cached+buffers" and not kv.holds_joint_buffers:
                rows.append({"weights": weights, "why": "cached+buffers: the steps did not attend through the "
                             "[context ; target] buffers (see WanStyleBackbone._joint_buffers)"})
                continue
            cache_s = None
            if chunk_times is not None:
                # per chunk: the K/V build (and with buffers the fill, i.e. the first step's extra
                # cost: a difference of two medians, so at least 0 however the rounds fell)
                cache_s = statistics.median(chunk_times) - (statistics.median(times) if mode == "cached+buffers" else 0.0)
                cache_s = max(cache_s, 0.0)
            step_s = statistics.median(times)
            flops = step_flops(cfg, nt, nc, nl, 2, "joint" if mode == "joint" else "cached")
            label = weights if dtype != torch.float32 else "fp32 (dry run)"
            row = {"weights": label, "mode": mode, "step_ms": step_s * 1e3, "min_ms": min(times) * 1e3,
                   "tflops": flops / step_s / 1e12, "cache_ms": None if cache_s is None else cache_s * 1e3,
                   "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}
            if peak_tflops:
                row["mfu"] = row["tflops"] / peak_tflops
            rows.append(row)
        bb.use_context_kv_buffers(False)
        bb = kv = None   # the model goes before the next one is built
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def card_peak(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "CPU", None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, peak


def table(rows: list, device: str, name: str, peak: float | None, dry_run: bool, steps: int) -> str:
    shape = DRY if dry_run else FULL
    t, h, w = shape["grid"]
    head = [f"# One Wan-2.2-5B denoising step{' (CPU dry run: tiny stand-in)' if dry_run else ''}", "",
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {name}, torch {torch.__version__}, by "
            f"`python benchmarks/bench_wan5b_step.py{' --dry-run' if dry_run else ''}`. Random weights; CFG batch 2; "
            f"{t * h * w} target tokens, {shape['context']} context tokens, {shape['text']} text states; median "
            f"of {steps} steps (min in brackets). MFU against a dense bf16 peak of "
            f"{f'{peak:g} TFLOP/s' if peak else 'n/a (unknown card: --peak-tflops)'}; fp8 rows use the same "
            "bf16 peak. The cached row's context K/V build runs once per chunk, not per step.", "",
            "| weights | mode | step ms | TFLOP/s | MFU | context K/V once per chunk, ms | peak GiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "why" in r:
            head.append(f"| {r['weights']} | n/a | not run: {r['why']} | | | | |")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
        cache = f"{r['cache_ms']:.1f}" if r["cache_ms"] is not None else "-"
        peak_gib = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        head.append(f"| {r['weights']} | {r['mode']} | {r['step_ms']:.2f} ({r['min_ms']:.2f}) | {r['tflops']:.1f} | "
                    f"{mfu} | {cache} | {peak_gib} |")
    bf = {r["mode"]: r for r in rows if r.get("weights") == "bf16" and "why" not in r}
    f8 = {r["mode"]: r for r in rows if r.get("weights") == "fp8" and "why" not in r}
    for mode in ("cached", "cached+buffers", "joint"):
        if mode in bf and mode in f8:
            head.append(f"\n{mode}: fp8 / bf16 speed-up {bf[mode]['step_ms'] / f8[mode]['step_ms']:.2f}x")
    return "\n".join(head) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="a tiny stand-in on the CPU, to check the script")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (MFU)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    check_step_args(p, a, "the full-size 5B step needs")
    name, peak = card_peak(a.device)
    peak = a.peak_tflops or peak
    rows = run(a.device, a.steps, a.dry_run, peak)
    write_table(table(rows, a.device, name, peak, a.dry_run, a.steps), a.out, "wan5b_step", a.device, a.dry_run)
    return 0


def check_step_args(p: argparse.ArgumentParser, a, full_size: str) -> None:
    """``--steps``, ``--device`` and ``--dry-run`` of a step benchmark, each refused through ``p``
    (one line, exit 2); ``full_size`` begins the line refusing a full-size run on a CPU."""
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --dry-run on a CPU)")
    if a.device == "cpu" and not a.dry_run:
        p.error(f"{full_size} --device cuda; on a CPU use --dry-run")


def write_table(text: str, out, area: str, device: str, dry_run: bool) -> str:
    """Print a results table and write it to ``out`` (default ``<area>_<device>[_dry_run].md`` in the
    results folder's ``area``); returns the path."""
    path = out or str(results_dir(area) / f"{area}_{device}{'_dry_run' if dry_run else ''}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
