"""Memory plans (pfp.memory, pfp.offload): what each costs against the all-resident run, what the
planner estimates for Wan 2.2 TI2V-5B, and (CUDA) how its estimates compare with the allocator.

    python benchmarks/bench_memory.py [--device cpu|cuda] [--runs 3] [--skip-5b] [--dry-run]

Three tables, written to ``memory_<device>.md`` in the results folder (benchmarks/_results.py):

1. **Plans on a small Wan model** (diffusers transformer, 8 blocks of width 256, a small Wan VAE):
   generate 3 s with the plain run and with each plan; time against the plain run (same process,
   runs interleaved, best of ``--runs``), host-to-device bytes per chunk, and the video's largest
   difference from the plain one (0 = bit for bit). On CPU the "device" is the CPU, so a move is a
   memory copy: the table shows the cost of the mechanism, not of PCIe.
2. **The planner on the full-size Wan 2.2 TI2V-5B** (traced, no weights): for 80, 24, 12 and 8 GiB,
   the plan, its peak, the bytes it moves per chunk and its estimated time lost.
3. **CUDA only: a random-weight 5B** (no hub; 768x512, 4x4x2, 2 s, 8 steps): for the unlimited,
   24 GiB and 12 GiB plans, each phase's measured ``max_memory_allocated`` against the planner's
   estimate of the tensors (its peak less the allowance), and seconds per generated second.
   ``--dry-run`` runs this part on the CPU with a tiny stand-in of the same parts, to check the
   script without a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from _results import results_dir  # noqa: E402 - benchmarks/ is on sys.path (script dir or pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 1 << 30
STORY = [{"start": 0, "end": 1, "prompt": "a red circle on a blue background"},
         {"start": 1, "end": 3, "prompt": "a white square on a green background"}]
SMALL_PLANS = [
    ("plain (everything resident)", None),
    ("block offload", {"offload": "block"}),
    ("swap VAE / transformer", {"swap": True}),
    ("text encoder freed after the prompts", {"text": "free"}),
    ("text encoder on the CPU", {"text": "cpu"}),
    ("fp8 weights", {"weights": "fp8"}),
    ("fp8 context K/V", {"kv": "fp8"}),
    ("[context ; target] K/V buffers", {"kv": "buffer"}),
    ("2x2 tiled decode (exact for Wan's VAE)", {"decode": "tiled"}),
    ("4x4 tiled decode", {"decode": "tiled4"}),
    ("the 5B's 12 GiB plan: fp8, text on CPU", {"weights": "fp8", "text": "cpu"}),
    ("the 5B's 720p 12 GiB plan: fp8, swap, text on CPU, 2x2 tiled decode",
     {"weights": "fp8", "swap": True, "text": "cpu", "decode": "tiled"}),
    ("everything: fp8, block, swap, text on CPU, fp8 K/V",
     {"weights": "fp8", "offload": "block", "swap": True, "text": "cpu", "kv": "fp8"}),
]


def _save_wan_vae(path: str, base_dim: int, z_dim: int, dim_mult: list, seed: int = 0) -> None:
    from diffusers import AutoencoderKLWan
    torch.manual_seed(seed)
    AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=1,
                     temperal_downsample=[True] * (len(dim_mult) - 1)).eval().save_pretrained(path)


def small_model(vae_dir: str):
    """A small Wan model: 8 diffusers Wan blocks of width 256 over a 16-channel, 4x/4x Wan VAE."""
    from pfp.weights import PFPConfig, build_model
    cfg = PFPConfig(video_size=(64, 64), fps=8.0, chunk_frames=8, rate="2x2x2", compressor_hidden=(16, 32, 64),
                    context_mode="cached", vae={"kind": "wan", "path": vae_dir},
                    text={"kind": "tiny", "dim": 64, "max_length": 16, "num_layers": 1},
                    dit={"kind": "wan", "config": dict(patch_size=(1, 2, 2), num_attention_heads=4,
                                                       attention_head_dim=64, in_channels=16, out_channels=16,
                                                       text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=8,
                                                       rope_max_seq_len=64)})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.05)
        model.backbone.transformer.proj_out.weight.normal_(0, 0.02)
    return model.eval()


def table_small(device: str, runs: int) -> list:
    from pfp.generate import generate
    from pfp.offload import Placement
    from pfp.text import Storyboard
    story = Storyboard.from_list(STORY)
    with tempfile.TemporaryDirectory() as d:
        _save_wan_vae(os.path.join(d, "vae"), 16, 16, [1, 2, 4])
        models = {name: small_model(os.path.join(d, "vae")) for name, _ in SMALL_PLANS}
        times = {name: [] for name, _ in SMALL_PLANS}
        results = {}
        for _ in range(runs):                         # runs interleaved across the plans
            for name, choices in SMALL_PLANS:
                model = models[name]
                plan = None if choices is None else Placement(model, device, choices)
                t0 = time.perf_counter()
                res = generate(model, story, 3.0, steps=8, device=device, progress=False, plan=plan)
                times[name].append(time.perf_counter() - t0)
                results[name] = res
    plain = results[SMALL_PLANS[0][0]]
    base = min(times[SMALL_PLANS[0][0]])
    chunks = len(plain.timings)
    lines = ["| plan | time / plain | host-to-device per chunk | video max diff vs plain |",
             "| --- | ---: | ---: | ---: |"]
    for name, choices in SMALL_PLANS:
        res = results[name]
        diff = (res.video - plain.video).abs().max().item()
        moved = res.bytes_moved / chunks
        lines.append(f"| {name} | {min(times[name]) / base:.2f} | "
                     f"{moved / 2 ** 20:.1f} MiB | {'0 (bit for bit)' if diff == 0 else f'{diff:.2g}'} |")
    n_params = sum(p.numel() for p in models[SMALL_PLANS[0][0]].parameters())
    head = (f"Small Wan model ({n_params / 1e6:.1f} M parameters: 8 diffusers Wan blocks of width 256, a 16-channel "
            f"Wan VAE), 3 s of 64x64 at 8 fps in {chunks} chunks, 8 steps, CFG, cached context; plain run "
            f"{base:.2f} s (best of {runs}, runs interleaved across the plans).")
    return [head, ""] + lines


def table_5b() -> list:
    from pfp import memory
    trace = memory.trace_preset(memory.preset("wan22-ti2v-5b-480p"), history_seconds=20)
    lines = ["| budget | plan | peak | moved per chunk | est. time lost per chunk |", "| --- | --- | ---: | ---: | ---: |"]
    for budget in (80, 24, 12, 8):
        plan = memory.choose(trace, budget * GIB)
        what = ", ".join(f"{k}={v}" for k, v in plan.choices.items()) if plan.fits else "nothing fits"
        lines.append(f"| {budget} GiB | {what} | {plan.peak_bytes / GIB:.2f} GiB | "
                     f"{plan.bytes_moved_per_chunk / GIB:.1f} GiB | {plan.seconds_lost_per_chunk:.2f} s |")
    head = ("Planner on the full-size Wan 2.2 TI2V-5B preset `wan22-ti2v-5b-480p` (traced under FakeTensorMode, no "
            f"weights): 832x480, 24 fps, 1 s chunks ({trace.target_tokens} target tokens), 20 s of history at 4x4x2 "
            f"({trace.context_tokens} context tokens), 20 steps, CFG batch 2.")
    return [head, ""] + lines


# ------------------------------------------------------------------------------------------------
# a random-weight 5B on the device (or, with --dry-run, a tiny stand-in on the CPU)
# ------------------------------------------------------------------------------------------------
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    words = "a red green blue white circle square triangle on background and the".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def random_wan_model(device: str, dry_run: bool, size: tuple, folder: str):
    """A PFPModel with the 5B's parts (or tiny ones for a dry run) and random weights, built on
    ``device`` in bf16 without a hub or any weights file; returned on the CPU."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from pfp import memory
    from pfp.backbones import WanBackbone
    from pfp.model import PFPModel
    from pfp.text import UMT5TextEncoder
    from pfp.vae import WanVAE
    from pfp.weights import PFPConfig
    if dry_run:
        dit = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=48,
                   out_channels=48, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=3, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        vae_cfg = {**memory.WAN22_VAE, "base_dim": 8, "decoder_base_dim": 8}
        text_cfg = {**memory.UMT5_XXL, "vocab_size": 64, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1,
                    "num_heads": 4}
        hidden = (8, 8, 16, 16)
    else:
        dit, vae_cfg, text_cfg = dict(memory.WAN22_5B_TRANSFORMER), dict(memory.WAN22_VAE), dict(memory.UMT5_XXL)
        hidden = (64, 128, 256, 512)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # built, and randomly initialised, where it is fast
            torch.manual_seed(0)
            backbone = WanBackbone.from_config(context_mode="cached", **dit)
            vae_model = AutoencoderKLWan(**vae_cfg).eval()
            umt5 = UMT5EncoderModel(UMT5Config(**text_cfg)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        backbone.transformer.proj_out.weight.mul_(0.1)  # random heads: keep the latents finite
    vae_dir, text_dir = os.path.join(folder, "vae"), os.path.join(folder, "text")
    vae_model.save_config(vae_dir)                      # the config's factors come from config.json
    UMT5Config(**text_cfg).save_pretrained(text_dir)
    cfg = PFPConfig(video_size=size, fps=24.0, chunk_frames=24, rate="4x4x2", compressor_hidden=hidden,
                    context_mode="cached", vae={"kind": "wan", "path": vae_dir},
                    text={"kind": "umt5", "path": text_dir, "max_length": 512},
                    dit={"kind": "wan", "config": dit}, sample_cfg=5.0, sample_cfg_min_t=0.0)
    text = UMT5TextEncoder(umt5, _word_tokenizer(), max_length=512)
    model = PFPModel(cfg, backbone=backbone, vae=WanVAE(vae_model), text_encoder=text)
    model.compressor.to(device)
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.02)
    return model.cpu().eval()


