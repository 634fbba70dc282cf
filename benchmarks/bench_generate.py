"""Wall time of ``python -m pfp.generate`` (built-in model and storyboard), split per chunk into
compress / denoise / decode.

- compress: the new chunk's frames to low res / low fps, re-encoded by the VAE, ``stream.append``
  (only the new chunk), and in cached mode the K/V of the new context tokens;
- denoise: the sampler's steps for the chunk (batch 2 at the guided steps, 1 at the unguided ones);
- decode: the VAE decode of the chunk.

Run: ``python benchmarks/bench_generate.py [--threads N] [--runs 3] [--device cpu|cuda]`` writes
``generate_<device>.md`` in the results folder (benchmarks/_results.py) (the command's total wall time includes Python start-up,
imports and the mp4 encode). ``pytest benchmarks/bench_generate.py --benchmark-only`` times one
chunk in-process.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

from _results import results_dir  # noqa: E402 - benchmarks/ is on sys.path (script dir or pytest)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_cli(extra, threads=None):
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pfp.generate", "--out", os.path.join(d, "v.mp4"), "--timings",
               os.path.join(d, "t.csv"), "--quiet", *extra]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(r.stderr)
        with open(os.path.join(d, "t.csv")) as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return wall, rows


def run_inprocess(device: str):
    """The same run as the command, in this process through ``pfp.generate.generate`` (where PyAV,
    which writes the mp4, is missing): the built-in model and storyboard at the command's defaults.
    The wall time then leaves out start-up, imports and the mp4 encode."""
    import torch
    from pfp.generate import BUILTIN_STORYBOARD, _parser, generate
    from pfp.text import Storyboard
    from pfp.weights import load_weights
    ns = _parser().parse_args(["--out", "unused.mp4"])
    t0 = time.perf_counter()
    model = load_weights()
    if device == "cpu":
        torch.set_num_threads(1)   # as the command does for the built-in model
    story = Storyboard.from_list(BUILTIN_STORYBOARD)
    res = generate(model, story, story.duration, seed=ns.seed, steps=ns.steps, device=device, progress=False)
    rows = [{k: float(v) for k, v in row.items() if not isinstance(v, str)} for row in res.timings]
    return time.perf_counter() - t0, rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="default generate_<device>.md in the results folder (benchmarks/_results.py)")
    a = p.parse_args(argv)
    a.out = a.out or str(results_dir("generate") / f"generate_{a.device}.md")
    import importlib.util
    cli = importlib.util.find_spec("av") is not None   # the command writes an mp4 through PyAV
    results = [run_cli(["--device", a.device], a.threads) if cli else run_inprocess(a.device) for _ in range(a.runs)]
    best = min(results, key=lambda r: r[0])
    walls = sorted(r[0] for r in results)
    rows = best[1]
    threads = a.threads or "default: 1 for the built-in model"
    if a.device == "cuda":
        import torch
        where, what = f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "`--device cuda`"
    else:
        where, what = f"CPU ({os.cpu_count()} cores, threads {threads}", "no arguments"
        where += ")"
    lines = [f"# `python -m pfp.generate` ({what}) on {where}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Built-in model and storyboard: 4 s, 32x32, 8 fps, 8 chunks of 4 frames, 16 steps, {guidance()}. "
             f"Total wall time of the command over {a.runs} runs: {', '.join(f'{w:.1f}' for w in walls)} s "
             + ("(best run below; includes start-up, imports, mp4 encode)." if cli else
                "(best run below; PyAV is not installed here, so generate() ran in-process: the model's load "
                "is included, start-up, imports and the mp4 encode are not)."), "",
             "| chunk | context tokens before | compress s | denoise s | decode s |", "|---|---|---|---|---|"]
    prev = 0
    for r in rows:
        lines.append(f"| {int(r['chunk'])} | {prev} | {r['compress_s']:.3f} | {r['denoise_s']:.3f} | {r['decode_s']:.4f} |")
        prev = int(r["context_tokens"])
    tot = {k: sum(r[k] for r in rows) for k in ("compress_s", "denoise_s", "decode_s")}
    lines.append(f"| total | | {tot['compress_s']:.3f} | {tot['denoise_s']:.3f} | {tot['decode_s']:.4f} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def guidance() -> str:
    """The built-in config's guidance, as the table's caption states it."""
    from pfp.weights import load_weights
    cfg = load_weights().config
    if cfg.sample_cfg_min_t > 0:
        return f"CFG {cfg.sample_cfg:g} at the steps with t > {cfg.sample_cfg_min_t:g}, none below"
    return f"CFG {cfg.sample_cfg:g}"


def test_generate_one_chunk(benchmark):
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.weights import DEFAULT_WEIGHTS, build_model, load_weights
    model = load_weights() if os.path.isfile(DEFAULT_WEIGHTS) else build_model()
    sb = Storyboard.single("a red circle on a blue background", 0.5)
    benchmark(lambda: generate(model, sb, 0.5, steps=16, progress=False))  # the config's sampler settings


if __name__ == "__main__":
    main()
