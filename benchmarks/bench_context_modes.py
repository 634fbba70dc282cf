"""Cached against joint context mode: denoising time and memory per chunk.

Two shapes:

- ``tiny``: the built-in model's backbone as stage 16 shipped it (inner 128, 4 blocks, 4 heads; the
  built-in weights now have 8 blocks), a 32x32 chunk of 4 frames
  (64 target tokens) after 20 s of history at 8 fps (rate 1x1x2: 80 x 4 x 4 = 1280 context tokens),
  16 steps, CFG (batch 2).
- ``wan5b-layer``: one Wan-2.2-5B-shaped block (inner 3072 = 24 heads x 128, FFN 14336, text
  cross-attention over 512 states), timed as it runs inside a deep model, with
  5460 context + 2340 target tokens (the paper's 20 s 480p history at 4x4x2 and a 2340-token
  chunk). On CPU it runs in fp32 at ``--scale`` of the token counts (default 1/4: 1365 + 585) and
  2 steps, so that it finishes (``--scale 1 --steps 1`` is the full shape, minutes on 2 cores); on
  CUDA at full scale in bf16, 8 steps.

Per chunk: ``cached`` computes the context K/V once (listed separately) and then every step runs
only the target tokens; ``joint`` runs context + target tokens through every block at every step
(the paper's mode). Memory: the peak CUDA allocation above the weights and inputs; on CPU, in a
fresh process per measurement, the peak resident set above the resident set once the weights and
inputs are built (the kernel's peak-RSS counter is reset through /proc/self/clear_refs), so weights
and inputs are excluded there too.

Run: ``python benchmarks/bench_context_modes.py [--shape tiny|wan5b-layer|all] [--device cpu|cuda]``
writes ``context_modes_<device>.md`` in the results folder (benchmarks/_results.py); ``pytest benchmarks/bench_context_modes.py
--benchmark-only`` times one denoising step of each mode at the tiny shape.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from _results import results_dir  # noqa: E402 - benchmarks/ is on sys.path (script dir or pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _Ctx:
    def __init__(self, tokens, positions):
        self.tokens, self.positions = tokens, positions


def _positions(frames, h, w, rt=2):
    j = torch.arange(frames, dtype=torch.float32) * rt - (rt - 1) / 2
    g = torch.stack(torch.meshgrid(j, torch.arange(h) * 2 + 0.5, torch.arange(w) * 2 + 0.5, indexing="ij"), -1)
    return g.reshape(-1, 3)


def build(shape: str, mode: str, device: str, scale: float, steps=None):
    from pfp.backbones import TinyDiT
    torch.manual_seed(0)
    if shape == "tiny":
        bb = TinyDiT(latent_channels=48, inner_dim=128, depth=4, num_heads=4, mlp_ratio=3.0, text_dim=64,
                     freq_dim=64, context_mode=mode)
        ctx_grid, tgt = (80, 4, 4), (4, 8, 8)            # 1280 context tokens; latent 4x8x8 -> 64 tokens
        text_len, text_dim, steps_default, dtype = 24, 64, 16, torch.float32
    else:
        bb = TinyDiT(latent_channels=48, inner_dim=3072, depth=1, num_heads=24, mlp_ratio=14336 / 3072,
                     text_dim=4096, freq_dim=256, context_mode=mode, prediction="velocity")
        # 5460 = 60 x 7 x 13 context tokens; 2340 target tokens = 10 x 13 x 18 (latent 10 x 26 x 36)
        t_ctx = max(1, round(60 * scale))
        t_tgt = max(1, round(10 * scale))
        ctx_grid, tgt = (t_ctx, 7, 13), (t_tgt, 26, 36)
        text_len, text_dim = 512, 4096
        steps_default = 2 if device == "cpu" else 8
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = steps or steps_default
    bb = bb.to(device=device, dtype=dtype).eval()
    ctx = _Ctx(torch.randn(1, ctx_grid[0] * ctx_grid[1] * ctx_grid[2], bb.inner_dim, device=device, dtype=dtype),
               _positions(*ctx_grid).to(device))
    x = torch.randn(1, 48, *tgt, device=device, dtype=dtype)
    text = torch.randn(2, text_len, text_dim, device=device, dtype=dtype)
    return bb, ctx, x, text, steps


@torch.no_grad()
def denoise_chunk_one_layer(bb, ctx, x, text, steps):
    """One block of the model as it runs inside a deep one (its context outputs are needed by the next
    block), CFG batch 2: joint runs context + targets at every step; cached computes the block's
    context K/V once, then each step runs the targets only. Returns (kv_s, steps_s)."""
    from pfp.backbones.rope import grid_positions, rope_cos_sin
    from pfp.backbones.wan_style import _frame_runs
    from pfp.compressor import order_keys
    blk = bb.blocks[0]
    b, grid = 2, bb.token_grid(*x.shape[2:])
    ht = bb.patch_embedding(torch.cat([x, x])).flatten(2).transpose(1, 2)
    txt = bb.embed_text(text)
    _, mod_t = bb.embed_time(torch.full((b, 1), 0.5, device=x.device))
    mod_c = bb._context_modulation(x)
    rope_t = rope_cos_sin(grid_positions(*grid, t_start=1000.0, device=x.device), bb.head_dim)
    rope_c = rope_cos_sin(ctx.positions, bb.head_dim)
    frames = _frame_runs(order_keys(ctx, ctx.tokens.shape[1]))   # as the backbone finds them
    _sync(x)
    t0 = time.perf_counter()
    kv = None
    if bb.context_mode == "cached":
        _, _, kv = blk(ctx.tokens, None, mod_c, None, None, None, rope_c, None, None, False, True, frames)
    _sync(x)
    t1 = time.perf_counter()
    for _ in range(steps):
        if bb.context_mode == "cached":
            blk(None, ht, None, mod_t, txt, None, None, rope_t, kv, False, False, None)
        else:
            blk(ctx.tokens.expand(b, -1, -1), ht, mod_c, mod_t, txt, None, rope_c, rope_t, None, True, True, frames)
    _sync(x)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def denoise_chunk(bb, ctx, x, text, steps):
    """One chunk as the sampler runs it: CFG batch of 2, ``steps`` Euler steps. Returns (kv_s, steps_s)."""
    if len(bb.blocks) == 1:
        return denoise_chunk_one_layer(bb, ctx, x, text, steps)
    t0 = time.perf_counter()
    context = bb.cache_context(ctx) if bb.context_mode == "cached" else ctx
    _sync(x)
    t1 = time.perf_counter()
    xx = torch.cat([x, x])
    for i in range(steps):
        t = torch.full((2,), 1 - i / steps, device=x.device)
        v = bb(xx, t, text, context, t_start=1000.0)
        xx = xx - v / steps
    _sync(x)
    return t1 - t0, time.perf_counter() - t1


def _sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(shape: str, mode: str, device: str, scale: float, steps=None) -> dict:
    bb, ctx, x, text, steps = build(shape, mode, device, scale, steps)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # CPU: glibc keeps freed heap pages, so the resident set after a warm-up already holds its peak;
    # the baseline is therefore taken before the warm-up (weights and inputs resident).
    cpu_peak_reset = device == "cpu" and _reset_peak_rss()
    rss_base = _rss_mib("VmRSS") if cpu_peak_reset else 0.0
    denoise_chunk(bb, ctx, x, text, 1)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kv_s, steps_s = denoise_chunk(bb, ctx, x, text, steps)
    out = {"shape": shape, "mode": mode, "device": device, "context_tokens": ctx.tokens.shape[1],
           "target_tokens": x.shape[2] * x.shape[3] * x.shape[4] // 4, "steps": steps,
           "context_kv_s": kv_s if mode == "cached" else 0.0, "steps_s": steps_s,
           "per_step_s": steps_s / steps, "chunk_s": kv_s + steps_s}
    if device == "cuda":
        out["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out["mem_kind"] = "peak CUDA allocation above the weights"
    elif cpu_peak_reset:
        out["peak_mem_mib"] = _rss_mib("VmHWM") - rss_base
        out["mem_kind"] = "peak resident set above the resident set before the first chunk (weights and inputs excluded)"
    else:
        out["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["mem_kind"] = "peak RSS of the process (weights included: /proc/self/clear_refs unavailable)"
    return out


def _one(shape, mode, device, scale, threads, steps=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", shape, mode, "--device", device, "--scale", str(scale)]
    if steps:
        cmd += ["--steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="all", choices=["tiny", "wan5b-layer", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=None, help="token-count scale of the wan5b layer (CPU default 0.25)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of the wan5b layer (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    scale = a.scale if a.scale is not None else (1.0 if a.device == "cuda" else 0.25)
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.device, scale, a.steps if a.one[0] != "tiny" else None)))
        return
    shapes = ["tiny", "wan5b-layer"] if a.shape == "all" else [a.shape]
    rows = []
    for shape in shapes:
        for mode in ("joint", "cached"):
            r = _one(shape, mode, a.device, scale, a.threads, a.steps)
            rows.append(r)
            print(json.dumps(r), flush=True)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    lines = [f"# Context modes: denoising cost per chunk ({dev}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "CFG batch 2. cached = context K/V once per chunk + steps over target tokens only; "
             "joint = context + targets through every block at every step.", "",
             "| shape | mode | context tok | target tok | steps | context K/V s | steps s | s/step | chunk s | "
             "joint/cached | memory MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        ratio = ""
        if r["mode"] == "cached":
            j = rows[i - 1]
            ratio = f"{j['chunk_s'] / r['chunk_s']:.2f}x"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['context_tokens']} | {r['target_tokens']} | {r['steps']} | "
                     f"{r['context_kv_s']:.3f} | {r['steps_s']:.3f} | {r['per_step_s']:.3f} | {r['chunk_s']:.3f} | "
                     f"{ratio} | {r['peak_mem_mib']:.0f} |")
    lines += ["", f"Memory: {rows[0]['mem_kind']}."]
    for i in range(1, len(rows), 2):
        j, c = rows[i - 1], rows[i]
        if j["steps"] != 20:
            pj = 20 * j["per_step_s"]
            pc = c["context_kv_s"] + 20 * c["per_step_s"]
            lines += ["", f"{c['shape']} at 20 steps per chunk (from the measured per-step times): joint {pj:.1f} s, "
                          f"cached {c['context_kv_s']:.1f} + 20 x {c['per_step_s']:.2f} = {pc:.1f} s ({pj / pc:.2f}x)."]
    out = a.out or str(results_dir("context_modes") / f"context_modes_{a.device}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---- pytest-benchmark: one denoising step of each mode at the tiny shape ---------------------------
def _step_fixture(mode):
    bb, ctx, x, text, _ = build("tiny", mode, "cpu", 1.0)
    context = bb.cache_context(ctx) if mode == "cached" else ctx
    xx = torch.cat([x, x])
    t = torch.full((2,), 0.5)

    @torch.no_grad()
    def step():
        return bb(xx, t, text, context, t_start=1000.0)
    return step


def test_tiny_denoise_step_joint(benchmark):
    benchmark(_step_fixture("joint"))


def test_tiny_denoise_step_cached(benchmark):
    benchmark(_step_fixture("cached"))


if __name__ == "__main__":
    main()