def table_device_5b(device: str, dry_run: bool) -> list:
    from pfp import memory
    from pfp.generate import generate
    from pfp.text import Storyboard
    size, seconds, steps = ((128, 128) if dry_run else (512, 768)), 2.0, (2 if dry_run else 8)
    story = Storyboard.from_list(STORY)
    lines = ["| plan | choices | phase | measured peak | planner (tensors) | measured / planner | s per video s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as d:
        model = random_wan_model(device, dry_run, size, d)
        # one model for all three: each run leaves every part back on the CPU, and only the last
        # plan may store the blocks in fp8 (which is one-way)
        for budget in (None, 24 * GIB, 12 * GIB):
            plan = memory.plan_model(model, budget, seconds, size, steps)
            name = "unlimited" if budget is None else f"{budget // GIB} GiB"
            if not plan.fits:
                lines.append(f"| {name} | nothing fits | | | | | |")
                continue
            if device == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            res = generate(model, story, seconds, steps=steps, device=device, progress=False, plan=plan)
            per_s = (time.perf_counter() - t0) / seconds
            est = {p.name: (p.peak_bytes - memory.ALLOWANCE_BYTES) / (1 + memory.ALLOWANCE_FRACTION)
                   for p in plan.phases}
            est["compress"] = max(est["compress"], est["context_kv"])   # generate's compress = append + K/V
            last = res.timings[-1]
            what = ", ".join(f"{k}={v}" for k, v in plan.choices.items())
            for phase in ("compress", "denoise", "decode"):
                got = last.get(f"{phase}_peak_bytes")
                ratio = f"{got / est[phase]:.2f}" if got else "n/a (CPU)"
                lines.append(f"| {name} | {what} | {phase} | {got / GIB:.2f} GiB |" if got else
                             f"| {name} | {what} | {phase} | n/a |")
                lines[-1] += f" {est[phase] / GIB:.2f} GiB | {ratio} | {per_s:.2f} |"
            del res
    what = "tiny stand-in, CPU dry run" if dry_run else f"Wan 2.2 TI2V-5B parts, random bf16 weights, {device}"
    head = (f"{what}: {size[1]}x{size[0]}, 24 fps, {seconds:g} s in 1 s chunks, {steps} steps, CFG 5; the last chunk's "
            "phase peaks (compress = low-res re-encode + append + K/V of the new tokens).")
    return [head, ""] + lines


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-5b", action="store_true", help="skip the planner's 5B table (about 20 s)")
    p.add_argument("--dry-run", action="store_true", help="run the random-weight 5B part on the CPU with tiny parts")
    p.add_argument("--out", default=None, help="default memory_<device>.md in the results folder")
    a = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    if a.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    out = [f"# Memory plans on {where}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    out += ["## Plans on a small Wan model", ""] + table_small(a.device, a.runs) + [""]
    if not a.skip_5b:
        out += ["## The planner on Wan 2.2 TI2V-5B", ""] + table_5b() + [""]
    if a.device == "cuda" or a.dry_run:
        out += ["## Random-weight 5B: measured against planned", ""] + table_device_5b(a.device, a.dry_run) + [""]
    path = a.out or str(results_dir("memory") / f"memory_{a.device}{'_dry_run' if a.dry_run else ''}.md")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
