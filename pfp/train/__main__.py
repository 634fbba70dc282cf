"""``python -m pfp.train pretrain|finetune [options]``; ``--help`` lists them."""
from __future__ import annotations

import dataclasses
import sys

from pfp._cli import Parser, run_cli
from pfp.memory import PRESETS

from .loop import CROPS, MODES, STORYBOARD_POLICIES, TrainArgs


def _parser() -> Parser:
    d = TrainArgs()
    p = Parser(prog="python -m pfp.train", description=(
        "pretrain: frame retrieval (random frame set, noise-as-mask, flow matching on the retrieved frames); "
        "finetune: next-chunk generation from the compressed history with LoRA on the backbone."))
    p.add_argument("mode", choices=MODES)
    p.add_argument("--out", default=d.out, help="run folder: checkpoints/step-N/, loss.csv (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--compressor-lr", type=float, default=d.compressor_lr,
                   help="the compressor's own peak learning rate, on the same schedule (default: --lr); e.g. "
                        "larger for a fresh compressor over a pretrained backbone")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine"])
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank on the backbone; 0 = train it fully (default: 0 pretrain, 128 finetune)")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--freeze-compressor", action="store_true", help="finetune: keep the compressor fixed")
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder fixed")
    p.add_argument("--init-skip", default=None, metavar="PREFIX",
                   help="ignore --init's tensors under PREFIX (or matching a glob): those modules start fresh "
                        "(e.g. 'compressor.' finetunes without the pretrained compressor)")
    p.add_argument("--init-new", default=None, metavar="PREFIX",
                   help="tensors under PREFIX (or matching a glob, e.g. 'backbone.blocks.*.memory_attn.*' for "
                        "cross_attention) may be absent from --init (modules added since; keep their init)")
    p.add_argument("--init", default=None, help="start from these weights (.safetensors, a checkpoint dir or "
                   "a run dir); without --config, its config too")
    p.add_argument("--config", default=None, help="model config JSON, or a preset of a real model with "
                   f"--model-dir ({', '.join(PRESETS)}); default: --init's config, else the built-in tiny config")
    p.add_argument("--model-dir", default=None, help="a preset's local diffusers pipeline folder")
    p.add_argument("--rate", default=None, help="with --config: another compression rate, e.g. 2x2x2")
    p.add_argument("--context-mode", default=None, choices=["joint", "cached"])
    p.add_argument("--data", default=d.data, help="'synthetic' or a folder of videos with JSON storyboards")
    p.add_argument("--clip-seconds", type=float, default=d.clip_seconds)
    p.add_argument("--bad-data", default=d.bad_data, choices=["skip", "error"],
                   help="video folder: unusable files (undecodable, too short, no storyboard) are checked before "
                        "step 1 and skipped with a one-line report, or refused (default %(default)s)")
    p.add_argument("--crop", default=d.crop, choices=CROPS,
                   help="video folder: each clip scaled by a random zoom in [1, --max-zoom] and cropped at a random "
                        "place, or scaled to cover the video size and center-cropped (default %(default)s); clips "
                        "start at random times either way")
    p.add_argument("--max-zoom", type=float, default=d.max_zoom,
                   help="video folder, --crop random: the largest zoom over the cover scale (>= 1; default %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="video folder: mirror half the clips left to right, at random (off by default: prompts "
                        "that name a side no longer match)")
    p.add_argument("--mix-synthetic", type=float, default=d.mix_synthetic, metavar="P",
                   help="video folder: replace each clip, with probability P in [0, 1), by a synthetic multi-shot "
                        "scene (--sprite-radius, --pattern-period, --shot-seconds, --num-videos; default %(default)s)")
    p.add_argument("--storyboards", default=d.storyboards, choices=STORYBOARD_POLICIES,
                   help="video folder: a video without <name>.json is unusable, or gets one shot of the prompt "
                        "'a video' (default %(default)s)")
    p.add_argument("--num-videos", type=int, default=d.num_videos, help="synthetic videos to draw from")
    p.add_argument("--sprite-radius", type=float, nargs=2, default=d.sprite_radius, metavar=("MIN", "MAX"),
                   help="synthetic data: sprite radius range, units of min(H, W) (default %(default)s)")
    p.add_argument("--pattern-period", type=float, nargs=2, default=d.pattern_period, metavar=("MIN", "MAX"),
                   help="synthetic data: stripe/checker period range, units of min(H, W) (default %(default)s)")
    p.add_argument("--shot-seconds", type=float, nargs=2, default=d.shot_seconds, metavar=("MIN", "MAX"),
                   help="synthetic data: shot length range in seconds; a clip returns to an earlier scene only "
                        "when it holds 3 or more shots, so MIN at least half of --clip-seconds (and half a frame "
                        "more: lengths round to frames) trains without returns (default %(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint (step 0 if none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that already holds a run (deletes its checkpoints and loss.csv)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K",
                   help="checkpoints kept in OUT/checkpoints; older ones are deleted after each save (default %(default)s)")
    p.add_argument("--skip-nonfinite", type=int, default=d.skip_nonfinite, metavar="N",
                   help="skip up to N steps whose loss or gradient is NaN/Inf before stopping (default %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the backbone with FSDP2")
    p.add_argument("--export", default=None, help="write merged weights (.safetensors) here at the end")
    p.add_argument("--export-dtype", default=d.export_dtype, choices=["fp32", "bf16"])
    p.add_argument("--max-retrieve", type=int, default=d.max_retrieve, help="pretrain: max frames in Omega")
    p.add_argument("--p-uncond", type=float, default=d.p_uncond, help="prompt dropout for CFG")
    p.add_argument("--t-shift", type=float, default=d.t_shift,
                   help="shift of the logit-normal training timesteps (>1 trains more at high noise)")
    p.add_argument("--p-no-history", type=float, default=d.p_no_history,
                   help="finetune: extra probability of a first chunk (no history)")
    p.add_argument("--history-noise", type=float, default=d.history_noise,
                   help="finetune: noise the history to a random level in [0, this] before compression, "
                        "so the model learns to follow imperfect (generated) histories (default %(default)s)")
    p.add_argument("--t-weight-power", type=float, default=d.t_weight_power,
                   help="weight each sample's loss by max(t, min_t) ** this (min_t: the backbone's floor, 0.05 "
                        "for the tiny DiT): 0 = velocity MSE, 2 = MSE of the implied clean latent, which trains "
                        "the noisy, scene-layout steps harder (default %(default)s)")
    p.add_argument("--t-uniform", type=float, default=d.t_uniform,
                   help="fraction of training timesteps drawn uniform in (0, 1) instead of shifted logit-normal, "
                        "so the nearly clean steps that draw fine detail get trained even at a large --t-shift "
                        "(default %(default)s)")
    p.add_argument("--self-history", type=float, default=d.self_history,
                   help="finetune: chance that a history's newest chunk is replaced by the model's own one-step "
                        "estimate of it, so that it learns to correct its own errors instead of copying them "
                        "into the next chunk (default %(default)s)")
    p.add_argument("--self-history-t", type=float, nargs=2, default=d.self_history_t, metavar=("LO", "HI"),
                   help="noise levels the --self-history estimates start from, uniform in [LO, HI]: higher "
                        "gives rougher chunks (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="data worker processes (0: none)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much wall time (checkpoint and export as at the last step)")
    p.add_argument("--until", type=int, default=None,
                   help="stop after this step (the LR schedule still spans --steps); reproduces a --max-minutes run")
    p.add_argument("--vram", default=None, help="device memory budget with a unit, e.g. 12GiB: train under the "
                   "memory plan that fits it (text encoder on the CPU, VAE and transformer swapped; gradient "
                   "checkpointing on)")
    p.add_argument("--plan", action="store_true", help="print the memory plan (with --vram: the one chosen; "
                   "without: the plain run's) and stop")
    p.add_argument("--text-cache", default=d.text_cache,
                   help="host memory for each prompt's text states, computed once when the text encoder does not "
                        "train (it then runs once per distinct prompt, not every step); 0 turns it off "
                        "(default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _given_flags(parser, argv) -> frozenset:
    """The TrainArgs fields the command line sets (whatever their values): the parse again, with
    every default suppressed."""
    import argparse
    import copy
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(quiet.parse_args(argv)))
    if "no_progress" in given:
        given.add("progress")
    return frozenset(given)


def main(argv=None) -> int:
    def body() -> int:
        parser = _parser()
        ns = parser.parse_args(argv)
        kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs) if hasattr(ns, f.name)}
        kwargs["progress"] = not ns.no_progress
        kwargs["given"] = _given_flags(parser, argv)   # what --resume takes from the run: the rest
        from .loop import train
        summary = train(TrainArgs(**kwargs))  # checks every argument and path before any work
        if summary["rank"] == 0 and not ns.plan:
            print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, "
                  f"{summary['samples_per_s']:.2f} samples/s")
        return 0
    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
