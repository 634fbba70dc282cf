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
    """Tiny backbones with 4 heads (so 2 and 4 ranks each take whole heads): the TinyDiT, and the
    diffusers Wan and HunyuanVideo adapters when diffusers is there."""
    from pfp.backbones import TinyDiT
    torch.manual_seed(0)
    tiny = TinyDiT(latent_channels=4, inner_dim=32, depth=2, num_heads=4, text_dim=16, freq_dim=16)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = {"tiny": tiny.eval()}
    import importlib.util
    if importlib.util.find_spec("diffusers") is not None:
        from pfp.backbones import WanBackbone
        from pfp.backbones.hunyuan_video import HunyuanVideoBackbone
        from _tiny_pfp import TINY_HUNYUAN, TINY_WAN
        torch.manual_seed(0)
        wan = WanBackbone.from_config(**{**TINY_WAN, "num_attention_heads": 4, "attention_head_dim": 6})
        with torch.no_grad():
            wan.transformer.proj_out.weight.normal_(0, 0.05)
        out["wan"] = wan.eval()
        # HunyuanVideo's text is [B, 1 + L, 16] (token 0 carries the 8-wide pooled vector): the
        # worker's random text reads as such
        out["hunyuan"] = HunyuanVideoBackbone.from_config(**{**TINY_HUNYUAN, "num_attention_heads": 4,
                                                             "attention_head_dim": 6,
                                                             "rope_axes_dim": (2, 2, 2)}).eval()
    return out


def _worker(rank, world, port, path, hunyuan_config=None):
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
    # whole generations: 2 chunks, cached context (the tiny model with CFG); the tiny model has 2
    # heads, the Wan- and HunyuanVideo-backed ones 4
    import dataclasses

    from pfp.config import PFPConfig
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.weights import build_model
    from _tiny_pfp import TINY_WAN, tiny_config
    # the tiny model also with cross-attention over the compressor's features (PFP 3.4), whose
    # K/V each rank keeps for its own heads only
    configs = {"tiny": tiny_config(), "tiny_xattn": dataclasses.replace(tiny_config(), cross_attention=True)
               } if world == 2 else {}
    if hunyuan_config is not None:
        configs["wan"] = dataclasses.replace(tiny_config(), dit={"kind": "wan", "config": {
            **TINY_WAN, "num_attention_heads": 4, "attention_head_dim": 6, "in_channels": 48, "out_channels": 48}})
        configs["hunyuan"] = PFPConfig.load(hunyuan_config)
    for name, config in configs.items():
        torch.manual_seed(0)
        model = build_model(config)
        with torch.no_grad():
            model.compressor.proj.weight.normal_(0, 0.1)
            model.backbone.proj_out.weight.normal_(0, 0.05)
            for blk in model.backbone.blocks:   # the memory cross-attention's output starts at zero
                if getattr(blk, "memory_attn", None) is not None:
                    blk.memory_attn.to_out.weight.normal_(0, 0.2)
        seconds = 2 * config.chunk_seconds
        story = Storyboard.single("a red circle on a blue background", seconds)
        want = generate(model, story, seconds, steps=2, progress=False)
        got = generate(model, story, seconds, steps=2, progress=False, sequence_parallel=SequenceParallel())
        cache = got.context_cache
        heads = cache.memory_keys[0].shape[2] if config.cross_attention else cache.keys[0].shape[2]
        results[f"generate/{name}"] = ((got.video - want.video).abs().max().item(), 0.0, 1.0, heads,
                                       model.backbone.num_heads)
        if config.cross_attention:   # the memory attention changes the video: the check above can fail
            plain = dataclasses.replace(config, cross_attention=False)
            results[f"generate/{name}/differs"] = (0.0, 0.0, 1.0, None, 0) if (
                generate(_like(model, plain), story, seconds, steps=2, progress=False).video
                - want.video).abs().max().item() > 1e-3 else (float("inf"), 0.0, 1.0, None, 0)
    if world == 4:   # the tiny model's 2 heads do not split over 4 ranks: refused before any work
        from pfp.generate import InputError
        model = build_model(tiny_config())
        try:
            generate(model, Storyboard.single("a", 1.0), 1.0, steps=1, progress=False,
                     sequence_parallel=SequenceParallel())
            results["generate refused"] = None
        except InputError as exc:
            results["generate refused"] = str(exc)
    from pfp.backbones import TinyDiT
    try:
        TinyDiT(latent_channels=4, inner_dim=24, depth=1, num_heads=3, text_dim=16).set_sequence_parallel(
            SequenceParallel())
        results["refused"] = None
    except ValueError as exc:
        results["refused"] = str(exc)
    torch.save(results, f"{path}.{rank}")
    dist.destroy_process_group()


