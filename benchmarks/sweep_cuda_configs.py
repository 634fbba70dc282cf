"""Sweep the Triton kernels' block-size configs on the GPU at hand, and the SDPA kernels that the
``sdpa`` attention backend could call per segment; prints one table per kernel and shape.

    python benchmarks/sweep_cuda_configs.py [--budget-s 150] [--out results.md]

The configs the kernels ship with live in one table each (``CONV_CONFIGS`` in
pfp_kernels/conv/triton.py, ``_CONFIGS_16BIT`` in pfp_kernels/attention/triton.py); this script
patches the picker to try candidates through the public ops, checks each result against cuDNN or
SDPA (relative error < 1e-2), and times it with CUDA events (benchmarks/_timing.py). A candidate
that fails to compile (shared memory, registers) is listed with the error. Shapes: the four
compressor stages at full 480p scale and the paper's attention shape (bf16). Candidates are
tried in the listed order until the time budget runs out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import results_dir  # noqa: E402
from _timing import cuda_times  # noqa: E402

import pfp_kernels as pk  # noqa: E402

C = None  # filled in main: pfp_kernels.conv.triton.ConvConfig
A = None  # pfp_kernels.attention.triton.Config

CONV_STAGES = [  # (name, cin, cout, stride, input T, H, W)
    ("16->64", 16, 64, (2, 1, 1), (120, 60, 104)),
    ("64->128", 64, 128, (1, 2, 2), (60, 60, 104)),
    ("128->256", 128, 256, (1, 2, 2), (60, 30, 52)),
    ("256->512", 256, 512, (1, 2, 2), (60, 15, 26)),
]


def conv_candidates(name):
    # (block_m, block_n, block_k, num_warps, num_stages); the shipped Hopper config comes first
    if name == "16->64":
        return [(128, 64, 16, 4, 3), (128, 64, 16, 4, 4), (256, 64, 16, 8, 4), (128, 64, 16, 8, 3),
                (64, 64, 16, 4, 3), (256, 64, 16, 8, 3)]
    wide = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (256, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4)]
    if name == "256->512":
        return [(64, 128, 64, 4, 3), (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                (64, 256, 64, 8, 3), (128, 128, 64, 8, 3)]
    return wide


ATTN_CANDIDATES = {  # (block_m, block_n, num_warps, num_stages); shipped (Hopper) first
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
            (64, 128, 4, 3), (128, 32, 4, 3), (256, 64, 8, 3)],
    "bwd_dkdv": [(64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2),
                 (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
    "bwd_dq": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 3),
               (64, 32, 4, 3)],
}
ATTN_SHAPE = dict(B=1, H=24, D=128, Nc=5460, N=2340)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _err_line(exc):
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:140]}" if str(exc).strip() else type(exc).__name__


def sweep_conv(deadline, lines):
    from pfp_kernels.conv import triton as tk
    torch.backends.cudnn.benchmark = True
    shipped_pick = tk.pick_config
    for name, cin, cout, stride, size in CONV_STAGES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cin, *size, generator=g).cuda().bfloat16().contiguous(memory_format=torch.channels_last_3d)
        w = (torch.randn(cout, cin, 3, 3, 3, generator=g) / (27 * cin) ** 0.5).cuda().bfloat16()
        b = (0.1 * torch.randn(cout, generator=g)).cuda().bfloat16()
        ref = F.silu(F.conv3d(x, w, b, stride, 1))
        fns = {"cudnn_silu": lambda: F.silu(F.conv3d(x, w, b, stride, 1)),
               "cudnn_conv": lambda: F.conv3d(x, w, b, stride, 1)}
        notes = {}
        for cand in conv_candidates(name):
            if time.monotonic() > deadline:
                notes[cand] = "not tried (time budget)"
                continue
            cfg = C(*cand)
            tk.pick_config = lambda *a, cfg=cfg, **k: cfg
            try:
                out = pk.conv3d_act(x, w, b, stride, 1, impl="triton")
                torch.cuda.synchronize()
                err = _rel(out, ref)
                if err > 1e-2:
                    notes[cand] = f"wrong: relative error {err:.3g}"
                    continue
                fns[cand] = (lambda cfg=cfg: (setattr(tk, "pick_config", lambda *a, **k: cfg),
                                              pk.conv3d_act(x, w, b, stride, 1, impl="triton")))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
                notes[cand] = _err_line(exc)
            finally:
                tk.pick_config = shipped_pick
        times = cuda_times(fns, rounds=10, target_ms=10.0)
        tk.pick_config = shipped_pick
        shipped = tk.pick_config(cin, cout, ref.shape[2] * ref.shape[3] * ref.shape[4], torch.bfloat16,
                                 x.device)
        shipped = (shipped.block_m, shipped.block_n, shipped.block_k, shipped.num_warps, shipped.num_stages)
        flops = 2 * 27 * cin * cout * ref.shape[2] * ref.shape[3] * ref.shape[4]
        lines += [f"## conv {name} (bf16, {list(x.shape)} -> {list(ref.shape)}); shipped config {shipped}", "",
                  "| config (block_m, block_n, block_k, warps, stages) | min ms (median) | TFLOP/s | vs cudnn_silu |",
                  "|---|---:|---:|---:|"]
        base = times["cudnn_silu"][0]
        for key, (tmin, tmed, _) in sorted(times.items(), key=lambda kv: kv[1][0]):
            label = f"{key}{' (shipped)' if key == shipped else ''}"
            lines.append(f"| {label} | {tmin * 1e3:.3f} ({tmed * 1e3:.3f}) | {flops / tmin / 1e12:.0f} | "
                         f"{base / tmin:.2f} |")
        lines += [f"| {k} | {v} | | |" for k, v in notes.items()] + [""]
        print("\n".join(lines[-(len(times) + len(notes) + 5):]), flush=True)


def _attention_inputs(seed: int):
    """q, k, v [B, N, H, D] and a batch-1 context_k, context_v [1, Nc, H, D] of ATTN_SHAPE, bf16 on the GPU."""
    s, g = ATTN_SHAPE, torch.Generator().manual_seed(seed)

    def r(batch, n):
        return torch.randn(batch, n, s["H"], s["D"], generator=g).cuda().bfloat16()
    return r(s["B"], s["N"]), r(s["B"], s["N"]), r(s["B"], s["N"]), r(1, s["Nc"]), r(1, s["Nc"])


def sweep_attention(deadline, lines):
    from pfp_kernels.attention import triton as ta
    s = ATTN_SHAPE
    q, k, v, ck, cv = _attention_inputs(seed=0)
    flops = 4 * s["B"] * s["H"] * s["N"] * (s["Nc"] + s["N"]) * s["D"]
    ref_out = pk.joint_attention(q, k, v, ck, cv, impl="sdpa")
    go = torch.randn_like(q)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, ck, cv)]
    ref_grads = torch.autograd.grad(pk.joint_attention(*[t.float() for t in leaves], impl="sdpa"), leaves, go.float())
    shipped_for = ta.config_for

    def fwd():
        return pk.joint_attention(q, k, v, ck, cv, impl="triton")

    def fwd_bwd():
        return torch.autograd.grad(pk.joint_attention(*leaves, impl="triton"), leaves, go)

    for kernel, cands in ATTN_CANDIDATES.items():
        fns, notes = {}, {}
        shipped = shipped_for(kernel, s["D"], torch.bfloat16, ta._capability(q.device))
        shipped = (shipped.block_m, shipped.block_n, shipped.num_warps, shipped.num_stages)
        for cand in cands:
            if time.monotonic() > deadline:
                notes[cand] = "not tried (time budget)"
                continue
            cfg = A(*cand)

            def patched(kern, head_dim, dtype, cap, masked=False, *, cfg=cfg, kernel=kernel):
                return cfg if kern == kernel else shipped_for(kern, head_dim, dtype, cap, masked)
            ta.config_for = patched
            try:
                if kernel == "fwd":
                    err = _rel(fwd(), ref_out)
                else:
                    err = max(_rel(a, b) for a, b in zip(fwd_bwd(), ref_grads))
                torch.cuda.synchronize()
                if err > 2e-2:
                    notes[cand] = f"wrong: relative error {err:.3g}"
                    continue
                fn = fwd if kernel == "fwd" else fwd_bwd
                fns[cand] = (lambda fn=fn, patched=patched: (setattr(ta, "config_for", patched), fn()))
            except Exception as exc:  # noqa: BLE001
                notes[cand] = _err_line(exc)
            finally:
                ta.config_for = shipped_for
        if not fns:
            continue
        times = cuda_times(fns, rounds=10, target_ms=10.0)
        ta.config_for = shipped_for
        work = flops if kernel == "fwd" else 3.5 * flops
        what = "forward" if kernel == "fwd" else f"forward + backward, {kernel} config varied"
        lines += [f"## attention {kernel} (bf16, {s}); {what}; shipped config {shipped}", "",
                  "| config (block_m, block_n, warps, stages) | min ms (median) | TFLOP/s |", "|---|---:|---:|"]
        for key, (tmin, tmed, _) in sorted(times.items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {key}{' (shipped)' if key == shipped else ''} | {tmin * 1e3:.3f} ({tmed * 1e3:.3f}) | "
                         f"{work / tmin / 1e12:.0f} |")
        lines += [f"| {k} | {v} | |" for k, v in notes.items()] + [""]
        print("\n".join(lines[-(len(times) + len(notes) + 5):]), flush=True)


def sweep_sdpa_segments(lines):
    """The aten kernels that return the log-sum-exp the merge needs, per segment + merge."""
    from pfp_kernels.attention.backends import _merge_segments, _segments
    s = ATTN_SHAPE
    q, k, v, ck, cv = _attention_inputs(seed=1)
    ref = pk.joint_attention(q, k, v, ck, cv, impl="triton")
    nq = q.shape[1]

    def seg_efficient(qt, kt, vt):
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False)
        return res[0], res[1][..., :nq]

    def seg_flash(qt, kt, vt):
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)
        return res[0], res[1]

    def seg_cudnn(qt, kt, vt):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False)
        return res[0], res[1].reshape(qt.shape[0], qt.shape[1], nq)

    fns, notes = {}, {}
    for name, seg in (("efficient (shipped)", seg_efficient), ("flash", seg_flash), ("cudnn", seg_cudnn)):
        def run(seg=seg):
            parts = []
            for sk, sv in _segments(q, k, v, ck, cv):
                o, lse = seg(q.transpose(1, 2), sk.transpose(1, 2), sv.transpose(1, 2))
                parts.append((o.transpose(1, 2), lse.float()))
            return _merge_segments(parts)[0]
        try:
            err = _rel(run(), ref)
            if err > 1e-2:
                notes[name] = f"wrong: relative error {err:.3g}"
                continue
            fns[name] = run
        except Exception as exc:  # noqa: BLE001
            notes[name] = _err_line(exc)
    fns["sdpa over cat (PyTorch's choice)"] = lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), torch.cat([ck.expand(q.shape[0], -1, -1, -1), k], 1).transpose(1, 2),
        torch.cat([cv.expand(q.shape[0], -1, -1, -1), v], 1).transpose(1, 2))
    times = cuda_times(fns, rounds=10, target_ms=10.0)
    lines += [f"## sdpa backend: per-segment kernel + log-sum-exp merge (bf16, {s}), forward", "",
              "| per-segment kernel | min ms (median) |", "|---|---:|"]
    for key, (tmin, tmed, _) in sorted(times.items(), key=lambda kv: kv[1][0]):
        lines.append(f"| {key} | {tmin * 1e3:.3f} ({tmed * 1e3:.3f}) |")
    lines += [f"| {k} | {v} |" for k, v in notes.items()] + [""]
    print("\n".join(lines[-(len(times) + len(notes) + 5):]), flush=True)


def main(argv=None):
    global C, A
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=150.0, help="stop trying new candidates after this")
    p.add_argument("--out", default=None)
    p.add_argument("--only", nargs="*", default=["sdpa", "attention", "conv"], choices=["sdpa", "attention", "conv"])
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sweep_cuda_configs: needs a CUDA device")
    import triton
    from pfp_kernels.attention.triton import Config
    from pfp_kernels.conv.triton import ConvConfig
    C, A = ConvConfig, Config
    t0 = time.monotonic()
    deadline = t0 + a.budget_s
    lines = [f"# Triton config sweep on {torch.cuda.get_device_name()}", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, triton "
             f"{triton.__version__}, by `python benchmarks/sweep_cuda_configs.py`. CUDA-event timing, 10 rounds "
             "of about 10 ms interleaved across the candidates; min (median).", ""]
    if "sdpa" in a.only:
        sweep_sdpa_segments(lines)
    if "attention" in a.only:
        sweep_attention(t0 + a.budget_s * 0.5 if "conv" in a.only else deadline, lines)
    if "conv" in a.only:
        sweep_conv(deadline, lines)
    lines.append(f"Sweep took {time.monotonic() - t0:.0f} s.")
    card = torch.cuda.get_device_name().replace(" ", "_")
    out = a.out or str(results_dir("sweeps") / f"cuda_sweep_{card}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
