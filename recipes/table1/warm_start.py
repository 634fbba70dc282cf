"""Warm-start an HR-only compressor (``without_lr``, ``large_patchify``) from the low-res branch's tokens.

The HR-only variants have no low-res branch: their conv stages start from random weights, and the
backbone must learn to read their tokens from scratch, while ``only_lr`` and the proposed
compressor hand it its own patch embedding of the low-res video from the first step. This script
removes that head start: it fits the HR branch (the conv + SiLU stages and projection of
``without_lr``, the one patchify conv of ``large_patchify``) by mean squared error to the tokens
``only_lr`` would give for the same clip (the backbone's patch embedding of the low-res latent,
which stays fixed), on the training clips, with a share of the frames noised as frame-retrieval
pretraining masks them. It runs the compressor only (no backbone), so a step costs a fraction of a
pretraining step. The result is an ``--init`` file for ``pfp.train pretrain``, given without
``--init-skip``:

    python recipes/table1/warm_start.py --config recipes/table1/configs/without_lr_4x4x2.json \\
        --init runs/table1/init.safetensors --data runs/table1/clips/train --steps 600 \\
        --out runs/table1/warm/without_lr_4x4x2.safetensors

The token an HR-only compressor gives for frame pair (2j, 2j+1) reads HR frames up to 2j (it is
causal), while the low-res latent of ``lr_phase: "end"`` is frame 2j+1, so the fit cannot be exact
(relative error 0.1-0.2 after 600 steps in the recipe).
"""
from __future__ import annotations

import argparse
import math
import sys
import time


WARMED = ("without_lr", "large_patchify")   # the kinds whose tokens come from the HR latent alone


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a without_lr or large_patchify config (JSON)")
    p.add_argument("--init", required=True, help="weights to start from; their compressor is left out")
    p.add_argument("--data", required=True, help="folder of training videos")
    p.add_argument("--out", required=True, help="the .safetensors file to write (the whole model)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's peak learning rate, cosine to 0 (default %(default)s)")
    p.add_argument("--mask", type=float, default=0.5,
                   help="share of frames noised to a random level, as pretraining masks them (default %(default)s)")
    p.add_argument("--clip-seconds", type=float, default=2.0, help="clip length (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ns = _parser().parse_args(argv)
    if ns.steps < 1 or ns.batch_size < 1 or not (ns.lr > 0) or not (0 <= ns.mask <= 1):
        return _fail("--steps and --batch-size must be >= 1, --lr > 0 and --mask in [0, 1]")
    import torch
    import torch.nn.functional as F

    from pfp import MemoryCompressor
    from pfp.config import PFPConfig, whole_chunks
    from pfp.data import VideoFolderDataset, collate, draw_item
    from pfp.model import build_model
    from pfp.train.loop import _load_init
    from pfp.train.objectives import low_res_levels, shifted_logit_normal
    from pfp.weights import save_weights

    try:
        config = PFPConfig.load(ns.config)
    except (OSError, ValueError) as exc:
        return _fail(f"--config {ns.config}: {exc}")
    if config.compressor_kind not in WARMED or config.mix_compressors:
        return _fail(f"--config {ns.config}: its compressor is {config.compressor_kind!r}"
                     f"{' with mixed compressors' if config.mix_compressors else ''}; this warm start is for one "
                     f"compressor of kind {' or '.join(WARMED)} (the others read the low-res tokens already)")
    chunks = whole_chunks(ns.clip_seconds, config.chunk_seconds, 1)
    if chunks is None:
        return _fail(f"--clip-seconds {ns.clip_seconds:g} is not a whole number of {config.chunk_seconds:g} s chunks")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    torch.manual_seed(ns.seed)
    model = build_model(config)
    try:
        dataset = VideoFolderDataset(ns.data, config.clip_spec(chunks), clip_start="random", crop="random",
                                     storyboards="optional")
        _load_init(model, ns.init, skip_prefix="compressor.")   # pfp.train's --init-skip compressor.
    except ValueError as exc:
        return _fail(str(exc))
    comp = model.compressor
    # what only_lr gives for the same clip: the backbone's own patch embedding of the LR latent
    target = MemoryCompressor(comp.patch_embed, comp.latent_channels, comp.inner_dim, comp.rate,
                              hidden=comp.hidden, kind="only_lr", lr_phase=comp.lr_phase).eval()
    params = [p for name, p in comp.named_parameters() if not name.startswith("patch_embed.")]
    opt = torch.optim.Adam(params, lr=ns.lr)
    g = torch.Generator().manual_seed(ns.seed)
    t0 = time.time()
    for step in range(ns.steps):
        batch = collate([draw_item(dataset, i, g)
                         for i in torch.randint(0, len(dataset), (ns.batch_size,), generator=g).tolist()])
        with torch.no_grad():
            hr, lr = model.vae.encode(batch["hr"]), model.vae.encode(batch["lr"])
            b, t, tl = hr.shape[0], hr.shape[2], lr.shape[2]
            level = shifted_logit_normal((b, t), g) * (torch.rand(b, t, generator=g) < ns.mask)
            lr_level = low_res_levels(level, comp.rate.t, tl)   # as pretraining masks the low-res frames
            hv, lv = level.view(b, 1, t, 1, 1), lr_level.view(b, 1, tl, 1, 1)
            hr = (1 - hv) * hr + hv * torch.randn(hr.shape, generator=g)
            lr = (1 - lv) * lr + lv * torch.randn(lr.shape, generator=g)
            want = target(hr, lr).tokens
        loss = F.mse_loss(comp(hr, lr).tokens, want)
        for group in opt.param_groups:
            group["lr"] = ns.lr * 0.5 * (1 + math.cos(math.pi * step / ns.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == ns.steps - 1:
            rel = loss.item() / max(want.pow(2).mean().item(), 1e-12)
            print(f"step {step + 1}/{ns.steps}: mse {loss.item():.4f}, relative {rel:.3f}, {time.time() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    save_weights(model, ns.out)
    print(f"{ns.out}: {config.compressor_kind} {comp.rate} compressor fitted to the low-res tokens in {ns.steps} steps",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
