"""One denoising step of the larger base models at 480p: Wan 2.2 A14B (one expert) and HunyuanVideo 13B.

    python benchmarks/bench_model_step.py [--model a14b hunyuanvideo] [--steps 5] [--dry-run]

Each model is built full size with random weights directly on the device in bf16 (no hub, no
fp32 copy) and driven through its PFP backbone in cached mode, at the shapes the memory planner's
presets use (``pfp.memory.PRESETS``, 20 s of history at rate 4x4x2):

- ``a14b``: one of Wan 2.2 A14B's two 14 B experts (a step runs one; they have the same shape);
  832x480 at 16 fps, a 1 s chunk of 4 x 30 x 52 = 6240 target tokens, 3822 context tokens, 512
  text states, classifier-free guidance (batch 2);
- ``hunyuanvideo``: the 13 B transformer (20 dual- and 40 single-stream blocks); 848x480 at 24 fps,
  6 x 30 x 53 = 9540 target tokens, 5733 context tokens, 256 Llama states + the pooled CLIP vector,
  embedded guidance (batch 1).

It reports the step's median time, the context K/V build (once per chunk) and the peak memory
allocated during the steps (weights, K/V and activations). ``--dry-run`` runs the same code on the
CPU with tiny stand-ins, to check the script without a GPU. Results: ``model_step_<device>.md``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

from bench_wan5b_step import _sync, card_peak, check_step_args, time_steps, write_table  # noqa: E402 - benchmarks/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODELS = ("a14b", "hunyuanvideo")
# (latent token grid of one chunk, context tokens, text states, CFG batch)
SHAPES = {"a14b": ((4, 30, 52), 3822, 512, 2), "hunyuanvideo": ((6, 30, 53), 5733, 256, 1)}
DRY_SHAPES = {"a14b": ((2, 3, 4), 30, 8, 2), "hunyuanvideo": ((2, 3, 4), 30, 8, 1)}


def build(model: str, device: str, dtype: torch.dtype, dry_run: bool):
    """The backbone, built on ``device`` in ``dtype`` with random weights, and its text width."""
    from pfp import memory
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)   # built in dtype: no full-precision copy of 14 B parameters
        with torch.device(device):
            if model == "a14b":
                from pfp.backbones import WanBackbone
                cfg = dict(memory.WAN22_A14B_TRANSFORMER)
                if dry_run:
                    cfg.update(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32)
                return WanBackbone.from_config(context_mode="cached", **cfg).eval(), cfg["text_dim"]
            from pfp.backbones.hunyuan_video import HunyuanVideoBackbone
            cfg = dict(memory.HUNYUAN_VIDEO_TRANSFORMER)
            if dry_run:
                cfg.update(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_single_layers=1,
                           num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16,
                           rope_axes_dim=(8, 12, 12))
            return HunyuanVideoBackbone.from_config(context_mode="cached", **cfg).eval(), cfg["text_embed_dim"]
    finally:
        torch.set_default_dtype(previous)


def run(model: str, device: str, steps: int, dry_run: bool) -> dict:
    from pfp.backbones import grid_positions
    from pfp.compressor import Context
    (t, h, w), nc, n_text, batch = (DRY_SHAPES if dry_run else SHAPES)[model]
    dtype = torch.float32 if (dry_run and device == "cpu") else torch.bfloat16
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bb, text_dim = build(model, device, dtype, dry_run)
    weights_gib = sum(p.numel() * p.element_size() for p in bb.parameters()) / 2 ** 30
    g = torch.Generator(device="cpu").manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    pt, ph, pw = bb.patch_size
    x = r(batch, bb.latent_channels, t * pt, h * ph, w * pw)
    text = r(batch, n_text + (1 if model == "hunyuanvideo" else 0), text_dim)   # HunyuanVideo: pooled as token 0
    ts = torch.full((batch,), 0.7, device=device)
    frames = -(-nc // (h * w))
    positions = grid_positions(frames, h, w, device=device)[:nc]
    ctx = Context(r(1, nc, bb.inner_dim), positions)
    with torch.no_grad():
        cache_s = statistics.median(time_steps(lambda: bb.cache_context(ctx), device, 2))
        kv = bb.cache_context(ctx)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(lambda: bb(x, ts, text, kv, t_start=float(frames)), device, steps)
    _sync(device)
    return {"model": model, "weights_gib": weights_gib, "kv_gib": kv.nbytes() / 2 ** 30,
            "target": t * h * w, "context": nc, "text": n_text, "batch": batch,
            "step_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "cache_ms": cache_s * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None}


def table(rows: list, name: str, dry_run: bool, steps: int) -> str:
    lines = [f"# One denoising step of the larger base models{' (CPU dry run: tiny stand-ins)' if dry_run else ''}",
             "", f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {name}, torch {torch.__version__}, by "
             f"`python benchmarks/bench_model_step.py{' --dry-run' if dry_run else ''}`. Random weights in {'fp32' if dry_run else 'bf16'}, "
             f"cached context; median of {steps} steps (min in brackets); peak: memory allocated during the steps.",
             "", "| model | weights GiB | target tokens | context tokens | text | batch | step ms | context K/V once "
             "per chunk, ms | K/V GiB | peak GiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "why" in r:
            lines.append(f"| {r['model']} | not run: {r['why']} | | | | | | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['weights_gib']:.2f} | {r['target']} | {r['context']} | {r['text']} | "
                     f"{r['batch']} | {r['step_ms']:.1f} ({r['min_ms']:.1f}) | {r['cache_ms']:.1f} | "
                     f"{r['kv_gib']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dry-run", action="store_true", help="tiny stand-ins on the CPU, to check the script")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    check_step_args(p, a, "the full-size models need")
    name, _ = card_peak(a.device)
    rows = []
    for model in a.model:
        try:
            rows.append(run(model, a.device, a.steps, a.dry_run))
        except torch.OutOfMemoryError as exc:   # say so in the table; the other model still runs
            rows.append({"model": model, "why": f"out of memory ({str(exc).splitlines()[0]})"})
        if a.device == "cuda":
            torch.cuda.empty_cache()
    write_table(table(rows, name, a.dry_run, a.steps), a.out, "model_step", a.device, a.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