def _like(model, config):
    """A model of ``config`` with ``model``'s weights where the two share them."""
    from pfp.weights import build_model
    other = build_model(config)
    other.load_state_dict(model.state_dict(), strict=False)
    return other


def _hunyuan_folder_config(tmp_path) -> str:
    """A tiny HunyuanVideo pipeline folder with a 4-head transformer, and a config over it."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from pfp.config import PFPConfig
    from _tiny_pfp import TINY_HUNYUAN, save_tiny_hunyuan_text, write_config
    root = tmp_path / "hunyuan"
    crop = save_tiny_hunyuan_text(root)
    torch.manual_seed(0)
    HunyuanVideoTransformer3DModel(**{**TINY_HUNYUAN, "num_attention_heads": 4, "attention_head_dim": 6,
                                      "rope_axes_dim": (2, 2, 2)}).save_pretrained(root / "transformer")
    AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                              norm_num_groups=4).save_pretrained(root / "vae")
    config = PFPConfig(video_size=(64, 64), fps=8.0, chunk_frames=8, rate="2x2x2", compressor_hidden=(8, 8, 8),
                       vae={"kind": "hunyuan", "path": str(root)},
                       text={"kind": "hunyuan", "path": str(root), "max_length": 8, "crop_start": crop},
                       dit={"kind": "hunyuan_video", "path": str(root)}, sample_cfg=1.0)
    return write_config(tmp_path / "hunyuan.json", config)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_give_the_single_process_velocity_and_each_caches_its_heads(tmp_path, world):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    import importlib.util
    hunyuan = None
    if importlib.util.find_spec("diffusers") is not None:
        hunyuan = _hunyuan_folder_config(tmp_path)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path / "r"), hunyuan), nprocs=world)
    for rank in range(world):
        results = torch.load(tmp_path / f"r.{rank}")
        assert "3 heads" in results.pop("refused")     # heads must divide among the ranks
        if world == 4:
            assert "over 4 ranks needs a head count divisible by it, got 2 heads" in results.pop("generate refused")
        want = {"tiny/cached", "tiny/joint"} | ({"generate/tiny", "generate/tiny_xattn", "generate/tiny_xattn/differs"}
                                                if world == 2 else set())
        if hunyuan is not None:
            want |= {f"{m}/{mode}" for m in ("wan", "hunyuan") for mode in ("cached", "joint")}
            want |= {"generate/wan", "generate/hunyuan"}
        assert want <= set(results), sorted(results)
        for key, (err, err_frame, scale, heads, num_heads) in results.items():
            assert err <= 1e-5 * max(1.0, scale) and err_frame <= 1e-5 * max(1.0, scale), (rank, key, err, err_frame)
            if heads is not None:   # each rank caches only its heads of the context K/V
                assert heads == num_heads // world, (key, heads)


def _torchrun_generate(tmp_path, ranks: int):
    """``torchrun --nproc_per_node=ranks -m pfp.generate`` on the tiny model (2 heads), in tmp_path."""
    import subprocess
    import sys
    from pfp.weights import build_model, save_weights
    from _tiny_pfp import tiny_config
    torch.manual_seed(0)
    save_weights(build_model(tiny_config()), str(tmp_path / "tiny.safetensors"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                           f"--master_port={_free_port()}", "-m", "pfp.generate", "--checkpoint", "tiny.safetensors",
                           "--seconds", "1", "--steps", "2", "--out", "v.mp4", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_generate_writes_one_video(tmp_path):
    pytest.importorskip("av")
    r = _torchrun_generate(tmp_path, 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote v.mp4") == 1 and (tmp_path / "v.mp4").is_file()


def test_torchrun_over_ranks_that_do_not_divide_the_heads_is_refused_as_bad_input(tmp_path):
    r = _torchrun_generate(tmp_path, 3)
    # each rank says why in one line and exits 2 (torchrun itself then exits 1)
    assert r.returncode != 0 and r.stderr.count("error: sequence parallelism over 3 ranks") == 3, r.stderr[-2000:]
    assert "exitcode: 2" in r.stderr and "Traceback" not in r.stderr.split("error: sequence")[0]
    assert not (tmp_path / "v.mp4").exists()


def test_one_gpu_index_for_several_ranks_on_a_machine_is_refused(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, "-m", "pfp.generate", "--device", "cuda:0", "--seconds", "1", "--out", "v.mp4"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--device cuda (each rank takes" in r.stderr, r.stderr
    t = subprocess.run([sys.executable, "-m", "pfp.train", "pretrain", "--device", "cuda:0", "--steps", "1",
                        "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert t.returncode == 2 and t.stderr.count("\n") == 1 and "--device cuda (each rank takes" in t.stderr, t.stderr
    assert not (tmp_path / "run").exists()
