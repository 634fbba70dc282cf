"""Sequence-parallel generation (pfp.parallel): two CPU ranks over gloo give what one process gives."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctx(dim):
    from pfp.compressor import Context
    t = torch.arange(3, dtype=torch.float32).repeat_interleave(4)
    pos = torch.stack([t, torch.tensor([0.5, 0.5, 2.5, 2.5] * 3), torch.tensor([0.5, 2.5] * 6)], 1)
    return Context(torch.randn(1, 12, dim, generator=torch.Generator().manual_seed(5)), pos)


def _backbones():
    from pfp.backbones import TinyDiT
    from _tiny_pfp import tiny_wan_backbone
    torch.manual_seed(0)
    tiny = TinyDiT(latent_channels=4, inner_dim=32, depth=2, num_heads=4, text_dim=16, freq_dim=16)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = {"tiny": tiny.eval()}
    try:
        out["wan"] = tiny_wan_backbone()
    except BaseException:  # pytest.skip without diffusers
        pass
    return out


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from pfp.parallel import SequenceParallel
    results = {}
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 3, 6, 2, generator=g), torch.randn(2, 5, 16, generator=g)  # 9 tokens: 5 + 4
    for name, bb in _backbones().items():
        for mode in ("cached", "joint"):
            bb.context_mode = mode
            ctx = _ctx(bb.inner_dim)
            with torch.no_grad():
                bb.set_sequence_parallel(None)
                want_kv = bb.cache_context(ctx) if mode == "cached" else ctx
                want = bb(x, torch.tensor([0.3, 0.8]), text, want_kv, t_start=4)
                per_frame = bb(x, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.9, 0.9]]), text, want_kv, t_start=4)
                bb.set_sequence_parallel(SequenceParallel())
                kv = bb.cache_context(ctx) if mode == "cached" else ctx
                got = bb(x, torch.tensor([0.3, 0.8]), text, kv, t_start=4)
                got_frame = bb(x, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.9, 0.9]]), text, kv, t_start=4)
                bb.set_sequence_parallel(None)
            heads = kv.keys[0].shape[2] if mode == "cached" else None
            results[f"{name}/{mode}"] = ((got - want).abs().max().item(), (got_frame - per_frame).abs().max().item(),
                                         want.abs().max().item(), heads, bb.num_heads)
    # a whole generation: 2 chunks, cached context, CFG
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.weights import build_model
    from _tiny_pfp import tiny_config
    torch.manual_seed(0)
    model = build_model(tiny_config())
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    story = Storyboard.single("a red circle on a blue background", 1.0)
    want = generate(model, story, 1.0, steps=2, progress=False)
    got = generate(model, story, 1.0, steps=2, progress=False, sequence_parallel=SequenceParallel())
    results["generate"] = ((got.video - want.video).abs().max().item(), 0.0, 1.0, got.context_cache.keys[0].shape[2],
                           model.backbone.num_heads)
    from pfp.backbones import TinyDiT
    try:
        TinyDiT(latent_channels=4, inner_dim=24, depth=1, num_heads=3, text_dim=16).set_sequence_parallel(
            SequenceParallel())
        results["refused"] = None
    except ValueError as exc:
        results["refused"] = str(exc)
    torch.save(results, f"{path}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_give_the_single_process_velocity_and_each_caches_its_heads(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path / "r")), nprocs=world)
    for rank in range(world):
        results = torch.load(tmp_path / f"r.{rank}")
        assert "3 heads" in results.pop("refused")     # heads must divide among the ranks
        assert any(k.startswith("tiny/") for k in results)
        for key, (err, err_frame, scale, heads, num_heads) in results.items():
            assert err <= 1e-5 * max(1.0, scale) and err_frame <= 1e-5 * max(1.0, scale), (rank, key, err, err_frame)
            if heads is not None:   # each rank caches only its heads of the context K/V
                assert heads == num_heads // world, (key, heads)


def test_torchrun_generate_writes_one_video(tmp_path):
    import subprocess
    import sys
    pytest.importorskip("av")
    from pfp.weights import build_model, save_weights
    from _tiny_pfp import tiny_config
    torch.manual_seed(0)
    save_weights(build_model(tiny_config()), str(tmp_path / "tiny.safetensors"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "-m", "pfp.generate", "--checkpoint", "tiny.safetensors",
                        "--seconds", "1", "--steps", "2", "--out", "v.mp4", "--quiet"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote v.mp4") == 1 and (tmp_path / "v.mp4").is_file()
