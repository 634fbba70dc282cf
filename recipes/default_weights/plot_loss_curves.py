"""Copy the loss logs of the run that made the built-in weights to benchmarks/results/ and plot them.

``python recipes/default_weights/plot_loss_curves.py [NAME=]RUN [[NAME=]RUN ...]`` reads each run's ``loss.csv``
(``RUN`` is a run directory written by ``python -m pfp.train``, or a loss CSV itself, e.g. one kept
here from an earlier stage), writes ``recipes/default_weights/results/loss/<NAME>_loss.csv`` (NAME
defaults to the run directory's name) and one PNG with a panel per stage, in the order given
(matplotlib; without it only the CSVs are written).
"""
from __future__ import annotations

import csv
import os
import shutil
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "loss")


def main(run_dirs):
    os.makedirs(RESULTS, exist_ok=True)
    stages = []
    for arg in run_dirs:
        name, _, d = arg.rpartition("=")
        src = d if d.endswith(".csv") else os.path.join(d, "loss.csv")
        name = name or os.path.basename(os.path.normpath(d)).replace("default_", "")
        dst = os.path.join(RESULTS, f"{name}_loss.csv")
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
        with open(src) as f:
            rows = list(csv.DictReader(f))
        stages.append((name, [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
                       [float(r["samples_per_s"]) for r in rows]))
        print(f"{dst}: {len(rows)} rows, last loss {rows[-1]['loss']}, elapsed {rows[-1]['elapsed_s']} s")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: CSVs only")
        return
    cols = min(6, len(stages))                      # panels wrap onto rows of six
    rows_ = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.5 * rows_), squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.set_visible(False)
    for ax, (name, steps, loss, _) in zip(axes.flat, stages):
        ax.plot(steps, loss, lw=0.6, alpha=0.4, label="logged")
        k = 10
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        ax.set_title(f"{name} (flow-matching velocity MSE)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = os.path.join(RESULTS, "loss.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
