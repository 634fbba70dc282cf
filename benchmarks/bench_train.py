"""Training throughput: samples/s of ``python -m pfp.train`` with the built-in tiny config.

``python benchmarks/bench_train.py [--steps 40] [--threads 1 2] [--device cpu|cuda] [--workers N]`` runs, in fresh processes, each
mode at the batch size the built-in weights were trained with (pretrain 8, finetune 16; the
synthetic data of stages 6-8 of ``pfp/weights/default.json``; data rendered in one worker
process), and reports the median of the logged windows after the first (warm-up), from the run's
``loss.csv``. Writes ``train_<device>.md`` in the results folder (benchmarks/_results.py) (CUDA: bf16 autocast, pfp.train's default there).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _results import results_dir  # noqa: E402 - benchmarks/ is on sys.path (script dir or pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = {"pretrain": 8, "finetune": 16}


def run(mode: str, threads: int, steps: int, log_every: int = 5, device: str = "cpu", workers: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="pfp-bench-train-") as out:
        cmd = [sys.executable, "-m", "pfp.train", mode, "--init", os.path.join(ROOT, "pfp", "weights", "default.safetensors"),
               "--out", out, "--steps", str(steps), "--batch-size", str(BATCH[mode]), "--threads", str(threads),
               "--log-every", str(log_every), "--save-every", str(10 * steps), "--lora-rank", "0",
               "--sprite-radius", "0.16", "0.26", "--pattern-period", "0.35", "0.6", "--no-progress",
               "--device", device, "--workers", str(workers)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(r.stderr)
        with open(os.path.join(out, "loss.csv")) as f:
            rates = [float(row["samples_per_s"]) for row in csv.DictReader(f)]
    steady = rates[1:] or rates
    return {"mode": mode, "threads": threads, "workers": workers, "batch": BATCH[mode], "steps": steps,
            "median": statistics.median(steady), "max": max(steady)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, default=1, help="data worker processes")
    p.add_argument("--out", default=None, help="default train_<device>.md in the results folder (benchmarks/_results.py)")
    a = p.parse_args(argv)
    a.out = a.out or str(results_dir("train") / f"train_{a.device}.md")
    rows = [run(mode, t, a.steps, device=a.device, workers=a.workers) for t in a.threads for mode in ("pretrain", "finetune")]
    for r in rows:
        print(r, flush=True)
    if a.device == "cuda":
        import torch
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
        precision = "bf16 autocast (the CUDA default)"
    else:
        where, precision = f"CPU, {os.cpu_count()} cores", "fp32"
    lines = [f"# Training throughput on {where} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             "Built-in tiny config (`pfp/weights/default.json`), from the built-in weights, synthetic 4 s clips at "
             f"32x32 / 8 fps, full fine-tuning (no LoRA), {precision}; data rendered in {a.workers} worker "
             "process(es). Median and best of the 5-step windows after the first. "
             f"`python benchmarks/bench_train.py --device {a.device} --workers {a.workers} --steps {a.steps} "
             f"--threads {' '.join(map(str, a.threads))}`.", "",
             "| mode | threads | batch | samples/s (median) | samples/s (best) |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['threads']} | {r['batch']} | {r['median']:.1f} | {r['max']:.1f} |" for r in rows]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
